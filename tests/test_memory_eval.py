"""Tests of the memory evaluation's teacher-forced value-token accuracy (`trainers/memory_eval.py`)."""

from types import SimpleNamespace

import pytest
import torch

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer
from trainers.memory_eval import _teacher_forced, _Tokens, evaluate_system, value_span
from trainers.synthetic import generate_dialogues, generate_pretrain


@pytest.fixture(scope="module")
def tokenizer():
    return train_rxt_tokenizer([row["text"] for row in generate_pretrain(300, seed=5)], vocab_size=400, min_frequency=1)


ANSWERS = [("Your cat is called Supa.", "Supa"), ("You like muted blue best.", "muted blue"),
           ("Mika", "Mika"), ("Your locker code is 7345.", "7345"), ("Your name is Lebissa.", "Lebissa")]  # fmt: skip


@pytest.mark.parametrize("answer,value", ANSWERS)
def test_value_span_covers_exactly_the_value_tokens(tokenizer, answer, value):
    tokens = _Tokens(tokenizer, "cpu")
    ids = tokens.encode(answer)
    start, end = value_span(tokens, answer, value)
    assert tokenizer.decode(ids[start:end]).strip() == value
    assert value not in tokenizer.decode(ids[start + 1 : end]) and value not in tokenizer.decode(ids[start : end - 1])
    assert value_span(tokens, answer, "Zorblax") is None


class NextTokenOracle(torch.nn.Module):
    """Logits whose argmax at position t is the input token t + 1 (`shift`: t + 1 + shift), like a perfect model."""

    def __init__(self, vocab_size: int, shift: int = 0):
        super().__init__()
        self.vocab_size, self.shift = vocab_size, shift

    def forward(self, input_ids, attention_mask=None, **kwargs):
        nxt = torch.roll(input_ids, -1 - self.shift, dims=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab_size).float())


def test_value_hits_count_the_value_tokens_only(tokenizer):
    tokens = _Tokens(tokenizer, "cpu")
    prompts = [tokens.prompt("What is my cat called?"), tokens.prompt("Which colour do I like?"), tokens.prompt("Hi")]
    answers = ["Your cat is called Supa.", "You like muted blue best.", "Hello there."]
    values = ["Supa", "muted blue", None]
    lengths = [value_span(tokens, a, v)[1] - value_span(tokens, a, v)[0] for a, v in zip(answers[:2], values[:2])]
    *_, hits = _teacher_forced(NextTokenOracle(len(tokenizer)), tokens, prompts, answers, values=values)
    assert hits == [(lengths[0], lengths[0]), (lengths[1], lengths[1]), (0, 0)]
    # predicting the token after next is right only where a token repeats: never for these values
    *_, hits = _teacher_forced(NextTokenOracle(len(tokenizer), shift=1), tokens, prompts, answers, values=values)
    assert hits == [(0, lengths[0]), (0, lengths[1]), (0, 0)]


def test_evaluate_system_reports_value_token_accuracy_per_distance(tokenizer):
    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), **ids)).eval()
    rows = generate_dialogues(6, seed=2, split="test", max_turns=4, max_distance=3)
    result = evaluate_system(model, tokenizer, rows, "memory", batch_size=3, max_new_tokens=4)
    assert set(result["value_token_accuracy"]) == set(result["recall"])
    assert all(0.0 <= acc <= 1.0 for acc in result["value_token_accuracy"].values())


def test_wrong_fact_counts_misses_that_name_another_fact_of_the_dialogue(tokenizer, monkeypatch):
    """A missed probe whose answer holds another probed value of the same dialogue is a wrong fact; a miss with an
    unrelated value is not; hits never are."""
    import trainers.memory_eval as memory_eval

    rows = [{"query": "Hi, I am Ada.", "answer": "Nice to meet you, Ada.",
             "interactions": [{"query": "I live in Paris.", "answer": "Paris is lovely."},
                              {"query": "What is my name?", "answer": "Your name is Ada."},
                              {"query": "Where do I live?", "answer": "You live in Paris."}],
             "probes": [{"turn": 2, "distance": 2, "attribute": "name", "expected": "Ada"},
                        {"turn": 3, "distance": 2, "attribute": "city", "expected": "Paris"}]},
            {"query": "Hi, I am Bo.", "answer": "Nice to meet you, Bo.",
             "interactions": [{"query": "What am I called?", "answer": "You are Bo."}],
             "probes": [{"turn": 1, "distance": 1, "attribute": "name", "expected": "Bo"}]}]  # fmt: skip
    replies = {"What is my name?": "Your name is Paris.", "Where do I live?": "You live in Paris.",
               "What am I called?": "You are Zed."}  # fmt: skip

    def fake_generate(model, tokens, prompts, max_new_tokens, cache=None):
        texts = [replies.get(tokenizer.decode(p[2:-1]).strip(), "Nice.") for p in prompts]
        return [tokens.encode(t) for t in texts], [True] * len(texts)

    monkeypatch.setattr(memory_eval, "_generate", fake_generate)
    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), **ids)).eval()
    result = evaluate_system(model, tokenizer, rows, "memory", batch_size=2, max_new_tokens=4)
    assert result["recall"] == {"1": 0.0, "2": 0.5}  # Bo -> "Zed" (miss); Ada -> "Paris" (miss); Paris (hit)
    assert result["wrong_fact"] == {"1": 0.0, "2": 0.5}

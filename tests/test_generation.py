"""Stock `generate()` behaviours on RxT (those transformers' `GenerationTesterMixin` checks, which is not in the
transformers sdist): dict outputs with scores / logits / hidden states / attentions for greedy, sampling and beam
search; the STM left by beam search and `num_return_sequences`; assisted decoding; the static cache and a
fullgraph-compiled decode step; left padding; batched pipelines."""

import pytest
import torch
from transformers import pipeline

from modeling_rxt import RxTCache, RxTConfig, RxTForCausalLM, RxTStatelessConfig, RxTStatelessForCausalLM
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer

V, LAYERS, NEW = 256, 2, 4


def build(attn: str = "eager", seed: int = 0) -> RxTForCausalLM:
    torch.manual_seed(seed)
    model = RxTForCausalLM(RxTConfig.tiny()).eval()
    model.set_attn_implementation(attn)
    return model


def ids_and_stm(batch: int = 2, length: int = 5):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(7, V, (batch, length), generator=generator)
    stm = torch.randn(LAYERS, batch, 8, 32, generator=generator)
    return ids, stm


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=5),
    "beam": dict(do_sample=False, num_beams=3),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_dict_outputs_with_scores_logits_hidden_states_attentions(mode):
    model = build("eager")
    ids, stm = ids_and_stm()
    rows = ids.shape[0] * MODES[mode].get("num_beams", 1)
    out = model.generate(ids, cache=RxTCache(stm=stm), max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True,
                         output_hidden_states=True, output_attentions=True, **MODES[mode])  # fmt: skip
    assert out.sequences.shape == (2, 5 + NEW)
    assert len(out.scores) == len(out.logits) == NEW
    assert all(s.shape == (rows, V) for s in (*out.scores, *out.logits))
    assert len(out.hidden_states) == len(out.attentions) == NEW
    for step, (hidden, attentions) in enumerate(zip(out.hidden_states, out.attentions)):
        length = 5 if step == 0 else 1  # the prompt, then one token per step
        assert len(hidden) == LAYERS + 1 and all(h.shape == (rows, length, 32) for h in hidden)
        assert len(attentions) == LAYERS
        assert all(a.shape == (rows, 2, length, 5 + step) for a in attentions)  # sSQA: 2 heads
        torch.testing.assert_close(attentions[0].sum(-1), torch.ones(rows, 2, length))
    if mode == "beam":
        assert out.sequences_scores.shape == (2,) and out.beam_indices.shape[0] == 2


def test_forward_returns_memory_cross_attentions_over_the_stm_slots():
    model = build("eager")
    ids, stm = ids_and_stm()
    out = model(ids, stm=stm, output_attentions=True, output_hidden_states=True)
    assert [a.shape for a in out.cross_attentions] == [(2, 2, 5, 8)] * LAYERS  # [B, heads, T, S]
    assert "stm" not in out.keys() and out.stm is out.cache.stm and out.stm.shape == (LAYERS, 2, 8, 32)
    model.train()  # no cache: a field, which survives pytree round trips (DDP / FSDP output handling)
    trained = model(ids, stm=stm)
    assert trained.cache is None and torch.equal(trained["stm"], stm)
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(trained)
    assert torch.equal(tree_unflatten(leaves, spec).stm, stm)
    model.eval()
    as_tuple = model(ids, stm=stm, output_attentions=True, return_dict=False)
    assert torch.equal(as_tuple[0], out.logits) and not any(t is out.stm for t in as_tuple)


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_return_sequences=3, do_sample=True, top_k=5),
                                    dict(num_beams=3, cache_implementation="static")],
                         ids=["beams", "return_sequences", "beams_static"])  # fmt: skip
def test_beams_and_return_sequences_leave_a_conversation_that_continues(kwargs):
    """After generate with n rows per conversation, the cache's STM is the conversation's [L, B, S, D] (every row of
    a conversation reads the same STM); update_memory and the next turn work on it."""
    model = build("sdpa")
    ids, stm = ids_and_stm()
    cache = RxTCache(stm=stm.clone())
    out = model.generate(ids, cache=cache, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, **kwargs)
    assert out.shape[0] == 2 * kwargs.get("num_return_sequences", 1)
    torch.testing.assert_close(cache.stm, stm, rtol=0, atol=0)
    assert all(k.shape[0] == 2 for k, _ in cache.memory_kv.values())
    chosen = out[:: kwargs.get("num_return_sequences", 1)]  # one answer per conversation
    new_stm = model.update_memory(chosen, torch.ones_like(chosen), cache)
    assert new_stm.shape == stm.shape and cache.get_seq_length() == 0
    reference = RxTCache(stm=new_stm.clone())
    follow_up = model.generate(ids, cache=cache, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(ids, cache=reference, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
    assert torch.equal(follow_up, expected)


def test_static_cache_generates_what_the_dynamic_cache_does():
    model = build("sdpa")
    ids, stm = ids_and_stm()
    common = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    dynamic = model.generate(ids, cache=RxTCache(stm=stm), **common)
    cache = RxTCache(stm=stm)
    static = model.generate(ids, cache=cache, cache_implementation="static", **common)
    assert torch.equal(static, dynamic) and cache.is_static and cache.max_cache_len >= 5 + NEW - 1
    assert static.shape == (2, 5 + NEW)
    without_cache = model.generate(ids, cache_implementation="static", **common)  # an RxTCache with the initial STM
    assert torch.equal(without_cache, model.generate(ids, **common))
    model.update_memory(static, torch.ones_like(static), cache)  # next turn on the same static cache
    second = model.generate(ids, cache=cache, **common)
    assert torch.equal(second, model.generate(ids, cache=RxTCache(stm=cache.stm.clone()), **common))
    with pytest.raises(ValueError, match="cache_implementation='offloaded'.*expected None / 'dynamic' or 'static'"):
        model.generate(ids, cache_implementation="offloaded", **common)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_one_query_memory_read_equals_sdpa(heads):
    """The compiled decode step's memory read (`read_memory_one_query`) is attention: SDPA with kv heads shared by
    consecutive query heads (MHA, GQA, MQA)."""
    from modeling_rxt.modeling_rxt import read_memory_one_query

    hq, hkv = heads
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, hq, 1, 8, generator=generator)
    key, value = torch.randn(2, 3, hkv, 16, 8, generator=generator)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(hq // hkv, 1), value.repeat_interleave(hq // hkv, 1), scale=0.3
    )  # [B, Hq, 1, hd]
    got = read_memory_one_query(query, key, value, 0.3)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(3, 1, hq * 8))


def test_decode_step_compiles_fullgraph_with_the_static_cache(monkeypatch):
    """`_can_compile_fullgraph`: one decode step (static self-attention cache, memory K/V of the turn) traces as a
    single graph, reads memory with `read_memory_one_query` and gives the eager step's logits. (`backend="eager"`
    checks the graph without paying for code generation on CPU.)"""
    import modeling_rxt.modeling_rxt as modeling

    reads = []
    read = modeling.read_memory_one_query
    monkeypatch.setattr(modeling, "read_memory_one_query", lambda *a: reads.append(1) or read(*a))
    assert RxTForCausalLM._can_compile_fullgraph and RxTStatelessForCausalLM._can_compile_fullgraph
    model = build("sdpa")
    ids, stm = ids_and_stm()
    cache = RxTCache(stm=stm, config=model.config, max_cache_len=16)
    reference = RxTCache(stm=stm)
    with torch.no_grad():
        first = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        model(ids, cache=reference, use_cache=True)
        position = torch.full((2, 1), 5)
        step = torch.compile(lambda i, c: model(i, cache=c, position_ids=position, use_cache=True).logits,
                             fullgraph=True, backend="eager")  # fmt: skip
        torch.testing.assert_close(step(first, cache), model(first, cache=reference, position_ids=position).logits)
    assert len(reads) == model.config.decoder_config.num_layers  # traced once per memory layer; eager never reads so


@pytest.mark.parametrize("assist", ["assistant_model", "prompt_lookup"])
def test_assisted_decoding_matches_greedy(assist):
    model = build("sdpa")
    ids, stm = ids_and_stm(batch=1)
    ids = torch.cat([ids, ids], dim=1)  # repeated n-grams for prompt lookup
    common = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = model.generate(ids, cache=RxTCache(stm=stm), **common)
    extra = {"assistant_model": build("sdpa", seed=1)} if assist == "assistant_model" else {"prompt_lookup_num_tokens": 2}
    cache = RxTCache(stm=stm)
    assisted = model.generate(ids, cache=cache, **extra, **common)
    assert torch.equal(assisted, greedy)
    torch.testing.assert_close(cache.stm, stm, rtol=0, atol=0)


def test_left_padding_gives_the_unpadded_continuation():
    model = build("sdpa")
    ids, stm = ids_and_stm(batch=2, length=6)
    short = ids[1:, 2:]
    padded = torch.cat([ids[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    common = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(padded, attention_mask=mask, cache=RxTCache(stm=stm), **common)
    alone = model.generate(short, cache=RxTCache(stm=stm[:, 1:]), **common)
    assert torch.equal(batched[1, 6:], alone[0, 4:])


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"hello world number {i} from the reactive transformer" for i in range(100)]
    return train_rxt_tokenizer(texts, vocab_size=300, min_frequency=1)


@pytest.mark.parametrize("family", ["rxt", "stateless"])
def test_batched_pipelines(tokenizer, family):
    """`pipeline("feature-extraction")` / `pipeline("text-generation")` split the model outputs by batch row."""
    torch.manual_seed(0)
    config = RxTConfig.tiny(vocab_size=len(tokenizer))
    model = RxTForCausalLM(config) if family == "rxt" else RxTStatelessForCausalLM(
        RxTStatelessConfig.from_rxt_config(config))  # fmt: skip
    model.eval()
    texts = ["hello world", "number 3 from the reactive transformer", "hello"]
    tokenizer.padding_side = "right"
    extractor = pipeline("feature-extraction", model=model.model, tokenizer=tokenizer)
    batched = extractor(texts, batch_size=3)  # rows padded (on the right) to the longest; 3 rows > 2 STM layers
    for text, features in zip(texts, batched):
        alone = torch.tensor(extractor(text)[0])  # [T, D]
        torch.testing.assert_close(torch.tensor(features[0])[: len(alone)], alone, rtol=1e-5, atol=1e-5)
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answers = generator(texts, batch_size=3, max_new_tokens=3, do_sample=False)
    one_by_one = [generator(t, max_new_tokens=3, do_sample=False) for t in texts]
    assert [b[0]["generated_text"] for b in answers] == [o[0]["generated_text"] for o in one_by_one]

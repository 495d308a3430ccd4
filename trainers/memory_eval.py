"""Memory evaluation on fact-recall dialogues (docs/spec.md#memory-evaluation): does the model carry facts across
turns?

For every dialogue (rows with `query`, `answer`, `interactions`, `probes`; see `trainers.synthetic`) the model answers
each turn by greedy generation; memory is updated with the model's **own** answers. A probe is recalled when its
expected value appears in the generated answer of its turn (normalised: lower case, punctuation removed, spaces
collapsed). Systems:
- `memory`: the RxT model with memory;
- `memory_reset`: the same model whose STM is re-initialised before every turn (ablation: must fall to chance);
- `stateless`: a stateless baseline decoder that sees only the current query (optional);
- `full_history`: a stateless baseline that sees the whole conversation so far (optional upper bound).
Also reported per system: teacher-forced answer perplexity and token accuracy on the reference answers, and per
distance the teacher-forced accuracy on the tokens of the expected value in the probe turns' reference answers
(`value_token_accuracy`: a graded signal while recall, which needs every value token right, is still near 0).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from modeling_rxt.tokenization_rxt import check_rxt_tokenizer


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def recalled(expected: str, answer: str) -> bool:
    return f" {normalise(expected)} " in f" {normalise(answer)} "


def dialogue_turns(row: dict) -> list[tuple[str, str]]:
    return [(row["query"], row["answer"])] + [(t["query"], t["answer"]) for t in row.get("interactions", [])]


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if total == 0:
        return (0.0, 0.0)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


class _Tokens:
    """Prompt / interaction / history tokenization with the RxT templates (segments tokenized separately)."""

    def __init__(self, tokenizer, device):
        self.tokenizer, self.device = tokenizer, device
        self.ids = check_rxt_tokenizer(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, query: str) -> list[int]:
        return [self.ids["bos_token_id"], self.ids["query_token_id"], *self.encode(query), self.ids["answer_token_id"]]

    def interaction(self, query: str, answer_ids: list[int], ended: bool) -> list[int]:
        return self.prompt(query) + answer_ids + ([self.ids["eos_token_id"]] if ended else [])

    def batch(self, sequences: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.ids["pad_token_id"]
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[i, span] = torch.tensor(seq)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)


@torch.no_grad()
def _generate(model, tokens: _Tokens, prompts: list[list[int]], max_new_tokens: int, cache=None):
    ids, mask = tokens.batch(prompts, left=True)
    kwargs = {"cache": cache} if cache is not None else {}
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokens.ids["eos_token_id"], pad_token_id=tokens.ids["pad_token_id"], **kwargs,
    )  # fmt: skip
    answers, ended = [], []
    eos = tokens.ids["eos_token_id"]
    for row in out[:, ids.shape[1] :].tolist():
        stop = row.index(eos) if eos in row else len(row)
        answers.append([t for t in row[:stop] if t != tokens.ids["pad_token_id"]])
        ended.append(eos in row)
    return answers, ended


def value_span(tokens: _Tokens, answer: str, value: str) -> tuple[int, int] | None:
    """Token span `[start, end)` of `value` inside `tokens.encode(answer)`, or None when the answer does not contain it.
    In byte-level BPE the space before the value is merged into the value's first token (`ĠS`) or, where no such merge
    exists, is a token of its own (`Ġ`); the span starts after a space token of its own and includes a merged one."""
    at = answer.find(value)
    if at < 0:
        return None
    full, before = tokens.encode(answer), tokens.encode(answer[:at])
    if full[: len(before)] == before:  # the text before the value (trailing space included) tokenizes on its own
        start = len(before)
    else:
        prefix = answer[:at].rstrip()
        start = len(tokens.encode(prefix)) if prefix else 0
    return start, len(tokens.encode(answer[: at + len(value)]))


@torch.no_grad()
def _teacher_forced(model, tokens: _Tokens, prompts, answers, stm=None, values=None):
    """Sum of answer-token NLL, correct argmax count and token count (answer + [EOS] are targets), and per row the
    (correct, count) of the tokens of `values[i]` inside answer `i` ((0, 0) where `values[i]` is None or absent)."""
    eos = tokens.ids["eos_token_id"]
    sequences = [p + tokens.encode(a) + [eos] for p, a in zip(prompts, answers)]
    ids, mask = tokens.batch(sequences, left=False)
    labels = torch.full_like(ids, -100)
    for i, (p, s) in enumerate(zip(prompts, sequences)):
        labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
    kwargs = {"stm": stm} if stm is not None else {}
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    nll = torch.nn.functional.cross_entropy(logits[valid], targets[valid], reduction="sum").item()
    hit = logits.argmax(-1) == targets  # [B, T-1]: position t predicts token t + 1
    value_hits = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        span = value_span(tokens, a, values[i]) if values is not None and values[i] is not None else None
        if span is None:
            value_hits.append((0, 0))
            continue
        row = hit[i, len(p) + span[0] - 1 : len(p) + span[1] - 1]
        value_hits.append((int(row.sum().item()), row.numel()))
    return nll, int(hit[valid].sum().item()), int(valid.sum().item()), value_hits


def evaluate_system(model, tokenizer, rows: list[dict], system: str, batch_size: int = 16,
                    max_new_tokens: int = 24) -> dict:  # fmt: skip
    """Recall, value-token accuracy and wrong-fact rate per distance, answer perplexity / token accuracy of one system
    on `rows`. Wrong fact = a missed probe whose answer names another probed value of the same dialogue (the memory
    was read at the wrong fact, not corrupted)."""
    from modeling_rxt import RxTCache

    device = next(model.parameters()).device
    tokens = _Tokens(tokenizer, device)
    hits, counts, wrong_fact = defaultdict(int), defaultdict(int), defaultdict(int)
    value_correct, value_total = defaultdict(int), defaultdict(int)
    nll, correct, total = 0.0, 0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        turns = [dialogue_turns(r) for r in chunk]
        probes = [{p["turn"]: p for p in r["probes"]} for r in chunk]
        history: list[list[int]] = [[] for _ in chunk]
        stm = model.initial_stm(len(chunk)) if system in ("memory", "memory_reset") else None
        for k in range(max(len(t) for t in turns)):
            active = [i for i, t in enumerate(turns) if k < len(t)]
            queries = [turns[i][k][0] for i in active]
            prompts = [tokens.prompt(q) for q in queries]
            values = [probes[i][k]["expected"] if k in probes[i] else None for i in active]
            if system == "full_history":
                prompts = [history[i] + p for i, p in zip(active, prompts)]
            if system in ("memory", "memory_reset"):
                row_stm = stm[:, active] if system == "memory" else model.initial_stm(len(active))
                answers, ended = _generate(model, tokens, prompts, max_new_tokens, RxTCache(stm=row_stm))
                step = _teacher_forced(model, tokens, prompts, [turns[i][k][1] for i in active], row_stm, values)
            else:
                answers, ended = _generate(model, tokens, prompts, max_new_tokens)
                step = _teacher_forced(model, tokens, prompts, [turns[i][k][1] for i in active], values=values)
            nll, correct, total = nll + step[0], correct + step[1], total + step[2]
            texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
            for j, i in enumerate(active):
                probe = probes[i].get(k)
                if probe is not None:
                    counts[probe["distance"]] += 1
                    hit = recalled(probe["expected"], texts[j])
                    hits[probe["distance"]] += hit
                    others = {p["expected"] for p in probes[i].values()} - {probe["expected"]}
                    wrong_fact[probe["distance"]] += not hit and any(recalled(v, texts[j]) for v in others)
                    value_correct[probe["distance"]] += step[3][j][0]
                    value_total[probe["distance"]] += step[3][j][1]
            interactions = [tokens.interaction(q, a, e) for q, a, e in zip(queries, answers, ended)]
            if system == "memory":
                ids, mask = tokens.batch(interactions, left=False)
                stm[:, active] = model.update_memory(ids, mask, stm[:, active])
            elif system == "full_history":
                for j, i in enumerate(active):
                    history[i] = history[i] + interactions[j]
    distances = sorted(counts)
    return {
        "recall": {str(d): hits[d] / counts[d] for d in distances},
        "counts": {str(d): counts[d] for d in distances},
        "ci95": {str(d): wilson_interval(hits[d], counts[d]) for d in distances},
        "perplexity": math.exp(nll / max(total, 1)),
        "token_accuracy": correct / max(total, 1),
        "value_token_accuracy": {str(d): value_correct[d] / value_total[d] for d in distances if value_total[d]},
        "wrong_fact": {str(d): wrong_fact[d] / counts[d] for d in distances},
    }


def plot_recall(result: dict, path: str) -> None:
    """Recall vs distance, one line per system, chance as a dashed line; with a `paraphrase` set in `result` (the
    held-out-template set of `scripts/eval_memory.py`) its recall beside it, dotted, in the same colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    paraphrase = result.get("paraphrase") or {}
    for key, label in (("recall", "RxT (memory)"), ("recall_memory_reset", "RxT, memory reset every turn"),
                       ("recall_stateless", "stateless, current query"), ("recall_full_history", "stateless, full history")):  # fmt: skip
        colour = None
        for source, style, suffix in ((result, "-", ""), (paraphrase, ":", ", held-out templates")):
            if source.get(key):
                xs = sorted(source[key], key=int)
                line = ax.plot([int(x) for x in xs], [source[key][x] for x in xs], marker="o", linestyle=style,
                               color=colour, label=label + (suffix if paraphrase else ""))  # fmt: skip
                colour = line[0].get_color()
    ax.axhline(result["chance"], color="grey", linestyle="--", label="chance")
    ax.set_xlabel("distance (turns between fact and question)")
    ax.set_ylabel("recall of the stated value")
    ax.set_ylim(-0.02, 1.02)
    title = f"Memory evaluation ({result['n_dialogues']} dialogues"
    title += f" + {paraphrase['n_dialogues']} in held-out templates)" if paraphrase else ")"
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

#!/usr/bin/env python
"""MRL evidence: reward, retention and recall of a model before and after MRL on held-out episodes, paired.

    python scripts/eval_mrl.py --before runs/quickstart/model --after runs/mrl/model --reward_data episodes.jsonl \
        --recall_data dialogues_test.jsonl --idf_data dialogues_train.jsonl --reward_ceiling true \
        --output runs/mrl/eval.json [MRLConfig reward flags, --curriculum 4]

Three measurements per model, all greedy and with memory written from the model's own answers (teacher forcing is
switched off here whatever the MRL flags say):

* **Reward** on `--reward_data`: the MRL rollout (`MRLTrainer.rollout`: turn 0 written to memory as given, then the
  last curriculum stage's step count of follow-ups, each answered and written) scored by the configured MRL reward
  (`reward_*`, the same number as `MRLTrainer.evaluate`) and by the retention term alone (`retention_*`, module
  docstring of `trainers.mrl_reward`; IDF from `--idf_data`, default the reward episodes). `--reward_ceiling` adds the
  same two scores of the reference answers and of the references in the generator's other template
  (`trainers.synthetic.other_template`) and their means `reward_ceiling` / `retention_ceiling`: what a policy that
  recalls every value can expect, since the references draw one of two templates at random. `*_gain_share` =
  `(after - before) / (ceiling - before)`: the share of the room that MRL took (None when there is no room).
* **Recall** on `--recall_data` with `trainers.memory_eval.evaluate_system` (`recall_before` / `recall_after`; the model
  also answers turn 0 there); off with `--memory_eval false`.
* **Paired** (`paired`, on `--recall_data`): one rollout over every turn of each dialogue per model (turn 0 written as
  given, every later turn answered in at most `--max_new_tokens` tokens and written with the generated answer; every
  turn scored in `multi_step` mode). From the same answers: recall per distance (a probe is recalled when its value
  appears in its turn's answer, `trainers.memory_eval.recalled`), each dialogue's recall over its probes at distances
  2-8 and at distance 1, its mean reward and retention over its turns; the before/after differences over the same
  dialogues with a 95 % paired-bootstrap interval (`trainers.bootstrap.paired_bootstrap`); with `--reward_ceiling`
  the ceilings and gain shares on these dialogues.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from modeling_rxt.tokenization_rxt import check_rxt_tokenizer  # noqa: E402
from trainers.bootstrap import paired_bootstrap  # noqa: E402
from trainers.cli import parse_arguments  # noqa: E402
from trainers.data import check_rows, iter_json_rows, load_rows, validate_rows  # noqa: E402
from trainers.memory_eval import evaluate_system, recalled  # noqa: E402
from trainers.mrl_config import MRLConfig  # noqa: E402
from trainers.mrl_reward import MRLReward, episode_idf, retention_context, retention_score  # noqa: E402
from trainers.mrl_trainer import MRLCollator, MRLTrainer  # noqa: E402
from trainers.synthetic import other_template  # noqa: E402

FAR = range(2, 9)  # the distances of the paired mean recall


@dataclass
class MRLEvalArguments:
    before: str = field(metadata={"help": "Model folder before MRL."})
    after: str = field(metadata={"help": "Model folder after MRL."})
    reward_data: str = field(metadata={"help": "Held-out episode rows (JSONL) for the reward."})
    recall_data: str | None = field(default=None, metadata={"help": "Held-out dialogues with probes (recall)."})
    idf_data: str | None = field(
        default=None, metadata={"help": "Training episodes for the retention term's IDF (default: --reward_data)."}
    )
    output: str = field(default="runs/mrl/eval.json", metadata={"help": "JSON output."})
    recall_batch_size: int = field(default=50, metadata={"help": "Dialogues evaluated together."})
    max_new_tokens: int = field(default=40, metadata={"help": "Answer length limit of the recall evaluations."})
    reward_ceiling: bool = field(
        default=False,
        metadata={"help": "Also score the references and their other template (synthetic data): the reward's ceiling."},
    )
    memory_eval: bool = field(
        default=True, metadata={"help": "Also run trainers.memory_eval.evaluate_system (recall_before/after)."}
    )
    paired: bool = field(default=True, metadata={"help": "Paired evaluation on --recall_data (the `paired` block)."})
    bootstrap_resamples: int = field(default=10_000, metadata={"help": "Paired-bootstrap resamples."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Paired-bootstrap seed."})


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Id lists -> ``[B, max len]`` right-padded with ``pad``."""
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(row, dtype=torch.long) for row in rows], batch_first=True,
                                           padding_value=pad)  # fmt: skip


def _other_template_rows(rows: list[dict]) -> list[dict]:
    return [{**row, "answer": other_template(row["answer"]),
             "interactions": [{**turn, "answer": other_template(turn["answer"])} for turn in row["interactions"]]}
            for row in rows]  # fmt: skip


@torch.no_grad()
def rollout_scores(trainer: MRLTrainer, rows: list[dict], steps: int | None, batch_size: int, answers=None) -> dict:
    """Greedy rollouts of `rows` (`steps` follow-ups; None = every turn of each batch), memory written from the
    generated answers. `answers`: `"references"` or `"other_template"` scores those fixed answers instead.
    Returns per episode `reward` and `retention` (means over its answered turns, None without any), the per-turn sums
    (`reward_sum`, `retention_sum`, `turns`, `reward_per_step`) and per episode the answer texts per follow-up."""
    collator, tokenizer, ids = trainer.data_collator, trainer.processing_class, trainer.ids
    pad, eos = ids["pad_token_id"], ids["eos_token_id"]
    reward_fn = trainer.reward_fn
    saved = {name: getattr(trainer, name) for name in ("steps", "teacher_forcing", "strategy", "reset_ratio")}
    delayed = trainer.args.delayed_final_reward
    out = {"reward": [], "retention": [], "texts": [], "reward_sum": 0.0, "retention_sum": 0.0, "turns": 0,
           "reward_per_step": {}}  # fmt: skip
    per_step = {}
    try:
        trainer.teacher_forcing, trainer.reset_ratio = False, 1.0
        if steps is None:  # every turn of dialogues of different lengths: one reward mode, no final-step extra
            trainer.strategy, trainer.args.delayed_final_reward = "multi_step", False
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            episodes = collator(chunk)["episodes"]
            trainer.steps = steps if steps is not None else max(1, max(len(e) for e in episodes) - 1)
            fixed = None
            if answers is not None:
                source = episodes if answers == "references" else collator(_other_template_rows(chunk))["episodes"]
                table = {id(e): [a for _, a in s[1:]] for e, s in zip(episodes, source)}
                fixed = lambda episode, table=table: table[id(episode)]  # noqa: E731
            trainer._carry_stm = None
            rollout = trainer.rollout(episodes, greedy=True, answers=fixed)
            batch, n_steps = rollout["turn_mask"].shape
            qa, action = rollout["qa_ids"], rollout["action_mask"].bool()  # [B, N, T]
            positions = torch.arange(qa.shape[-1], device=qa.device)
            generated = qa.masked_fill(~action | (qa == eos), pad).flatten(0, 1)  # the answers without [EOS]
            query = qa.masked_fill(positions >= rollout["prompt_len"][..., None], pad).flatten(0, 1)
            reference = _padded([e[s + 1][1] if len(e) > s + 1 else [] for e in episodes for s in range(n_steps)], pad)
            context = _padded([row for s in range(n_steps) for row in retention_context(episodes, s, pad)], pad)
            context = context.view(n_steps, batch, -1).transpose(0, 1).flatten(0, 1)  # episode-major like the rest
            retention = retention_score(generated, reference.to(qa.device), context.to(qa.device), reward_fn.idf, pad,
                                        trainer.args.retention_max_n, query).view(batch, n_steps)  # fmt: skip
            mask = rollout["turn_mask"].bool()
            rewards = rollout["rewards"].float()
            for values, key in ((rewards, "reward"), (retention, "retention")):
                count = mask.sum(1)
                means = (values * mask).sum(1) / count.clamp(min=1)
                out[key] += [m if c else None for m, c in zip(means.tolist(), count.tolist())]
                out[f"{key}_sum"] += (values * mask).sum().item()
            out["turns"] += int(mask.sum().item())
            for s in range(n_steps):
                total, count = per_step.get(s, (0.0, 0))
                per_step[s] = (total + rewards[:, s][mask[:, s]].sum().item(), count + int(mask[:, s].sum().item()))
            texts = tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
            out["texts"] += [texts[b * n_steps : (b + 1) * n_steps] for b in range(batch)]
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
        trainer.args.delayed_final_reward = delayed
    out["reward_per_step"] = {str(s): total / count for s, (total, count) in sorted(per_step.items()) if count}
    return out


def probe_hits(rows: list[dict], texts: list[list[str]]) -> list[dict[int, list[bool]]]:
    """Per dialogue `{distance: [recalled?, ...]}` of its probes (turn k is answered at rollout step k - 1)."""
    hits = []
    for row, answers in zip(rows, texts):
        by_distance: dict[int, list[bool]] = {}
        for probe in row["probes"]:
            hit = recalled(probe["expected"], answers[probe["turn"] - 1])
            by_distance.setdefault(probe["distance"], []).append(hit)
        hits.append(by_distance)
    return hits


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def gain_share(before: float, after: float, ceiling: float) -> float | None:
    """`(after - before) / (ceiling - before)`: the share of the room taken; None when there is no room."""
    return (after - before) / (ceiling - before) if ceiling > before else None


def paired_change(before: list[float | None], after: list[float | None], options: MRLEvalArguments) -> dict:
    """Mean after - before over the items that have both values, with its 95 % paired-bootstrap interval."""
    pairs = [(b, a) for b, a in zip(before, after) if b is not None and a is not None]
    if not pairs:
        return {"mean": None, "ci95": None, "n": 0}
    mean, low, high = paired_bootstrap([b for b, _ in pairs], [a for _, a in pairs], options.bootstrap_resamples,
                                       options.bootstrap_seed)  # fmt: skip
    return {"mean": mean, "ci95": [low, high], "n": len(pairs)}


def distance_recall(hits: list[dict[int, list[bool]]], distances) -> list[float | None]:
    """Each dialogue's recall over its probes at `distances` (None when it has none)."""
    out = []
    for by_distance in hits:
        flags = [h for d in distances for h in by_distance.get(d, [])]
        out.append(sum(flags) / len(flags) if flags else None)
    return out


def measure(model_dir: str, args: MRLConfig, options: MRLEvalArguments, reward_rows, recall_rows, idf,
            ceiling: bool = False) -> dict:  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    trainer = MRLTrainer(model=model, args=args, processing_class=tokenizer, eval_dataset=reward_rows,
                         data_collator=MRLCollator(tokenizer, args.max_length))  # fmt: skip
    trainer.set_epoch(sum(stage.epochs for stage in args.curriculum_stages) - 1)
    trainer.reward_fn = MRLReward(args, model.get_input_embeddings(), trainer.ids["pad_token_id"], idf=idf)
    batch = args.per_device_eval_batch_size
    scores = rollout_scores(trainer, reward_rows, trainer.steps, batch)
    result = {"reward": scores["reward_sum"] / max(scores["turns"], 1), "reward_per_step": scores["reward_per_step"],
              "retention": scores["retention_sum"] / max(scores["turns"], 1)}  # fmt: skip
    if ceiling:
        for name in ("references", "other_template"):
            fixed = rollout_scores(trainer, reward_rows, trainer.steps, batch, answers=name)
            result[f"reward_{name}"] = fixed["reward_sum"] / max(fixed["turns"], 1)
            result[f"retention_{name}"] = fixed["retention_sum"] / max(fixed["turns"], 1)
    if recall_rows is not None and options.memory_eval:
        measured = evaluate_system(model.eval(), tokenizer, recall_rows, "memory",
                                   batch_size=options.recall_batch_size, max_new_tokens=options.max_new_tokens)  # fmt: skip
        result["recall"] = measured["recall"]
    if recall_rows is not None and options.paired:
        trainer.args.max_completion_length, length = options.max_new_tokens, trainer.args.max_completion_length
        try:
            paired = rollout_scores(trainer, recall_rows, None, options.recall_batch_size)
            result["paired"] = {"reward": paired["reward"], "retention": paired["retention"],
                                "hits": probe_hits(recall_rows, paired["texts"])}  # fmt: skip
            if ceiling:
                for name in ("references", "other_template"):
                    fixed = rollout_scores(trainer, recall_rows, None, options.recall_batch_size, answers=name)
                    result["paired"][f"reward_{name}"] = _mean(fixed["reward"])
                    result["paired"][f"retention_{name}"] = _mean(fixed["retention"])
        finally:
            trainer.args.max_completion_length = length
    return result


def paired_report(before: dict, after: dict, options: MRLEvalArguments) -> dict:
    """The `paired` block of eval.json from the two models' paired measurements (module docstring)."""
    report = {"n_dialogues": len(before["hits"])}
    counts, recall = {}, {"before": {}, "after": {}}
    for name, side in (("before", before), ("after", after)):
        totals: dict[int, list[int]] = {}
        for by_distance in side["hits"]:
            for d, flags in by_distance.items():
                total = totals.setdefault(d, [0, 0])
                total[0], total[1] = total[0] + sum(flags), total[1] + len(flags)
        recall[name] = {str(d): h / n for d, (h, n) in sorted(totals.items())}
        counts = {str(d): n for d, (_, n) in sorted(totals.items())}
    report.update(recall_before=recall["before"], recall_after=recall["after"], counts=counts)
    for label, distances in (("d2_8", FAR), ("d1", (1,))):
        b, a = distance_recall(before["hits"], distances), distance_recall(after["hits"], distances)
        report[f"recall_{label}_before"], report[f"recall_{label}_after"] = _mean(b), _mean(a)
        report[f"recall_{label}_change"] = paired_change(b, a, options)
    for term in ("reward", "retention"):
        report[f"{term}_before"], report[f"{term}_after"] = _mean(before[term]), _mean(after[term])
        report[f"{term}_change"] = paired_change(before[term], after[term], options)
        if f"{term}_references" in before:
            references, other = before[f"{term}_references"], before[f"{term}_other_template"]
            ceiling = (references + other) / 2
            report.update({f"{term}_references": references, f"{term}_other_template": other,
                           f"{term}_ceiling": ceiling,
                           f"{term}_gain_share": gain_share(report[f"{term}_before"], report[f"{term}_after"],
                                                            ceiling)})  # fmt: skip
    return report


def main(argv=None) -> dict:
    options, args = parse_arguments((MRLEvalArguments, MRLConfig), argv)
    args.beta = 0.0  # evaluation needs no reference model
    # dict rows, checked before any model loads: sliced into batches, rewritten for the ceiling
    reward_rows = list(validate_rows(load_rows(options.reward_data), kind="episode"))
    recall_rows = None
    if options.recall_data:
        recall_rows = check_rows(iter_json_rows(options.recall_data), "evaluation", options.recall_data)
    idf_rows = list(validate_rows(load_rows(options.idf_data), kind="episode")) if options.idf_data else reward_rows
    tokenizer = AutoTokenizer.from_pretrained(options.before)
    special = [i for i in check_rxt_tokenizer(tokenizer).values() if i is not None]
    idf = episode_idf(MRLCollator(tokenizer, args.max_length)(idf_rows)["episodes"], len(tokenizer), special)
    before = measure(options.before, args, options, reward_rows, recall_rows, idf, ceiling=options.reward_ceiling)
    after = measure(options.after, args, options, reward_rows, recall_rows, idf)
    result = {"reward_before": before["reward"], "reward_after": after["reward"],
              "reward_relative_change": (after["reward"] - before["reward"]) / max(abs(before["reward"]), 1e-12),
              "reward_per_step_before": before["reward_per_step"], "reward_per_step_after": after["reward_per_step"],
              "retention_before": before["retention"], "retention_after": after["retention"],
              "recall_before": before.get("recall", {}), "recall_after": after.get("recall", {}),
              "n_reward_episodes": len(reward_rows), "n_recall_dialogues": len(recall_rows or [])}  # fmt: skip
    if options.reward_ceiling:  # with the embedding of the model before MRL
        for term in ("reward", "retention"):
            references, other = before[f"{term}_references"], before[f"{term}_other_template"]
            result.update({f"{term}_references": references, f"{term}_other_template": other,
                           f"{term}_ceiling": (references + other) / 2})  # fmt: skip
            result[f"{term}_gain_share"] = gain_share(result[f"{term}_before"], result[f"{term}_after"],
                                                      result[f"{term}_ceiling"])  # fmt: skip
    if "paired" in before:
        result["paired"] = paired_report(before["paired"], after["paired"], options)
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Hub model cards (`README.md` with YAML metadata) for the model folders the training scripts and the quickstart save.

    write_model_card(output_dir, trainer=trainer)                  # after a stage (trainers/cli.py)
    write_model_card(model_dir, training=..., evaluation=result)    # after the quickstart's memory evaluation

The card's metadata is built with `huggingface_hub.ModelCardData` (library, tags, pipeline, license, base model,
`model-index` results when an evaluation ran); its usage code loads that folder. A `README.md` in the folder that
this module did not write is left alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

MARKER = "<!-- model card written by trainers/model_card.py -->"
LICENSE = "apache-2.0"
BASE_TAGS = ["rxt", "reactive-transformer", "custom_code"]

# trainer class -> (what it trains, tag)
STAGES = {
    "JointLMTrainer": ("joint LM pre-training / interaction SFT (curriculum stages 1-2)", "joint-lm"),
    "MemoryAttentionTrainer": ("memory-attention pre-training (curriculum stage 3)", "memory-attention-pretraining"),
    "SupervisedMemoryAwareTrainer": ("supervised memory-aware training, SMAT (curriculum stage 4)", "smat"),
    "MRLTrainer": ("Memory Reinforcement Learning, IMPO (curriculum stage 5)", "mrl"),
    "DMPOTrainer": ("DMPO: preference optimisation with memory", "dmpo"),
}

RXT_USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_rxt import RxTChatSession  # the chat session (the model itself loads without the package)

model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("{path}")

# one conversation: each turn is answered, then written into the Short-Term Memory
chat = RxTChatSession(model, tokenizer)
print(chat.interact("{fact}"))
print(chat.interact("{question}"))  # answered from memory
chat.save("conversation.safetensors")  # the conversation's STM, bit-exact
```'''

STATELESS_USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("{path}")

prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "{question}"}}], add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**prompt, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def _is_hub_id(name) -> bool:
    """A Hub repo id (`owner/name`), not a local folder: only those are valid `base_model` / `datasets` metadata."""
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "/")):
        return False
    return not Path(name).exists()


def _architecture(config: dict) -> list[tuple[str, str]]:
    decoder = config.get("decoder_config", {})
    heads = f"{decoder.get('att_heads')} heads, self-attention {decoder.get('self_att_type', 'mha')}"
    rows = [("decoder", f"{decoder.get('num_layers')} layers, dim {decoder.get('embed_dim')}, {heads}")]
    if config.get("model_type") == "rxt":
        encoder = config.get("encoder_config", {})
        memory = config.get("memory_attention_config", {})
        rows += [
            ("memory cross-attention", decoder.get("cross_att_type", "mha")),
            ("memory encoder", f"{encoder.get('num_layers')} layers, self-attention {encoder.get('self_att_type')}"),
            ("memory attention", f"{config.get('memory_attention_variant')}, {memory.get('att_type')}, gates "
                                 f"{memory.get('residual_gate_type', 'static')}"),
            ("Short-Term Memory", f"{memory.get('num_layers')} layers x {memory.get('stm_size')} slots x "
                                  f"{memory.get('embed_dim')}"),
        ]  # fmt: skip
    rows.append(("vocabulary", str(decoder.get("vocab_size"))))
    return rows


def _training_rows(trainer=None, training: dict | None = None) -> list[tuple[str, str]]:
    rows = []
    if trainer is not None:
        name = type(trainer).__name__
        rows.append(("stage", f"{STAGES.get(name, (name,))[0]} (`{name}`)"))
        rows.append(("optimizer steps", str(trainer.state.global_step)))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if losses:
            rows.append(("last logged loss", f"{losses[-1]:.4g}"))
        args = trainer.args
        rows.append(("batch size per device", str(args.per_device_train_batch_size)))
        rows.append(("learning rate", f"{args.learning_rate:g} ({args.lr_scheduler_type})"))
    for key, value in (training or {}).items():
        rows.append((str(key), _format(value)))
    return rows


def _format(value) -> str:
    """A table cell: the quickstart's `{stage: {"steps", "last_log"}}` as "1_smat: 1500 steps (loss 0.07); ..."."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) and "steps" in v for v in value.values()):
        parts = []
        for name, result in value.items():
            loss = (result.get("last_log") or {}).get("loss")
            parts.append(f"{name}: {result['steps']} steps" + (f" (loss {loss:.4g})" if loss is not None else ""))
        return "; ".join(parts)
    return value if isinstance(value, str) else json.dumps(value)


def _evaluation(config: dict, evaluation: dict | None) -> tuple[dict, str | None]:
    """The recall by distance that belongs to this folder's model: its own, or the stateless baseline's."""
    if not evaluation:
        return {}, None
    key = "recall_stateless" if config.get("model_type") == "rxt_stateless" else "recall"
    return {str(d): float(v) for d, v in (evaluation.get(key) or {}).items()}, key


def write_model_card(
    folder, trainer=None, training: dict | None = None, evaluation: dict | None = None, model_name: str | None = None
) -> Path | None:
    """Write `folder/README.md`, a Hub model card for the model saved in `folder` (its `config.json` must exist).

    Parameters:
        folder: the saved model folder (`save_pretrained` output with the tokenizer).
        trainer: the `Trainer` that trained it (stage, steps, last loss, batch size and learning rate go on the card).
        training: more `name -> value` rows for the training table (e.g. the quickstart's preset and stages).
        evaluation: a `scripts/eval_memory.py` result (`recall` by distance, `recall_memory_reset`,
            `recall_stateless`, `n_dialogues`, `chance`); it becomes the card's `model-index` and a results table.
        model_name: the card's title (default: the folder's name).

    Returns the card's path, or None when `folder/README.md` exists and was not written by this module (it is kept).
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"write_model_card: {config_file} not found; expected a folder written by save_pretrained.")
    card_file = folder / "README.md"
    if card_file.is_file() and MARKER not in card_file.read_text(encoding="utf-8"):
        logger.warning("%s exists and was not written by trainers/model_card.py; leaving it unchanged.", card_file)
        return None
    config = json.loads(config_file.read_text())
    stateless = config.get("model_type") == "rxt_stateless"
    name = model_name or folder.resolve().name
    recall, recall_key = _evaluation(config, evaluation)
    dataset = "held-out synthetic dialogues (trainers.synthetic, values disjoint from training)"
    results = [
        EvalResult(task_type="text-generation", task_name="fact recall across turns",
                   dataset_type="synthetic-dialogues", dataset_name=dataset, metric_type="recall",
                   metric_name=f"recall at distance {d}", metric_config=f"distance={d}", metric_value=round(value, 4))
        for d, value in sorted(recall.items(), key=lambda item: int(item[0]))
    ]  # fmt: skip
    base = getattr(getattr(trainer, "model", None), "name_or_path", None) if trainer is not None else None
    stage_tag = STAGES.get(type(trainer).__name__, (None, None))[1] if trainer is not None else None
    tags = BASE_TAGS + (["stateless-baseline"] if stateless else ["short-term-memory"])
    tags += [stage_tag] if stage_tag else []
    data = ModelCardData(
        library_name="transformers", license=LICENSE, pipeline_tag="text-generation", tags=tags, model_name=name,
        base_model=base if _is_hub_id(base) else None, eval_results=results or None,
    )  # fmt: skip

    path = str(folder)
    if stateless:
        intro = ("A stateless decoder of the same size as an RxT model (`RxTStatelessForCausalLM`): it sees only the "
                 "current query, with no memory; the baseline RxT's memory is measured against.")  # fmt: skip
        usage = STATELESS_USAGE.format(path=path, question="What is my cat called?")
    else:
        intro = ("A Reactive Transformer (RxT): a stateful, event-driven language model. The decoder answers each "
                 "query alone, reading a fixed-size Short-Term Memory (STM) through memory cross-attention; after the "
                 "answer, a memory encoder and a memory-attention network write the interaction into the "
                 "STM.")  # fmt: skip
        usage = RXT_USAGE.format(path=path, fact="My cat is called Brindle.", question="What is my cat called?")
    lines = [f"# {name}", "", MARKER, "", intro, "", "## Usage", "",
             "Loads with `trust_remote_code=True` (the folder carries its modeling files).", "", usage, "",
             "## Architecture", "", "| | |", "|---|---|"]  # fmt: skip
    lines += [f"| {key} | {value} |" for key, value in _architecture(config)]
    training_rows = _training_rows(trainer, training)
    if training_rows:
        lines += ["", "## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in training_rows]
    if recall:
        distances = sorted(recall, key=int)
        lines += ["", "## Evaluation", "",
                  f"Recall of a stated fact in the generated answer, by distance in turns between the fact and the "
                  f"question, on {evaluation.get('n_dialogues', '?')} {dataset} (chance "
                  f"{evaluation.get('chance', float('nan')):.3f}).", "",
                  "| | " + " | ".join(f"d = {d}" for d in distances) + " |",
                  "|---|" + "---|" * len(distances)]  # fmt: skip
        systems = [(recall_key, "this model")]
        if not stateless:
            systems += [("recall_memory_reset", "memory reset every turn"), ("recall_stateless", "stateless baseline")]
        for key, label in systems:
            values = evaluation.get(key) or {}
            if values:
                cells = " | ".join(f"{float(values.get(d, float('nan'))):.2f}" for d in distances)
                lines.append(f"| {label} | {cells} |")
    lines += ["", "## Citation", "", "```bibtex", "@article{filipek2025rxt,",
              "  title   = {Reactive Transformer (RxT) -- Stateful Real-Time Processing for Event-Driven Reactive "
              "Language Models},", "  author  = {Filipek, Adam},", "  journal = {arXiv preprint arXiv:2510.03561},",
              "  year    = {2025}", "}", "```", ""]  # fmt: skip
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(card_file)
    return card_file

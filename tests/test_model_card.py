"""Model cards (`trainers/model_card.py`): the README.md the training scripts and the quickstart write into a saved
model folder is a Hub card — its YAML parses, carries the Hub fields (and `model-index` results when an evaluation
ran) — and its usage code runs against that folder. A README.md the user wrote is never overwritten."""

import json
import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from modeling_rxt import RxTConfig, RxTForCausalLM, RxTStatelessConfig, RxTStatelessForCausalLM
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
from trainers.model_card import MARKER, write_model_card
from trainers.synthetic import generate_dialogues, write_jsonl

EVALUATION = {"recall": {"1": 0.88, "2": 0.75, "4": 0.51}, "recall_memory_reset": {"1": 0.0, "2": 0.0, "4": 0.0},
              "recall_stateless": {"1": 0.01, "2": 0.0, "4": 0.0}, "chance": 0.005, "n_dialogues": 1000}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"my cat is called brindle {i} and what is my cat called number {i * 7}" for i in range(200)]
    return train_rxt_tokenizer(texts, vocab_size=300, min_frequency=1)


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def front_matter(card_file) -> dict:
    text = card_file.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "a Hub model card starts with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1))


def run_usage(card_file, workdir, monkeypatch) -> dict:
    blocks = re.findall(r"^```python\n(.*?)^```", card_file.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert len(blocks) == 1
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__card__"}
    exec(compile(blocks[0], str(card_file), "exec"), namespace)
    return namespace


def test_rxt_card_with_evaluation(tokenizer, tmp_path, monkeypatch):
    torch.manual_seed(0)
    folder = save(RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer))), tokenizer, tmp_path / "model")
    card_file = write_model_card(folder, training={"preset": "quickstart", "stages": {"1_smat": {"steps": 3,
                                 "last_log": {"loss": 1.25}}}}, evaluation=EVALUATION)  # fmt: skip
    meta = front_matter(card_file)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"rxt", "reactive-transformer", "short-term-memory"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    metrics = [metric for result in results for metric in result["metrics"]]
    assert sorted((m["config"], m["value"]) for m in metrics) == [("distance=1", 0.88), ("distance=2", 0.75),
                                                                  ("distance=4", 0.51)]  # fmt: skip
    card = ModelCard.load(card_file)  # huggingface_hub reads the model-index back
    assert len(card.data.eval_results) == 3 and card.data.eval_results[0].metric_type == "recall"
    text = card_file.read_text()
    assert "1_smat: 3 steps (loss 1.25)" in text and "| memory reset every turn | 0.00 | 0.00 | 0.00 |" in text
    namespace = run_usage(card_file, tmp_path, monkeypatch)
    assert (tmp_path / "conversation.safetensors").is_file()
    assert namespace["chat"].stm.shape == namespace["model"].initial_stm(1).shape


def test_stateless_card_reports_the_baselines_recall(tokenizer, tmp_path, monkeypatch):
    config = RxTStatelessConfig.from_rxt_config(RxTConfig.tiny(vocab_size=len(tokenizer)))
    folder = save(RxTStatelessForCausalLM(config), tokenizer, tmp_path / "baseline")
    card_file = write_model_card(folder, training={"steps": 10}, evaluation=EVALUATION)
    meta = front_matter(card_file)
    assert "stateless-baseline" in meta["tags"]
    values = [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert sorted(values) == [0.0, 0.0, 0.01]  # recall_stateless, not the RxT model's recall
    namespace = run_usage(card_file, tmp_path, monkeypatch)
    assert namespace["output"].shape[1] > namespace["prompt"]["input_ids"].shape[1]


def test_stage_script_writes_a_card_without_results(tokenizer, tmp_path, monkeypatch):
    """Every stage script saves through `trainers.cli.train_and_save`, which writes the card: stage, steps, loss;
    no `model-index` without an evaluation."""
    import train_smat

    tokenizer.save_pretrained(tmp_path / "tok")
    write_jsonl(generate_dialogues(8, seed=9, max_turns=3), tmp_path / "rows.jsonl")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({k: config[k] for k in ("decoder_config", "encoder_config",
                                                                             "memory_attention_config")}))  # fmt: skip
    out = tmp_path / "smat"
    train_smat.main(["--model_config", str(tmp_path / "config.json"), "--tokenizer_name_or_path", str(tmp_path / "tok"),
                     "--train_file", str(tmp_path / "rows.jsonl"), "--output_dir", str(out), "--max_steps", "2",
                     "--report_to", "none", "--save_strategy", "no", "--use_cpu", "True",
                     "--per_device_train_batch_size", "2", "--disable_tqdm", "True",
                     "--logging_steps", "1"])  # fmt: skip
    meta = front_matter(out / "README.md")
    assert "smat" in meta["tags"] and "model-index" not in meta and "base_model" not in meta
    text = (out / "README.md").read_text()
    assert "`SupervisedMemoryAwareTrainer`" in text and "| optimizer steps | 2 |" in text
    run_usage(out / "README.md", tmp_path, monkeypatch)


def test_a_users_readme_is_kept(tokenizer, tmp_path):
    folder = save(RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer))), tokenizer, tmp_path / "model")
    (folder / "README.md").write_text("# my notes\n")
    assert write_model_card(folder, evaluation=EVALUATION) is None
    assert (folder / "README.md").read_text() == "# my notes\n"
    (folder / "README.md").write_text(f"# old card\n{MARKER}\n")  # a card this module wrote is replaced
    assert write_model_card(folder) == folder / "README.md"
    assert "model-index" not in front_matter(folder / "README.md")


def test_a_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        write_model_card(tmp_path)


def test_quickstart_cards_carry_the_recall_it_measured(tmp_path, monkeypatch):
    """`scripts/quickstart.py` (micro preset): the model and the stateless baseline get cards whose `model-index` is
    the recall in `memory_eval.json` (each its own), and whose usage code runs against the folder."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "quickstart.py"), "--preset", "micro", "--output-dir",
               str(tmp_path / "qs")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "qs" / "memory_eval.json").read_text())
    for folder, key in (("model", "recall"), ("baseline_stateless", "recall_stateless")):
        card_file = tmp_path / "qs" / folder / "README.md"
        metrics = [m for r in front_matter(card_file)["model-index"][0]["results"] for m in r["metrics"]]
        assert {m["config"]: m["value"] for m in metrics} == {
            f"distance={d}": round(v, 4) for d, v in evaluation[key].items()}
        assert "| preset | micro |" in card_file.read_text()
        run_usage(card_file, tmp_path, monkeypatch)

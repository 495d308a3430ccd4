"""Reliability of the training side: an interrupted run resumes exactly, no script deletes a folder it did not
create, and bad data files stop with the file, the line, the problem and the expected form, before any training or
evaluation starts."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from modeling_rxt import RxTConfig
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
from trainers.data import load_rows, validate_rows
from trainers.synthetic import generate_dialogues, generate_pretrain, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return train_rxt_tokenizer([row["text"] for row in generate_pretrain(300, seed=3)], vocab_size=400, min_frequency=1)


@pytest.fixture
def stage_files(tokenizer, tmp_path):
    """A saved tokenizer and a tiny model config, as the stage scripts take them."""
    tokenizer.save_pretrained(tmp_path / "tok")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    fields = {k: config[k] for k in ("decoder_config", "encoder_config", "memory_attention_config")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return ["--model_config", str(tmp_path / "config.json"), "--tokenizer_name_or_path", str(tmp_path / "tok"),
            "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True", "--per_device_train_batch_size",
            "2", "--seed", "0"]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Never delete user data

MICRO_PRESET = (REPO_ROOT / "scripts" / "presets" / "micro.json").read_text()


@pytest.fixture(autouse=True)
def deletion_only_inside(tmp_path, monkeypatch):
    """`shutil.rmtree` deletes only inside this test's folder: a script without the output-folder guard fails these
    tests instead of deleting the repository, the home folder or `/`."""
    import shutil

    real_rmtree = shutil.rmtree

    def guarded(path, *args, **kwargs):
        if not Path(path).resolve().is_relative_to(tmp_path.resolve()):
            raise AssertionError(f"the script tried to delete {path}")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", guarded)


def failing_preset(tmp_path):
    """The micro preset with data arguments that fail right after the output folder is prepared (no training)."""
    preset = json.loads(MICRO_PRESET)
    preset["data"] = {"no_such_argument": 1}
    path = tmp_path / "failing.json"
    path.write_text(json.dumps(preset))
    return str(path)


def user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    return path


def test_quickstart_keeps_a_folder_it_did_not_create(tmp_path):
    import quickstart

    folder = user_folder(tmp_path / "mine")
    with pytest.raises(ValueError, match=r"--output-dir .*mine.* not created by an RxT script .* new or empty folder"):
        quickstart.main(["--preset", failing_preset(tmp_path), "--output-dir", str(folder)])
    assert (folder / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_quickstart_refuses_a_user_mrl_output_dir_before_training(tmp_path):
    import quickstart

    folder = user_folder(tmp_path / "mrl_mine")
    with pytest.raises(ValueError, match=r"--mrl-output-dir .*mrl_mine.* not created by an RxT script"):
        quickstart.main(["--preset", failing_preset(tmp_path), "--output-dir", str(tmp_path / "qs"), "--with-mrl",
                         "--mrl-output-dir", str(folder)])  # fmt: skip
    assert (folder / "notes.txt").read_text() == "my notes"
    assert not (tmp_path / "qs").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="would delete the model it starts from"):
        quickstart.main(["--preset", failing_preset(tmp_path), "--output-dir", str(tmp_path / "qs"), "--with-mrl",
                         "--mrl-output-dir", str(tmp_path / "qs")])  # fmt: skip


@pytest.mark.parametrize("where", ["working directory", "repository", "home folder", "filesystem root", "parent"])
def test_quickstart_never_clears_protected_folders(where, tmp_path, monkeypatch):
    import quickstart

    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(user_folder(tmp_path / "home")))
    target = {"working directory": ".", "repository": str(REPO_ROOT), "home folder": "~", "filesystem root": "/",
              "parent": str(tmp_path)}[where]  # fmt: skip
    expected = "a folder containing" if where == "parent" else where
    with pytest.raises(ValueError, match=f"--output-dir .* is (the |your ){{0,1}}{expected}"):
        quickstart.main(["--preset", failing_preset(tmp_path), "--output-dir", target])
    assert (work / "notes.txt").read_text() == "my notes" and (tmp_path / "home" / "notes.txt").is_file()
    assert (REPO_ROOT / "README.md").is_file()


def test_a_folder_a_script_created_is_cleared_on_the_next_run(tmp_path):
    import quickstart

    from trainers.cli import OUTPUT_MARKER

    folder = tmp_path / "qs"
    with pytest.raises(TypeError, match="no_such_argument"):  # the folder is made, then the data step fails
        quickstart.main(["--preset", failing_preset(tmp_path), "--output-dir", str(folder)])
    assert (folder / OUTPUT_MARKER).is_file()
    (folder / "stale.txt").write_text("an earlier run's output")
    with pytest.raises(TypeError, match="no_such_argument"):
        quickstart.main(["--preset", failing_preset(tmp_path), "--output-dir", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER]


def test_make_synthetic_data_refuses_a_folder_holding_other_files(tmp_path):
    import make_synthetic_data

    folder = user_folder(tmp_path / "data")
    (folder / "pretrain_train.jsonl").write_text('{"text": "my own corpus"}\n')
    with pytest.raises(ValueError, match=r"--output-dir .*data.* not created by an RxT script"):
        make_synthetic_data.main(["--output-dir", str(folder), "--num-train", "2", "--num-pretrain", "2"])
    assert (folder / "pretrain_train.jsonl").read_text() == '{"text": "my own corpus"}\n'
    written = make_synthetic_data.main(["--output-dir", str(tmp_path / "new"), "--num-train", "2", "--num-pretrain",
                                        "2", "--num-sft", "2", "--num-validation", "1", "--num-test", "1"])  # fmt: skip
    assert written["pretrain_train"].is_file()
    make_synthetic_data.main(["--output-dir", str(tmp_path / "new"), "--num-train", "2", "--num-pretrain", "2",
                              "--num-sft", "2", "--num-validation", "1", "--num-test", "1"])  # its own folder: rewritten


# --------------------------------------------------------------------------------------------------------------------
# Clear errors for data


BAD_FILES = {  # name: (bytes, expected message)
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"),
    "empty.jsonl": (b"", r"empty.jsonl is empty \(0 bytes\); expected one JSON object per line"),
    "blank.jsonl": (b"\n   \n\t\n", r"blank.jsonl holds only blank lines; expected one JSON object per line"),
    "broken.jsonl": (b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"broken.jsonl:3: not valid JSON \(Expecting ',' "
                     r"delimiter at column 13\); expected one JSON object per line"),
    "list.jsonl": (b'{"text": "a"}\n["a", "b"]\n', r"list.jsonl:2: a JSON list, expected a JSON object"),
    "rows.csv": (b"text\nhello\n", r"rows.csv: .csv files are not read as rows; expected a .jsonl file .*CSV cannot"),
    "array.json": (b'[{"text": "a"},\n {"text": "b",}]', r"array.json:2: not valid JSON"),
    "cut.parquet": (b"PAR1\x00\x00\x00", r"cut.parquet: not a Parquet file \(7 bytes, truncated or another format\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_rows_names_the_file_the_line_and_the_problem(name, tmp_path):
    content, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_rows(tmp_path / name)


def test_load_rows_reads_a_byte_order_mark_and_a_json_array(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"}\n')
    (tmp_path / "array.json").write_text('[{"text": "a"},\n {"text": "b"}]')
    assert load_rows(tmp_path / "bom.jsonl")["text"] == ["a", "b"]
    assert load_rows(tmp_path / "array.json")["text"] == ["a", "b"]


def test_a_stage_script_names_the_bad_file_before_training(stage_files, tmp_path):
    import train_joint

    (tmp_path / "corpus.jsonl").write_bytes(b'{"text": "a b c"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not UTF-8"):
        train_joint.main(stage_files + ["--train_file", str(tmp_path / "corpus.jsonl"), "--output_dir",
                                        str(tmp_path / "out"), "--max_steps", "1"])  # fmt: skip
    write_jsonl([{"text": "a b c"}, {"text": "  "}], tmp_path / "blank_row.jsonl")
    with pytest.raises(ValueError, match=r"blank_row.jsonl: invalid text row 1: field 'text': empty .* such as "
                                         r'\{"text": "..."\}'):  # fmt: skip
        train_joint.main(stage_files + ["--train_file", str(tmp_path / "blank_row.jsonl"), "--output_dir",
                                        str(tmp_path / "out"), "--max_steps", "1"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def rows_without_distance(count=8):
    rows = generate_dialogues(count, seed=5, min_turns=3, max_turns=4)
    for row in rows:
        for probe in row["probes"]:
            del probe["distance"]
    return rows


def test_probes_without_distance_are_refused_by_the_validator():
    with pytest.raises(ValueError, match=r"row 0: field 'probes\[0\]\.distance': missing; expected the turns between"):
        validate_rows(rows_without_distance(), kind="episode")
    rows = generate_dialogues(4, seed=5, min_turns=3, max_turns=4)
    rows[1]["probes"][0]["distance"] = rows[1]["probes"][0]["turn"] + 1  # the fact would lie before turn 0
    with pytest.raises(ValueError, match=r"row 1: field 'probes\[0\]\.distance': got \d+; expected .* in \[1, turn="):
        validate_rows(rows, kind="episode")
    assert len(validate_rows(generate_dialogues(4, seed=5), kind="evaluation")) == 4


def test_smat_refuses_probes_without_distance_before_training(stage_files, tmp_path):
    """The 'probe' window reads each probe's distance: a row without one fails in the validator, not mid-training."""
    import train_smat

    write_jsonl(rows_without_distance(), tmp_path / "episodes.jsonl")
    with pytest.raises(ValueError, match=r"episodes.jsonl: invalid episode row 0: field 'probes\[0\]\.distance'"):
        train_smat.main(stage_files + ["--train_file", str(tmp_path / "episodes.jsonl"), "--output_dir",
                                       str(tmp_path / "out"), "--max_steps", "2", "--episode_length_start", "2"])  # fmt: skip


def test_memory_evaluation_refuses_bad_rows_before_loading_a_model(tmp_path):
    import eval_memory

    write_jsonl(rows_without_distance(3), tmp_path / "test.jsonl")
    with pytest.raises(ValueError, match=r"test.jsonl:1: field 'probes\[0\]\.distance': missing; .* such as"):
        eval_memory.main([str(tmp_path / "no_model"), "--data", str(tmp_path / "test.jsonl")])
    rows = generate_dialogues(3, seed=5)
    del rows[2]["probes"][0]["expected"]
    write_jsonl(rows, tmp_path / "test.jsonl")
    with pytest.raises(ValueError, match=r"test.jsonl:3: field 'probes\[0\]\.expected': missing"):
        eval_memory.main([str(tmp_path / "no_model"), "--data", str(tmp_path / "test.jsonl")])
    (tmp_path / "test.jsonl").write_text(json.dumps(generate_dialogues(1, seed=5)[0]) + '\n{"broken"\n')
    with pytest.raises(ValueError, match=r"test.jsonl:2: not valid JSON"):
        eval_memory.main([str(tmp_path / "no_model"), "--data", str(tmp_path / "test.jsonl")])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corpus.txt", b"hello\nw\xf6rld\n", r"corpus.txt:2: not UTF-8 text \(byte 0xf6 at column 2\)"),
        ("corpus.txt", b"", r"corpus.txt: is empty; expected text"),
        ("corpus.txt", b"\n \n", r"corpus.txt: holds only blank lines"),
        ("rows.jsonl", b'{"text": "a"}\n{"text": \n', r"rows.jsonl:2: not valid JSON"),
        ("rows.jsonl", b'{"text": "a"}\n{"title": "b"}\n', r"rows.jsonl:2: no text found"),
        ("rows.csv", b"text\nhello\n", r"rows.csv: .csv files are not read"),
    ],
)
def test_train_tokenizer_names_the_bad_file_and_line(name, content, message, tmp_path):
    import train_tokenizer

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        train_tokenizer.main(["--input", str(tmp_path / name), "--output", str(tmp_path / "tok"), "--vocab-size", "300"])
    assert not (tmp_path / "tok").exists()


# --------------------------------------------------------------------------------------------------------------------
# Training resume is exact


def stage_run(stage, flags, output, extra=()):
    """One run of a stage script: (final parameters, {step: loss})."""
    import train_dmpo
    import train_joint
    import train_memory_attention
    import train_smat

    main = {"smat": train_smat.main, "joint": train_joint.main, "memory_attention": train_memory_attention.main,
            "dmpo": train_dmpo.main}[stage]  # fmt: skip
    trainer = main(flags + ["--output_dir", str(output), "--max_steps", "8", "--save_strategy", "steps",
                            "--save_steps", "3", "--logging_steps", "1", "--learning_rate", "3e-3", *extra])  # fmt: skip
    weights = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    return weights, {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


RESUME_OPTIONS = {  # stage, rows, flags: every option whose batches or steps depend on state beyond the weights
    "smat probe window": ("smat", "episodes", ["--episode_window", "probe", "--episode_length_start", "4"]),
    "smat episode-length schedule": ("smat", "episodes", ["--episode_window", "head", "--episode_length_start", "1",
                                     "--episode_max_turns", "4", "--episode_ramp_start", "0.0", "--episode_ramp_end",
                                     "0.5"]),  # fmt: skip
    "smat probe window + schedule + GA 2": ("smat", "episodes", ["--episode_length_start", "2", "--episode_max_turns",
                                            "4", "--episode_ramp_start", "0.2", "--episode_ramp_end", "0.7",
                                            "--gradient_accumulation_steps", "2", "--bptt_turns", "0"]),  # fmt: skip
    "dmpo episode-length schedule": ("dmpo", "preferences", ["--episode_length_start", "1", "--episode_max_turns",
                                     "4", "--episode_ramp_start", "0.0", "--episode_ramp_end", "0.5"]),  # fmt: skip
    "joint MLM masks + fake STM noise": ("joint", "texts", ["--fake_stm_noise_level", "0.05",
                                         "--fake_stm_masking_prob", "0.1"]),  # fmt: skip
    "memory attention label jitter + noise": ("memory_attention", "episodes", ["--ed_label_mode", "pool",
                                              "--label_weights_random_factor", "0.2", "--input_noise", "0.05",
                                              "--label_noise", "0.05"]),  # fmt: skip
}


@pytest.mark.parametrize("checkpoint", [3, 6], ids=["mid-epoch", "epoch-end"])
@pytest.mark.parametrize("option", sorted(RESUME_OPTIONS))
def test_resume_repeats_the_uninterrupted_run(option, checkpoint, stage_files, tmp_path):
    """8 steps uninterrupted vs a run resumed (`--resume_from_checkpoint True`) from the checkpoint of step 3 (inside
    the first epoch: 12 rows, batch 2) or 6 (at its end): the same losses and bit-identical weights."""
    import shutil

    stage, data, options = RESUME_OPTIONS[option]
    # episodes with several questions within 3 turns of their fact: the 'probe' window has a choice to make
    if data == "texts":
        rows = generate_pretrain(12, seed=11)
    else:
        rows = generate_dialogues(12, seed=11, min_turns=6, max_turns=8, max_distance=3)
    if data == "preferences":  # DMPO: the dialogue's answers accepted, a refusal rejected
        rows = [{"interactions": [{"query": q, "accepted": {"answer": a}, "rejected": {"answer": "I do not know."}}
                                  for q, a in [(r["query"], r["answer"])] + [(t["query"], t["answer"])
                                                                             for t in r["interactions"]]]}
                for r in rows]  # fmt: skip
    write_jsonl(rows, tmp_path / "rows.jsonl")
    flags = stage_files + ["--train_file", str(tmp_path / "rows.jsonl"), *options]
    full_weights, full_losses = stage_run(stage, flags, tmp_path / "full")
    shutil.copytree(tmp_path / "full" / f"checkpoint-{checkpoint}", tmp_path / "resumed" / f"checkpoint-{checkpoint}")
    weights, losses = stage_run(stage, flags, tmp_path / "resumed", ["--resume_from_checkpoint", "True"])
    assert sorted(full_losses) == list(range(1, 9)) and sorted(losses) == list(range(1, 9))
    assert [losses[s] for s in range(checkpoint + 1, 9)] == [full_losses[s] for s in range(checkpoint + 1, 9)]
    assert all(torch.equal(weights[name], full_weights[name]) for name in full_weights)


@pytest.fixture(scope="module")
def smat_checkpoints(tokenizer, tmp_path_factory):
    """A SMAT run of 8 steps with checkpoints at steps 3 and 6: (flags, output folder, final weights)."""
    folder = tmp_path_factory.mktemp("smat_run")
    tokenizer.save_pretrained(folder / "tok")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    (folder / "config.json").write_text(json.dumps({k: config[k] for k in ("decoder_config", "encoder_config",
                                                                           "memory_attention_config")}))  # fmt: skip
    write_jsonl(generate_dialogues(12, seed=11, min_turns=6, max_turns=8, max_distance=3), folder / "rows.jsonl")
    flags = ["--model_config", str(folder / "config.json"), "--tokenizer_name_or_path", str(folder / "tok"),
             "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True", "--per_device_train_batch_size",
             "2", "--seed", "0", "--train_file", str(folder / "rows.jsonl"), "--episode_length_start", "2",
             "--episode_max_turns", "4", "--episode_ramp_start", "0.2", "--episode_ramp_end", "0.7"]  # fmt: skip
    weights, _ = stage_run("smat", flags, folder / "full")
    return flags, folder / "full", weights


def cut_short(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BREAKS = {  # how a kill while saving checkpoint-6 leaves it: (damage, what the message names)
    "optimizer missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "trainer state missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "trainer state cut": (lambda c: cut_short(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "weights cut": (lambda c: cut_short(c / "model.safetensors", 0.9), r"model.safetensors is cut short \(\d+ bytes, its "
                    r"header needs \d+\)"),  # fmt: skip
    "weights missing": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "rng state cut": (lambda c: cut_short(c / "rng_state.pth"), r"rng_state.pth is not a complete torch file"),
    "collation state cut": (lambda c: cut_short(c / "collation_state.pth"), "collation_state.pth is not a complete"),
}


@pytest.mark.parametrize("damage", sorted(BREAKS))
def test_resume_true_skips_a_checkpoint_cut_short(damage, smat_checkpoints, tmp_path, caplog):
    import shutil

    from trainers.common import resolve_checkpoint

    _, full, _ = smat_checkpoints
    for step in (3, 6):
        shutil.copytree(full / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    breaks, named = BREAKS[damage]
    breaks(tmp_path / "checkpoint-6")
    with caplog.at_level("WARNING", logger="trainers.common"):
        assert resolve_checkpoint("True", tmp_path) == str(tmp_path / "checkpoint-3")
    assert f"{tmp_path / 'checkpoint-6'} is incomplete" in caplog.text and f"resuming from {tmp_path / 'checkpoint-3'}" in caplog.text
    assert re.search(named, caplog.text), caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint-6'?: {named}.* the latest complete checkpoint beside it is .*checkpoint-3"):
        resolve_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)
    assert resolve_checkpoint("False", tmp_path) is None and resolve_checkpoint(None, tmp_path) is None


def test_a_resumed_script_run_passes_over_a_checkpoint_cut_short(smat_checkpoints, tmp_path):
    """The newest checkpoint lost the end of its weights file: `--resume_from_checkpoint True` resumes from the one
    before and ends with the uninterrupted run's weights."""
    import shutil

    flags, full, full_weights = smat_checkpoints
    for step in (3, 6):
        shutil.copytree(full / f"checkpoint-{step}", tmp_path / "run" / f"checkpoint-{step}")
    cut_short(tmp_path / "run" / "checkpoint-6" / "model.safetensors", 0.9)
    weights, losses = stage_run("smat", flags, tmp_path / "run", ["--resume_from_checkpoint", "True"])
    assert sorted(losses) == list(range(1, 9))
    assert all(torch.equal(weights[name], full_weights[name]) for name in full_weights)


def test_resume_true_without_a_complete_checkpoint_says_what_it_found(smat_checkpoints, tmp_path):
    import shutil

    from trainers.common import resolve_checkpoint

    with pytest.raises(ValueError, match=r"no complete checkpoint in .* \(no checkpoint-N folder\); expected "
                                         r"checkpoint-N folders saved with --save_strategy steps or epoch"):  # fmt: skip
        resolve_checkpoint(True, tmp_path)
    shutil.copytree(smat_checkpoints[1] / "checkpoint-3", tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-3" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"no complete checkpoint in .* \(checkpoint-3: optimizer.pt is missing\)"):
        resolve_checkpoint(True, tmp_path)
    with pytest.raises(ValueError, match=r"output_dir .*missing.* does not exist"):
        resolve_checkpoint(True, tmp_path / "missing")


def test_smat_refuses_dataloader_workers_with_an_episode_schedule(tokenizer, tmp_path):
    """Workers hold copies of the collator: they would never see the schedule's episode length."""
    from modeling_rxt import RxTForCausalLM
    from modeling_rxt.tokenization_rxt import check_rxt_tokenizer
    from trainers.data import EpisodeCollator
    from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer

    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer), **ids))
    args = SMATConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, episode_length_start=2,
                      dataloader_num_workers=2)  # fmt: skip
    with pytest.raises(ValueError, match="dataloader_num_workers=2 with episode_length_start"):
        SupervisedMemoryAwareTrainer(model=model, args=args, data_collator=EpisodeCollator(tokenizer))

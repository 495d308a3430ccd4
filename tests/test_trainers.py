"""Stage trainers: losses fall, formulas hold, STM is carried, frozen parts get no gradient, resume is exact, DDP
replicas stay in sync, and the quickstart pipeline is wired end to end."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from conftest import REPO_ROOT, run_torchrun
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer
from trainers.common import component_of
from trainers.data import EpisodeCollator, JointLMCollator
from trainers.joint import JointLMConfig, JointLMTrainer
from trainers.memory_attention import (
    MemoryAttentionConfig,
    MemoryAttentionTrainer,
    memory_attention_loss,
    pseudo_label_ed,
)
from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer
from trainers.synthetic import generate_dialogues, generate_pretrain, generate_sft


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row["text"] for row in generate_pretrain(400, seed=3)]
    return train_rxt_tokenizer(texts, vocab_size=400, min_frequency=1)


def tiny_model(tokenizer, seed=0, **kwargs) -> RxTForCausalLM:
    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    torch.manual_seed(seed)
    config = RxTConfig.tiny(vocab_size=len(tokenizer), use_mlm_head=True, learned_stm_init=True,
                            stm_init="normal", **ids, **kwargs)  # fmt: skip
    return RxTForCausalLM(config)


def common_args(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, learning_rate=3e-3, warmup_steps=0, seed=0, per_device_train_batch_size=8)  # fmt: skip
    return {**base, **kwargs}


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def falls(values: list[float], ratio: float = 0.8) -> bool:
    head, tail = values[:3], values[-3:]
    return sum(tail) / len(tail) < ratio * sum(head) / len(head)


def test_joint_pretraining_and_sft_losses_fall(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    rows = Dataset.from_list(generate_pretrain(64, seed=1))
    args = JointLMConfig(**common_args(tmp_path, max_steps=20), fake_stm_noise_level=0.05, fake_stm_masking_prob=0.1)
    trainer = JointLMTrainer(model=model, args=args, train_dataset=rows,
                             data_collator=JointLMCollator(tokenizer, max_length=256, seed=0))  # fmt: skip
    trainer.train()
    assert falls(losses(trainer), 0.95), losses(trainer)
    logged = trainer.state.log_history[0]
    assert {"mlm_loss", "ar_loss", "mlm_accuracy", "ar_accuracy"} <= set(logged)

    sft = Dataset.from_list(generate_sft(64, seed=2))
    args = JointLMConfig(**common_args(tmp_path, max_steps=20), sft=True)
    trainer = JointLMTrainer(model=model, args=args, train_dataset=sft,
                             data_collator=JointLMCollator(tokenizer, sft=True, max_length=128, seed=0))  # fmt: skip
    trainer.train()
    assert falls(losses(trainer), 0.95), losses(trainer)


def test_joint_trainer_needs_mlm_head(tokenizer, tmp_path):
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="use_mlm_head=True"):
        JointLMTrainer(model=model, args=JointLMConfig(**common_args(tmp_path, max_steps=1)))


def test_memory_attention_loss_equals_formula():
    torch.manual_seed(0)
    new, previous = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    encoded = torch.randn(2, 3, 4, 8)
    w_acc, w_new = 0.3, 0.7
    label = w_acc * previous + w_new * pseudo_label_ed(encoded, 4, "elementwise")
    loss = memory_attention_loss(new, previous, label, turn=3, stm_diff_factor=0.5)
    cosines = [
        torch.dot(new[l, b, s], label[l, b, s]) / (new[l, b, s].norm() * label[l, b, s].norm())
        for l in range(2) for b in range(3) for s in range(4)
    ]  # fmt: skip
    expected = -torch.stack(cosines).mean() + 0.5 * (4**0.5) * ((new - previous) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    pooled = pseudo_label_ed(torch.arange(2 * 1 * 6 * 1.0).view(2, 1, 6, 1), 3, "pool")
    torch.testing.assert_close(pooled.flatten(), torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5, 10.5]))
    with pytest.raises(ValueError, match="stm_size"):
        pseudo_label_ed(encoded, 5, "elementwise")


def test_memory_attention_trainer_trains_only_memory_attention(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = Dataset.from_list(generate_dialogues(48, seed=4, max_turns=4))
    args = MemoryAttentionConfig(**common_args(tmp_path, max_steps=20), ed_label_mode="pool", max_length=64,
                                 label_weights_random_factor=0.1, input_noise=0.01, label_noise=0.01)  # fmt: skip
    trainer = MemoryAttentionTrainer(model=model, args=args, train_dataset=rows,
                                     data_collator=EpisodeCollator(tokenizer, max_length=64))  # fmt: skip
    trainer.train()
    assert falls(losses(trainer)), losses(trainer)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == name.startswith("model.memory_attention."), name
    with pytest.raises(ValueError, match="max_length"):
        MemoryAttentionTrainer(model=model, args=MemoryAttentionConfig(**common_args(tmp_path), max_length=64))


def episode_batch(tokenizer, turns=3):
    rows = generate_dialogues(4, seed=5, min_turns=turns, max_turns=turns)
    return EpisodeCollator(tokenizer, max_length=64)(rows)


@pytest.mark.parametrize("bptt_turns", [0, 1])
def test_smat_carries_stm_and_gradients_follow_freezing(tokenizer, tmp_path, bptt_turns):
    model = tiny_model(tokenizer)
    args = SMATConfig(**common_args(tmp_path, max_steps=1), bptt_turns=bptt_turns)
    trainer = SupervisedMemoryAwareTrainer(model=model, args=args, data_collator=EpisodeCollator(tokenizer))
    batch = episode_batch(tokenizer)
    model.train()

    def grads(memory_trains: bool, encoder_trains: bool) -> dict[str, bool]:
        model.zero_grad()
        trainer.memory_attention_trains, trainer.encoder_trains = memory_trains, encoder_trains
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        by_component = {}
        for name, param in model.named_parameters():
            has = param.grad is not None and param.grad.abs().sum() > 0
            by_component[component_of(name)] = by_component.get(component_of(name), False) or has
        assert not torch.allclose(out["stm"], model.initial_stm(4))  # the STM was written across turns
        return by_component

    assert grads(True, True) == {"embedding": True, "encoder": True, "decoder": True, "memory_attention": True,
                                 "mlm_head": False}  # fmt: skip
    frozen = grads(False, False)
    assert not frozen["encoder"] and frozen["decoder"] and frozen["embedding"]
    # with memory attention frozen only the learned STM init (read by the first turn) still gets gradient
    memory_grads = [n for n, p in model.named_parameters()
                    if n.startswith("model.memory_attention.") and p.grad is not None and p.grad.abs().sum() > 0]  # fmt: skip
    assert memory_grads == []
    only_memory = grads(True, False)
    assert only_memory["memory_attention"] and not only_memory["encoder"]


def test_smat_runs_each_turn_on_its_own_length(tokenizer, tmp_path):
    """Each turn is cut to its own longest row (exact: right padding): same loss and gradients as with the batch's
    trailing pad columns, and the model sees the per-turn widths."""
    model = tiny_model(tokenizer).eval()  # no dropout: the two passes must see the same computation
    trainer = SupervisedMemoryAwareTrainer(model=model, args=SMATConfig(**common_args(tmp_path), bptt_turns=0),
                                           data_collator=EpisodeCollator(tokenizer))  # fmt: skip
    batch = episode_batch(tokenizer, turns=4)
    widths = batch["attention_mask"].sum(-1).amax(-1).tolist()  # right padding: a row's length is its last position
    assert min(widths) < batch["input_ids"].shape[-1]  # some turn is shorter than the padded length
    extra = 5
    padded = {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=tokenizer.pad_token_id),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
        "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=-100),
        "turn_mask": batch["turn_mask"],
    }
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs.get("mode"), kwargs["attention_mask"].shape[-1])),
        with_kwargs=True)  # fmt: skip

    def loss_and_grads(inputs):
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(batch)
    hook.remove()
    padded_loss, padded_grads = loss_and_grads(padded)
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == padded_grads.keys()
    for name in grads:
        torch.testing.assert_close(padded_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    decoder_widths = [width for mode, width in seen if mode is None]
    write_widths = [width for mode, width in seen if mode == "memory_update"]
    assert decoder_widths == widths and write_widths == widths[:-1]
    # left padding (a custom collator): nothing trails, so nothing is cut
    seen.clear()
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"].shape[-1]), with_kwargs=True)  # fmt: skip
    flipped = {key: value.flip(-1) if key != "turn_mask" else value for key, value in batch.items()}
    trainer.compute_loss(model, flipped)
    hook.remove()
    assert set(seen) == {batch["input_ids"].shape[-1]}


def reference_smat_loss(model, batch, bptt_turns: int, encoder_trains: bool, memory_trains: bool):
    """SMAT's loss written plainly on full-batch turns: every row runs every turn; finished episodes get labels -100,
    one visible key, and keep their STM through `torch.where`. → (loss, final STM, accuracy, mean update norm)."""
    ids, masks, labels, valid_turns = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["turn_mask"]
    widths = (masks * torch.arange(1, masks.shape[-1] + 1)).amax(dim=(1, 2)).tolist()
    stm, losses, accuracies, norms = None, [], [], []
    for turn in range(ids.shape[0]):
        valid = valid_turns[turn].bool()
        if turn > 0:
            width = widths[turn - 1]
            if bptt_turns and turn % bptt_turns == 0:
                stm = stm.detach()
            mask = masks[turn - 1, :, :width].clone()
            mask[~valid, 0] = 1
            with torch.enable_grad() if encoder_trains else torch.no_grad():
                encoded = model(input_ids=ids[turn - 1, :, :width], attention_mask=mask, mode="encode")
            with torch.enable_grad() if memory_trains else torch.no_grad():
                new_stm = model(attention_mask=mask, stm=stm, encoder_hidden_states=encoded.encoder_hidden_states,
                                mode="memory_update").stm  # fmt: skip
            norms.append((new_stm - stm)[:, valid].norm() / stm[:, valid].norm())
            stm = torch.where(valid[None, :, None, None], new_stm, stm)
        width = widths[turn]
        turn_labels = labels[turn, :, :width].masked_fill(~valid[:, None], -100)
        mask = masks[turn, :, :width].clone()
        mask[~valid, 0] = 1
        out = model(input_ids=ids[turn, :, :width], attention_mask=mask, labels=turn_labels, stm=stm)
        stm = out.stm
        losses.append(out.loss)
        shifted = turn_labels[:, 1:]
        accuracies.append((out.logits[:, :-1].argmax(-1) == shifted)[shifted != -100].float().mean())
    return torch.stack(losses).mean(), stm, torch.stack(accuracies).mean(), torch.stack(norms).mean()


@pytest.mark.parametrize(
    "bptt_turns, encoder_trains, memory_trains, moe", [(0, True, True, False), (1, True, True, False),
                                                       (2, True, True, False), (0, False, True, False),
                                                       (1, False, False, False), (1, True, True, True)],
)  # fmt: skip
def test_smat_skips_finished_episodes_exactly(tokenizer, tmp_path, bptt_turns, encoder_trains, memory_trains, moe):
    """Each turn runs only the episodes still going: the same loss, gradients, final STM and metrics as full-batch
    turns in which finished rows are masked out, while the model sees sum(turns) rows, not N·B. (MoE routes each
    token on its own; its router loss is over the tokens the decoder runs, so the MoE case leaves it out.)"""
    moe_config = {"decoder": {"use_moe": True, "num_experts": 4, "moe_top_k": 2}} if moe else {}
    model = tiny_model(tokenizer, **moe_config).train()  # no dropout in the tiny config: both compute the same thing
    args = SMATConfig(**common_args(tmp_path), bptt_turns=bptt_turns, moe_aux_loss_scale=0.0)
    trainer = SupervisedMemoryAwareTrainer(model=model, args=args, data_collator=EpisodeCollator(tokenizer))
    trainer.encoder_trains, trainer.memory_attention_trains = encoder_trains, memory_trains
    dialogues = generate_dialogues(6, seed=11, min_turns=4, max_turns=4)
    num_turns = [2, 4, 1, 4, 2, 3]  # episodes ending at turns 1, 3, 0, 3, 1, 2
    for dialogue, turns in zip(dialogues, num_turns):
        dialogue["interactions"] = dialogue["interactions"][: turns - 1]
    batch = EpisodeCollator(tokenizer, max_length=64)(dialogues)
    assert batch["turn_mask"].sum(0).tolist() == num_turns and batch["input_ids"].shape[:2] == (4, 6)

    def loss_and_grads(compute):
        model.zero_grad()
        loss, stm, *metrics = compute()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), stm.detach(), metrics, grads

    rows = {"decode": 0, "write": 0}

    def count_rows(module, args, kwargs):
        if kwargs.get("mode") in (None, "decode"):
            rows["decode"] += kwargs["input_ids"].shape[0]
        elif kwargs.get("mode") == "memory_update":  # one call per write (after the encoder call when it is frozen)
            rows["write"] += kwargs["attention_mask"].shape[0]

    def skipping():
        trainer._metrics["train"].clear()
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        logged = trainer._metrics["train"]
        return loss, out["stm"], logged["answer_accuracy"][0], logged["stm_update_norm"][0]

    hook = model.register_forward_pre_hook(count_rows, with_kwargs=True)
    loss, stm, metrics, grads = loss_and_grads(skipping)
    hook.remove()
    assert rows == {"decode": sum(num_turns), "write": sum(num_turns) - len(num_turns)}  # 16 and 10, not 24 and 18
    assert trainer._metrics["train"]["episode_turns"] == [4.0]
    ref_loss, ref_stm, ref_metrics, ref_grads = loss_and_grads(
        lambda: reference_smat_loss(model, batch, bptt_turns, encoder_trains, memory_trains)
    )
    # float32; the two differ only in the batch sizes and widths the matmuls run at (rows are independent), so they
    # agree to rounding: ~1e-7 relative, 1e-6 leaves room for reductions summed in another order
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(stm, ref_stm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(metrics), torch.stack(ref_metrics).detach(), rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert any(n.startswith("model.encoder.") for n in grads) == encoder_trains
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_smat_refuses_a_turn_mask_with_gaps(tokenizer, tmp_path):
    model = tiny_model(tokenizer).train()
    trainer = SupervisedMemoryAwareTrainer(model=model, args=SMATConfig(**common_args(tmp_path)),
                                           data_collator=EpisodeCollator(tokenizer))  # fmt: skip
    batch = episode_batch(tokenizer, turns=3)
    for column, turns in ((1, [1, 0, 1]), (2, [0, 0, 0])):  # a gap; an episode without turns
        bad = {**batch, "turn_mask": batch["turn_mask"].clone()}
        bad["turn_mask"][:, column] = torch.tensor(turns)
        with pytest.raises(ValueError, match=rf"turn_mask of episode {column} is \[{', '.join(map(str, turns))}\]"):
            trainer.compute_loss(model, bad)


def test_smat_episode_schedule_and_unfreeze_epochs(tokenizer, tmp_path):
    args = SMATConfig(**common_args(tmp_path, max_steps=1), episode_length_start=2, episode_ramp_start=0.25,
                      episode_ramp_end=0.75, episode_max_turns=6)  # fmt: skip
    assert [args.episode_turns(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)] == [2, 2, 4, 6, 6]
    model = tiny_model(tokenizer)
    args = SMATConfig(**common_args(tmp_path, max_steps=1), memory_attention_unfreeze_epoch=1,
                      encoder_unfreeze_epoch=None)  # fmt: skip
    trainer = SupervisedMemoryAwareTrainer(model=model, args=args, data_collator=EpisodeCollator(tokenizer))
    assert (trainer.memory_attention_trains, trainer.encoder_trains) == (False, False)
    trainer.update_frozen(1)
    assert (trainer.memory_attention_trains, trainer.encoder_trains) == (True, False)
    with pytest.raises(ValueError, match="bptt_turns"):
        SMATConfig(**common_args(tmp_path), bptt_turns=-1)


def test_smat_loss_falls_with_schedule(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    rows = Dataset.from_list(generate_dialogues(96, seed=6, max_turns=4))
    collator = EpisodeCollator(tokenizer, max_length=64)
    args = SMATConfig(**common_args(tmp_path, max_steps=20), bptt_turns=0, episode_length_start=2,
                      episode_max_turns=4, episode_ramp_start=0.5, episode_ramp_end=0.8)  # fmt: skip
    trainer = SupervisedMemoryAwareTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert falls([e["loss"] for e in history], 0.9), [e["loss"] for e in history]
    assert history[0]["episode_turns"] == 2 and history[-1]["episode_turns"] > 2
    assert {"answer_accuracy", "stm_update_norm"} <= set(history[-1])


def test_per_component_learning_rates(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    args = SMATConfig(**common_args(tmp_path, max_steps=1), decoder_lr=1e-4, memory_attention_lr=5e-3)
    trainer = SupervisedMemoryAwareTrainer(model=model, args=args, data_collator=EpisodeCollator(tokenizer))
    optimizer = trainer.create_optimizer()
    lrs = {group["name"]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert lrs["decoder"][0] == 1e-4 and lrs["memory_attention"][0] == 5e-3 and lrs["encoder"][0] == 3e-3
    assert lrs["decoder.no_decay"][1] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_residual_gate_learning_rate(tokenizer, tmp_path):
    model = tiny_model(tokenizer)  # self-interlayer: static per-slot gates, [S, 1]
    gates = {id(p) for n, p in model.named_parameters() if "gate_layers." in n}  # main, mean, interlayer
    assert gates
    args = SMATConfig(**common_args(tmp_path, max_steps=1), memory_attention_lr=5e-3, residual_gate_lr=0.1,
                      weight_decay=0.01)  # fmt: skip
    trainer = SupervisedMemoryAwareTrainer(model=model, args=args, data_collator=EpisodeCollator(tokenizer))
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    assert {id(p) for p in groups["residual_gate.no_decay"]["params"]} == gates
    assert groups["residual_gate.no_decay"]["lr"] == 0.1 and groups["memory_attention"]["lr"] == 5e-3
    assert groups["residual_gate.no_decay"]["weight_decay"] == 0.0  # [S, 1] gates are not decayed
    default = SMATConfig(**common_args(tmp_path, max_steps=1), memory_attention_lr=5e-3)
    assert default.component_lr("residual_gate") == 5e-3  # None follows memory attention


def test_resume_from_checkpoint_matches_uninterrupted_run(tokenizer, tmp_path):
    rows = Dataset.from_list(generate_dialogues(64, seed=7, max_turns=3))

    def run(output, max_steps, resume=None):
        model = tiny_model(tokenizer, seed=1)
        args = SMATConfig(**common_args(output, max_steps=max_steps, save_strategy="steps", save_steps=3),
                          bptt_turns=0)  # fmt: skip
        trainer = SupervisedMemoryAwareTrainer(model=model, args=args, train_dataset=rows,
                                               data_collator=EpisodeCollator(tokenizer, max_length=64))  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    full = run(tmp_path / "full", 6)  # also saves checkpoint-3 (model, optimizer, scheduler, RNG states)
    resumed = run(tmp_path / "resumed", 6, resume=str(tmp_path / "full" / "checkpoint-3"))
    assert {4, 5, 6} <= set(resumed)  # steps 1-3 come back from the checkpoint's log history
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5)


DDP_BODY = r"""
from trainers.data import EpisodeCollator
from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer
model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tok), learned_stm_init=True, **ids))
before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("model.encoder.")}
args = SMATConfig(output_dir=sys.argv[2], max_steps=4, per_device_train_batch_size=4, report_to="none", use_cpu=True,
                  save_strategy="no", disable_tqdm=True, learning_rate=3e-3, bptt_turns=0, encoder_unfreeze_epoch=None,
                  logging_steps=1)
rows = Dataset.from_list(generate_dialogues(64, seed=9, max_turns=3))
trainer = SupervisedMemoryAwareTrainer(model=model, args=args, train_dataset=rows,
                                       data_collator=EpisodeCollator(tok, max_length=64))
trainer.train()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
encoder_same = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
if dist.get_rank() == 0:
    print(json.dumps({"world": dist.get_world_size(), "max_diff": (gathered[0] - gathered[1]).abs().max().item(),
                      "encoder_unchanged": encoder_same, "steps": trainer.state.global_step}), flush=True)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_smat_two_process_ddp_keeps_replicas_in_sync(tmp_path):
    result, _ = run_torchrun(DDP_BODY, tmp_path, master_port=29517)
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["world"] == 2 and report["steps"] == 4
    assert report["max_diff"] == 0.0  # replicas identical after 4 steps
    assert report["encoder_unchanged"]  # a frozen component stays bit-identical under DDP


FSDP2_BODY = r"""
import copy
from torch.distributed.fsdp import fully_shard
from trainers.data import EpisodeCollator
from trainers.dmpo import DMPOCollator, DMPOConfig, DMPOTrainer
from trainers.memory_attention import MemoryAttentionConfig, MemoryAttentionTrainer, freeze_for_memory_attention_stage
from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer
dist.init_process_group("gloo")
model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tok), learned_stm_init=True, **ids))
sharded = copy.deepcopy(model)
for module in sharded.modules():  # what scripts/accelerate/fsdp.yaml wraps
    if type(module).__name__ in sharded._no_split_modules:
        fully_shard(module)
fully_shard(sharded)
dialogues = generate_dialogues(4, seed=9, min_turns=3, max_turns=3)
turns = [[(d["query"], d["answer"])] + [(t["query"], t["answer"]) for t in d["interactions"]] for d in dialogues]
preferences = [{"interactions": [{"query": q, "accepted": {"answer": a}, "rejected": {"answer": "No idea."}}
                                 for q, a in pairs]} for pairs in turns]
cases = {
    "smat": (SupervisedMemoryAwareTrainer(model=model, data_collator=EpisodeCollator(tok, max_length=64),
                                          args=SMATConfig(output_dir=sys.argv[2], report_to="none", use_cpu=True)),
             EpisodeCollator(tok, max_length=64)(dialogues)),
    "dmpo": (DMPOTrainer(model=model, processing_class=tok,
                         args=DMPOConfig(output_dir=sys.argv[2], report_to="none", use_cpu=True, bptt_turns=0)),
             DMPOCollator(tok, max_length=64)(preferences)),
}
frozen = copy.deepcopy(model)  # stage 3 trains memory attention only, from the detached initial STM
frozen_sharded = copy.deepcopy(frozen)
freeze_for_memory_attention_stage(frozen_sharded)
for module in frozen_sharded.modules():
    if type(module).__name__ in frozen_sharded._no_split_modules:
        fully_shard(module)
fully_shard(frozen_sharded)
stage3 = MemoryAttentionTrainer(model=frozen, data_collator=EpisodeCollator(tok, max_length=64),
                                args=MemoryAttentionConfig(output_dir=sys.argv[2], report_to="none", use_cpu=True,
                                                           ed_label_mode="pool", max_length=64))
report = {}
cases["memory_attention"] = (stage3, EpisodeCollator(tok, max_length=64)(dialogues))
for name, (trainer, batch) in cases.items():
    grads = []
    for net in (frozen, frozen_sharded) if name == "memory_attention" else (model, sharded):
        net.train()
        net.zero_grad()
        loss = trainer.compute_loss(net, batch)
        loss.backward()
        grads.append({n: None if p.grad is None else getattr(p.grad, "full_tensor", lambda g=p.grad: g)()
                      for n, p in net.named_parameters()})
        report[f"{name}_loss_{len(grads)}"] = loss.item()
    plain, shard = grads
    report[f"{name}_no_grad"] = [n for n in plain if (plain[n] is None) != (shard[n] is None)]
    report[f"{name}_max_diff"] = max((plain[n] - shard[n]).abs().max().item() for n in plain
                                     if plain[n] is not None and shard[n] is not None)
    stm_init_grad = plain["model.stm_init.stm"]
    report[f"{name}_stm_init_grad"] = 0.0 if stm_init_grad is None else stm_init_grad.abs().max().item()
    report[f"{name}_trained"] = sorted({n.split(".")[1] for n, g in plain.items() if g is not None})
if dist.get_rank() == 0:
    print(json.dumps(report), flush=True)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_sharded_model_gets_the_unsharded_loss_and_gradients(tmp_path):
    """SMAT, DMPO and stage 3 on a model sharded as `scripts/accelerate/fsdp.yaml` does (FSDP2, 2 CPU processes, the
    same batch on both): the same loss and every gradient, the learned initial STM's included (read inside forward,
    where FSDP gathers it; stage 3 starts from it detached and trains memory attention only)."""
    result, _ = run_torchrun(FSDP2_BODY, tmp_path, master_port=29519)
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    for name in ("smat", "dmpo", "memory_attention"):
        assert report[f"{name}_loss_2"] == pytest.approx(report[f"{name}_loss_1"], rel=1e-6)
        assert report[f"{name}_no_grad"] == []
        assert report[f"{name}_max_diff"] < 1e-6
        assert (report[f"{name}_stm_init_grad"] > 0) == (name != "memory_attention")
    assert report["memory_attention_trained"] == ["memory_attention"]


@pytest.mark.parametrize("stage", ["smat", "dmpo", "memory_attention"])
def test_placeholder_turns_add_zero_loss_and_zero_gradients(tokenizer, tmp_path, stage):
    """A process whose batch has fewer turns than another's (sharded training) runs placeholder turns: forced here to
    one more turn than the batch has, they run the model (same forwards as a real turn) and leave the loss, every
    gradient, the returned STM and the logged metrics exactly as without them."""
    from trainers.dmpo import DMPOCollator, DMPOConfig, DMPOTrainer

    model = tiny_model(tokenizer)
    dialogues = generate_dialogues(4, seed=3, min_turns=2, max_turns=3)
    args = common_args(tmp_path)
    if stage == "smat":
        trainer = SupervisedMemoryAwareTrainer(model=model, args=SMATConfig(**args, bptt_turns=0),
                                               data_collator=EpisodeCollator(tokenizer, max_length=64))  # fmt: skip
        batch = EpisodeCollator(tokenizer, max_length=64)(dialogues)
    elif stage == "dmpo":
        trainer = DMPOTrainer(model=model, args=DMPOConfig(**args, bptt_turns=0), processing_class=tokenizer)
        pairs = [[(d["query"], d["answer"])] + [(t["query"], t["answer"]) for t in d["interactions"]] for d in dialogues]
        batch = DMPOCollator(tokenizer, max_length=64)([
            {"interactions": [{"query": q, "accepted": {"answer": a}, "rejected": {"answer": "No idea."}}
                              for q, a in turns]} for turns in pairs])  # fmt: skip
    else:
        trainer = MemoryAttentionTrainer(model=model, data_collator=EpisodeCollator(tokenizer, max_length=64),
                                         args=MemoryAttentionConfig(**args, ed_label_mode="pool", max_length=64))
        batch = EpisodeCollator(tokenizer, max_length=64)(dialogues)
    model.train()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))

    def run(extra_turns):
        trainer.agreed_turns = lambda net, turns, device: turns + extra_turns
        trainer._metrics["train"].clear()
        model.zero_grad()
        forwards.clear()
        torch.manual_seed(0)
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss, outputs["stm"].detach(), grads, dict(trainer._metrics["train"]), len(forwards)

    loss, stm, grads, metrics, calls = run(0)
    padded_loss, padded_stm, padded_grads, padded_metrics, padded_calls = run(1)
    assert padded_calls > calls  # the placeholder turn runs the model
    assert padded_loss.requires_grad and torch.equal(padded_loss, loss)
    assert torch.equal(padded_stm, stm)
    assert grads.keys() == padded_grads.keys() and grads
    assert all(torch.equal(grads[n], padded_grads[n]) for n in grads)
    assert padded_metrics == metrics


FSDP2_TURNS_BODY = r"""
import copy, datetime
from torch.distributed.fsdp import fully_shard
from trainers.data import EpisodeCollator
from trainers.dmpo import DMPOCollator, DMPOConfig, DMPOTrainer
from trainers.memory_attention import MemoryAttentionConfig, MemoryAttentionTrainer, freeze_for_memory_attention_stage
from trainers.smat import SMATConfig, SupervisedMemoryAwareTrainer
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a collective mismatch fails, not hangs
rank, world = dist.get_rank(), dist.get_world_size()


def shard(net):
    net = copy.deepcopy(net)
    for module in net.modules():  # what scripts/accelerate/fsdp.yaml wraps
        if type(module).__name__ in net._no_split_modules:
            fully_shard(module)
    return fully_shard(net)


model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tok), learned_stm_init=True, **ids))
frozen = copy.deepcopy(model)
freeze_for_memory_attention_stage(frozen)
sharded, frozen_sharded = shard(model), shard(frozen)
# Rank 0's episodes have 2 or 3 turns, rank 1's 1: rank 1 runs two placeholder turns and no real write.
dialogues = generate_dialogues(4, seed=9 + rank, min_turns=3, max_turns=3)
for d, length in zip(dialogues, [2, 3, 3, 3] if rank == 0 else [1, 1, 1, 1]):
    d["interactions"] = d["interactions"][: length - 1]
turns = [[(d["query"], d["answer"])] + [(t["query"], t["answer"]) for t in d["interactions"]] for d in dialogues]
preferences = [{"interactions": [{"query": q, "accepted": {"answer": a}, "rejected": {"answer": "No idea."}}
                                 for q, a in pairs]} for pairs in turns]
args = dict(output_dir=sys.argv[2], report_to="none", use_cpu=True)
smat = SupervisedMemoryAwareTrainer(model=model, data_collator=EpisodeCollator(tok, max_length=64),
                                    args=SMATConfig(**args, bptt_turns=0))
cases = {
    "smat": (smat, model, sharded, EpisodeCollator(tok, max_length=64)(dialogues)),
    "dmpo": (DMPOTrainer(model=model, processing_class=tok, args=DMPOConfig(**args, bptt_turns=0)), model, sharded,
             DMPOCollator(tok, max_length=64)(preferences)),
    "memory_attention": (MemoryAttentionTrainer(model=frozen, data_collator=EpisodeCollator(tok, max_length=64),
                                                args=MemoryAttentionConfig(**args, ed_label_mode="pool", max_length=64)),
                         frozen, frozen_sharded, EpisodeCollator(tok, max_length=64)(dialogues)),
}
report = {"turns": int(cases["smat"][3]["turn_mask"].any(1).sum())}
for name, (trainer, plain, shard_net, batch) in cases.items():
    losses, grads = [], []
    for net in (plain, shard_net):
        net.train()
        net.zero_grad()
        loss = trainer.compute_loss(net, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: None if p.grad is None else getattr(p.grad, "full_tensor", lambda g=p.grad: g)()
                      for n, p in net.named_parameters()})
    plain_grads, shard_grads = grads
    diff = 0.0
    for n, p in plain.named_parameters():  # FSDP averages the processes' gradients (None: zeros on this process)
        g = torch.zeros_like(p) if plain_grads[n] is None else plain_grads[n]
        dist.all_reduce(g)
        diff = max(diff, (g / world - (torch.zeros_like(p) if shard_grads[n] is None else shard_grads[n])).abs().max().item())
    report[f"{name}_losses"] = losses
    report[f"{name}_no_grad"] = [n for n in plain_grads if plain_grads[n] is not None and shard_grads[n] is None]
    report[f"{name}_max_diff"] = diff
optimizer = torch.optim.SGD(sharded.parameters(), lr=1e-2)
steps = []
for _ in range(2):  # training steps on the sharded model, each process on its own batch
    optimizer.zero_grad()
    loss = smat.compute_loss(sharded, cases["smat"][3])
    loss.backward()
    optimizer.step()
    steps.append(loss.item())
report["smat_steps"] = steps
reports = [None] * world
dist.all_gather_object(reports, report)
if rank == 0:
    print(json.dumps(reports), flush=True)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_processes_with_different_turn_counts_run_the_same_collectives(tmp_path):
    """SMAT, DMPO and stage 3 sharded as `scripts/accelerate/fsdp.yaml` does (FSDP2, 2 CPU processes), rank 0's
    episodes 2 or 3 turns long and rank 1's 1: every process runs the turns of the longest (a process without
    the turn a placeholder one), so no collective mismatches; each process's loss is the one it computes unsharded,
    the gradients the mean of the processes' unsharded ones (the placeholders add nothing), and training steps run."""
    result, _ = run_torchrun(FSDP2_TURNS_BODY, tmp_path, master_port=29523, timeout=200)
    reports = json.loads([line for line in result.stdout.splitlines() if line.startswith("[")][-1])
    assert [report["turns"] for report in reports] == [3, 1]
    for report in reports:
        for name in ("smat", "dmpo", "memory_attention"):
            plain, shard = report[f"{name}_losses"]
            assert shard == pytest.approx(plain, rel=1e-6)
            assert report[f"{name}_no_grad"] == []
            assert report[f"{name}_max_diff"] < 1e-6
        assert all(math.isfinite(loss) for loss in report["smat_steps"])


@pytest.mark.slow
def test_quickstart_micro_pipeline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "quickstart.py"), "--preset", "micro", "--output-dir",
               str(tmp_path / "qs"), "--with-mrl", "--mrl-output-dir", str(tmp_path / "mrl")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "qs"
    evaluation = json.loads((out / "memory_eval.json").read_text())
    assert {"recall", "recall_memory_reset", "recall_stateless", "chance", "n_dialogues"} <= set(evaluation)
    assert evaluation["recall_stateless"] and evaluation["n_dialogues"] == 6
    # eval.paraphrase_style "diverse": a basic-style preset is also measured on the diverse held-out templates
    held_out = [json.loads(line) for line in (out / "data" / "memory_eval_paraphrase_test.jsonl").open()]
    assert len(held_out) == 6 and evaluation["paraphrase"]["recall"] and evaluation["paraphrase"]["n_dialogues"] == 6
    from trainers.synthetic import chance_level, generate_dialogues

    assert held_out == generate_dialogues(6, seed=1, split="test", max_turns=4, max_distance=3, style="diverse",
                                          templates="held_out")  # fmt: skip
    assert evaluation["paraphrase"]["chance"] == chance_level("test", "diverse")
    assert "held-out tmpl." in result.stdout
    assert (out / "memory_eval.png").is_file() and (out / "model" / "config.json").is_file()
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "modeling_rxt.py").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"1_joint", "2_sft", "3_memory_attention", "4_smat", "5_smat"}
    # the preset's attention kernel reaches every stage, the baseline and the evaluation; it is not saved with the model
    kernels = [stage["attn_implementation"] for stage in summary["stages"].values()]
    assert kernels + [summary["baseline"]["attn_implementation"], evaluation["attn_implementation"]] == ["eager"] * 7
    assert "attn_implementation" not in (out / "model" / "config.json").read_text()
    mrl = json.loads((tmp_path / "mrl" / "eval.json").read_text())  # stage 5 wiring: reward and recall before/after
    assert {"reward_before", "reward_after", "paired"} <= set(mrl)
    paired = mrl["paired"]  # the same test dialogues before and after, answered and written with own answers
    assert paired["n_dialogues"] == 6 and paired["recall_after"]
    assert set(paired["recall_after"]) <= set(evaluation["recall"])
    assert {"recall_d2_8_change", "recall_d1_change", "reward_change", "retention_change"} <= set(paired)
    assert "MRL, the same 6 test dialogues before and after" in result.stdout and "recall d = 2..8" in result.stdout
    assert mrl["reward_ceiling"] == pytest.approx((mrl["reward_references"] + mrl["reward_other_template"]) / 2)
    assert mrl["reward_references"] > mrl["reward_other_template"]  # BLEU of the references against themselves is 1
    assert (tmp_path / "mrl" / "model" / "config.json").is_file() and (tmp_path / "mrl" / "model" / "critic").is_dir()
    assert "finished in" in result.stdout


@pytest.mark.parametrize("stage", ["smat", "memory_attention"])
def test_gradient_accumulation_matches_the_larger_batch(tokenizer, tmp_path, stage):
    """GA=2 x batch 2 gives the update of GA=1 x batch 4 (plain SGD, so a wrong loss scale would show; the four
    episodes are one dialogue repeated, so per-batch means equal the full-batch mean)."""
    rows = Dataset.from_list(generate_dialogues(1, seed=8, min_turns=3, max_turns=3) * 4)

    def one_step(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = tiny_model(tokenizer)
        settings = common_args(tmp_path / f"{batch_size}", max_steps=1, per_device_train_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5,
                               weight_decay=0.0, max_grad_norm=0.0)  # fmt: skip
        if stage == "smat":
            args = SMATConfig(**settings, bptt_turns=0)
            trainer_cls = SupervisedMemoryAwareTrainer
        else:
            args = MemoryAttentionConfig(**settings, ed_label_mode="pool", max_length=64)
            trainer_cls = MemoryAttentionTrainer
        trainer = trainer_cls(model=model, args=args, train_dataset=rows,
                              data_collator=EpisodeCollator(tokenizer, max_length=64))  # fmt: skip
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    full, accumulated = one_step(4, 1), one_step(2, 2)
    initial = dict(tiny_model(tokenizer).named_parameters())
    moved = [n for n in full if not torch.equal(full[n], initial[n].detach())]
    assert moved  # the step changed something
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-6, rtol=1e-5, msg=name)


def test_stage_script_seeds_new_model_weights(tokenizer, tmp_path):
    """A new model built by a stage script depends on --seed only, not on RNG use earlier in the process."""
    import train_smat

    tokenizer.save_pretrained(tmp_path / "tok")
    from trainers.synthetic import write_jsonl

    write_jsonl(generate_dialogues(8, seed=9, max_turns=3), tmp_path / "rows.jsonl")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    fields = {k: config[k] for k in ("decoder_config", "encoder_config", "memory_attention_config")}
    (tmp_path / "config.json").write_text(json.dumps(fields))

    def weights(name: str) -> dict[str, torch.Tensor]:
        torch.randn(17)  # RNG consumed differently before each run
        trainer = train_smat.main(["--model_config", str(tmp_path / "config.json"), "--tokenizer_name_or_path",
                                   str(tmp_path / "tok"), "--train_file", str(tmp_path / "rows.jsonl"), "--output_dir",
                                   str(tmp_path / name), "--max_steps", "1", "--learning_rate", "0", "--report_to",
                                   "none", "--save_strategy", "no", "--use_cpu", "True", "--seed", "5",
                                   "--per_device_train_batch_size", "2", "--disable_tqdm", "True"])  # fmt: skip
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    first, second = weights("a"), weights("b")
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_stage_script_groups_episodes_by_length(tokenizer, tmp_path):
    """`--train_sampling_strategy group_by_length`: the script adds each episode's padded size (turns x longest
    interaction) as the `length` column and Trainer's length-grouped sampler puts the batch holding the largest
    episode first; a stage without row lengths (DMPO) refuses it by name."""
    import train_dmpo
    import train_smat

    from trainers.synthetic import write_jsonl

    tokenizer.save_pretrained(tmp_path / "tok")
    rows = generate_dialogues(24, seed=9, min_turns=2, max_turns=5)
    write_jsonl(rows, tmp_path / "rows.jsonl")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    fields = {k: config[k] for k in ("decoder_config", "encoder_config", "memory_attention_config")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    flags = ["--model_config", str(tmp_path / "config.json"), "--tokenizer_name_or_path", str(tmp_path / "tok"),
             "--train_file", str(tmp_path / "rows.jsonl"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
             "--report_to", "none", "--save_strategy", "no", "--use_cpu", "True", "--per_device_train_batch_size", "4",
             "--disable_tqdm", "True", "--train_sampling_strategy", "group_by_length"]  # fmt: skip
    trainer = train_smat.main(flags)
    collate = EpisodeCollator(tokenizer)
    lengths = [collate([row])["attention_mask"].numel() for row in rows]
    assert trainer.train_dataset["length"] == lengths
    first = next(iter(trainer.get_train_dataloader()))
    first_row = first["attention_mask"][:, 0]  # [N, T]: the sampler puts the largest episode first
    assert int(first["num_turns"][0]) * int(first_row.sum(-1).max()) == max(lengths)
    with pytest.raises(ValueError, match="group_by_length.*needs row lengths"):
        train_dmpo.main(flags)


@pytest.mark.parametrize("preset_file", sorted((REPO_ROOT / "scripts" / "presets").glob("*.json")), ids=lambda p: p.stem)
def test_every_preset_builds(preset_file, tmp_path):
    """Each shipped preset: the model config builds, every stage's and the baseline's arguments are valid fields of
    their config class, every stage's `"data"` names an episode set the preset writes, and the extra episode sets are
    valid generator arguments, and the stateless baseline's steps derive from the stages (a typo would otherwise surface
    only after minutes of training)."""
    from quickstart import baseline_steps, episode_set
    from transformers import HfArgumentParser, TrainingArguments

    from trainers.mrl_config import MRLConfig

    preset = json.loads(preset_file.read_text())
    RxTConfig(**{**preset["model"], "decoder_config": {**preset["model"]["decoder_config"], "vocab_size": 256},
                 "encoder_config": {**preset["model"]["encoder_config"], "vocab_size": 256}})  # fmt: skip
    configs = {"joint": JointLMConfig, "sft": JointLMConfig, "memory_attention": MemoryAttentionConfig, "smat": SMATConfig}
    extra = preset.get("extra_dialogues", {})
    for name, spec in extra.items():
        assert isinstance(spec.get("skip", 0), int) and spec.get("skip", 0) >= 0, name
        assert episode_set({**spec, "num_train": 2, "skip": 0}, preset.get("seed", 0)), name
    for stage in preset["stages"]:
        args = {**stage.get("args", {}), "output_dir": str(tmp_path), "use_cpu": True, "bf16": False}
        HfArgumentParser(configs[stage["stage"]]).parse_dict(args)
        if "data" in stage:
            assert stage["data"].removeprefix("dialogues_") in extra, stage["data"]
    HfArgumentParser(TrainingArguments).parse_dict({**preset["baseline"]["args"], "output_dir": str(tmp_path),
                                                "use_cpu": True, "bf16": False, "max_steps": baseline_steps(preset)})  # fmt: skip
    if "mrl" in preset:
        HfArgumentParser(MRLConfig).parse_dict({**preset["mrl"]["args"], "output_dir": str(tmp_path), "use_cpu": True})


def test_episode_set_takes_a_seed_and_a_slice_of_its_stream():
    """`extra_dialogues` sets: the preset's seed by default, or their own; `skip` makes consecutive disjoint slices."""
    from quickstart import episode_set

    spec = {"min_turns": 5, "max_turns": 10, "max_distance": 4}
    stream = generate_dialogues(5, seed=7, split="train", **spec)
    assert episode_set({"num_train": 2, "seed": 7, **spec}, seed=0) == stream[:2]
    assert episode_set({"num_train": 3, "seed": 7, "skip": 2, **spec}, seed=0) == stream[2:]
    assert episode_set({"num_train": 2, **spec}, seed=7) == stream[:2]
    assert episode_set({"num_train": 2, **spec}, seed=0) != stream[:2]
    with pytest.raises(ValueError, match="skip=-1"):
        episode_set({"num_train": 2, "skip": -1}, seed=0)


def test_baseline_steps_match_the_stages_rows():
    """The stateless baseline trains on as many rows as all stages together; a stored step count or a batch that
    does not divide the rows is refused by name."""
    from quickstart import baseline_steps

    stages = [{"args": {"max_steps": 1500, "per_device_train_batch_size": 16}}, {"args": {"max_steps": 3}}]
    assert baseline_steps({"stages": stages, "baseline": {"args": {"per_device_train_batch_size": 8}}}) == 3003
    with pytest.raises(ValueError, match="max_steps=5: remove it"):
        baseline_steps({"stages": stages, "baseline": {"args": {"max_steps": 5}}})
    with pytest.raises(ValueError, match="batch 5 does not divide the stages' 24024 rows"):
        baseline_steps({"stages": stages, "baseline": {"args": {"per_device_train_batch_size": 5}}})
    with pytest.raises(ValueError, match=r"stage 1 \('smat'\) has no args.max_steps"):
        baseline_steps({"stages": [stages[0], {"stage": "smat", "args": {}}], "baseline": {"args": {}}})


def test_quickstart_refuses_an_underivable_baseline_before_training(tmp_path):
    """A preset whose baseline budget cannot be derived fails at start, before any data, tokenizer or stage."""
    import quickstart

    preset = json.loads((REPO_ROOT / "scripts" / "presets" / "micro.json").read_text())
    del preset["stages"][-1]["args"]["max_steps"]
    (tmp_path / "bad.json").write_text(json.dumps(preset))
    with pytest.raises(ValueError, match="has no args.max_steps"):
        quickstart.main(["--preset", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_quickstart_refuses_a_non_string_attention_kernel_before_training(tmp_path):
    import quickstart

    preset = json.loads((REPO_ROOT / "scripts" / "presets" / "micro.json").read_text())
    preset["attn_implementation"] = ["eager"]
    (tmp_path / "bad.json").write_text(json.dumps(preset))
    with pytest.raises(ValueError, match=r"attn_implementation=\['eager'\]: expected a name"):
        quickstart.main(["--preset", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_stage_script_builds_a_new_model_with_the_requested_attention_kernel(tokenizer, tmp_path):
    """`--attn_implementation` on a new model (and `set_attn_implementation` after the build) reaches the config and
    its sub-configs without transformers' warning about sub-configs it could not check; a wrong name fails by name
    and changes nothing."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from trainers.cli import ModelArguments, load_model

    log = logging.get_logger("transformers.modeling_utils")
    config = RxTConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    fields = {k: config[k] for k in ("decoder_config", "encoder_config", "memory_attention_config")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with CaptureLogger(log) as quiet:
        model = load_model(ModelArguments(model_config=str(tmp_path / "config.json"), attn_implementation="eager"),
                           tokenizer)  # fmt: skip
    assert model.config._attn_implementation == "eager"
    assert model.config.sub_configs
    assert {getattr(model.config, key)._attn_implementation for key in model.config.sub_configs} == {"eager"}
    assert "sub-config" not in quiet.out
    with CaptureLogger(log) as later:  # set after the build: the same, checked first, also without the warning
        built = RxTForCausalLM(RxTConfig(**fields))
        built.set_attn_implementation("eager")
        log.warning("the capture works")
    assert later.out == "the capture works\n"
    assert {getattr(built.config, key)._attn_implementation for key in built.config.sub_configs} == {"eager"}
    with pytest.raises(ValueError, match="no_such_kernel"):
        built.set_attn_implementation("no_such_kernel")
    assert {built.config._attn_implementation} | {getattr(built.config, key)._attn_implementation
                                                  for key in built.config.sub_configs} == {"eager"}  # fmt: skip
    with pytest.raises(ValueError, match="no_such_kernel"):
        load_model(ModelArguments(model_config=str(tmp_path / "config.json"), attn_implementation="no_such_kernel"),
                   tokenizer)  # fmt: skip

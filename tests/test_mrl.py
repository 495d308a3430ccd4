"""MRL / IMPO trainer (docs/spec.md#stage-5-memory-reinforcement-learning, docs/spec.md#trl-and-the-mrl-trainer): the
TRL helpers import, the rollout stores what the replay needs (first interaction only written, generated answers
written, masks, STM), the reward modes follow the strategy, every loss term equals its formula, advantages, gradients
follow the freeze stages, config validation, the reward rises on a learnable task, the saved policy reloads with
trust_remote_code, 2-process DDP stays in sync, the replay buffer scores/ages/evicts as specified and its episodes
enter the loss, and a resumed run repeats the uninterrupted one exactly."""

import copy
import importlib
import json
import math
import os
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from conftest import run_torchrun
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import check_rxt_tokenizer, train_rxt_tokenizer
from trainers import _trl_compat
from trainers.common import component_of
from trainers.mrl_config import MRLConfig, ReplayBufferSettings, freeze_stage
from trainers.mrl_critic import RxTCritic
from trainers.mrl_replay import MrlReplayBuffer, concat_padded
from trainers.mrl_trainer import MRLCollator, MRLTrainer, trains_in_stage
from trainers.synthetic import generate_pretrain

# Hand-built episodes: turn 0 is the interaction to remember, then 3, 2, 1 and 3 follow-ups.
ROWS = [
    {"query": "My name is Anna.", "answer": "Hello Anna.", "interactions": [
        {"query": "What is my name?", "answer": "Your name is Anna."},
        {"query": "I live in Paris.", "answer": "Noted."},
        {"query": "Where do I live?", "answer": "You live in Paris."}]},
    {"query": "I have a dog named Bevara.", "answer": "Noted: your dog is called Bevara.", "interactions": [
        {"query": "What is my dog called?", "answer": "Bevara."},
        {"query": "Tell me a fact about mountains.", "answer": "There is a lot to learn."}]},
    {"query": "My locker code is 6943.", "answer": "Noted: your locker code is 6943.", "interactions": [
        {"query": "What is my locker code?", "answer": "It is 6943."}]},
    {"query": "What is 6 plus 11?", "answer": "6 plus 11 is 17.", "interactions": [
        {"query": "My sister is called Stikil.", "answer": "Noted."},
        {"query": "What is my name?", "answer": "You are Nizera."},
        {"query": "Who is my sister?", "answer": "Stikil."}]},
]  # fmt: skip
FOLLOW_UPS = [3, 2, 1, 3]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row["text"] for row in generate_pretrain(400, seed=3)]
    return train_rxt_tokenizer(texts, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def episodes(tokenizer):
    return MRLCollator(tokenizer, max_length=64)(ROWS)["episodes"]


def tiny_model(tokenizer, seed=0) -> RxTForCausalLM:
    ids = {k: v for k, v in check_rxt_tokenizer(tokenizer).items() if v is not None}
    torch.manual_seed(seed)
    config = RxTConfig.tiny(vocab_size=len(tokenizer), learned_stm_init=True, stm_init="normal", **ids)
    return RxTForCausalLM(config)


def eos_biased_model(tokenizer, seed=0, bias=5.0) -> RxTForCausalLM:
    """A tiny model that samples [EOS] often (~1 token in 4), so answers end early and have varied lengths."""
    model = tiny_model(tokenizer, seed)
    with torch.no_grad():
        model.lm_head.bias[check_rxt_tokenizer(tokenizer)["eos_token_id"]] += bias
    return model


def mrl_config(tmp_path, **kwargs) -> MRLConfig:
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, seed=0, per_device_train_batch_size=4, max_completion_length=8, warmup_steps=0,
                learning_rate=3e-3, max_length=64)  # fmt: skip
    return MRLConfig(**{**base, **kwargs})


def make_trainer(tokenizer, tmp_path, model=None, train_dataset=None, **kwargs) -> MRLTrainer:
    model = tiny_model(tokenizer) if model is None else model
    return MRLTrainer(model=model, args=mrl_config(tmp_path, **kwargs), processing_class=tokenizer,
                      train_dataset=train_dataset)  # fmt: skip


def special(tokenizer) -> dict[str, int]:
    return check_rxt_tokenizer(tokenizer)


def row(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


@torch.no_grad()
def replay(policy, rollout) -> list[dict]:
    """Our own replay of a rollout: per step the STM before/after writing `saved_ids`, and the decoder's logits on
    prompt + action reading the new STM (logits[:, p] predicts token p + 1)."""
    stm = rollout["start_stm"].transpose(0, 1)
    out = []
    for step in range(rollout["turn_mask"].shape[1]):
        new = policy(input_ids=rollout["saved_ids"][:, step], attention_mask=rollout["saved_mask"][:, step], stm=stm,
                     mode="memory_update").stm  # fmt: skip
        logits = policy(input_ids=rollout["qa_ids"][:, step], attention_mask=rollout["qa_mask"][:, step],
                        stm=new).logits.float()  # fmt: skip
        out.append({"before": stm, "after": new, "logits": logits})
        stm = new
    return out


def action_positions(rollout, b: int, step: int) -> list[int]:
    return rollout["action_mask"][b, step].nonzero().flatten().tolist()


def token_logps(logits: torch.Tensor, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Log-prob of token `ids[p]` for each action position `p` (predicted by `logits[p - 1]`)."""
    return torch.stack([logits[p - 1].log_softmax(-1)[ids[p]] for p in positions])


# --------------------------------------------------------------------------------------------------------------------
# 1. TRL helpers


def test_trl_compat_names_import_and_are_callable():
    module = importlib.reload(_trl_compat)  # re-runs the TRL imports
    used = {"RepeatSampler", "disable_dropout_in_model", "entropy_from_logits", "selective_log_softmax",
            "shuffle_sequence_dict", "split_tensor_dict", "unwrap_model_for_generation"}  # what trainers/mrl_trainer.py uses
    assert used == set(module.__all__)
    for name in module.__all__:
        assert callable(getattr(module, name)), name
    logits = torch.randn(2, 3, 5)
    index = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(_trl_compat.selective_log_softmax(logits, index),
                               logits.log_softmax(-1).gather(-1, index[..., None]).squeeze(-1))  # fmt: skip
    probs = logits.softmax(-1)
    torch.testing.assert_close(_trl_compat.entropy_from_logits(logits), -(probs * probs.log()).sum(-1))


# --------------------------------------------------------------------------------------------------------------------
# 2. Rollout structure


def test_config_parameters_docstring_lists_every_own_field():
    """The "Parameters" section of `MRLConfig` names every field the class declares, with its default."""
    import dataclasses

    own = MRLConfig.__dict__["__annotations__"]
    doc = MRLConfig.__doc__
    by_name = {f.name: f for f in dataclasses.fields(MRLConfig)}
    missing = [name for name in own if f"        {name} (`" not in doc]
    assert not missing, missing
    for name in own:
        default = repr(by_name[name].default).replace("'", '"')
        assert f"        {name} (`{own[name]}`, *optional*, defaults to `{default}`):" in doc, name


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_rollout_structure_and_replay_reproduces_old_logps(tokenizer, episodes, tmp_path, teacher_forcing):
    curriculum = json.dumps([{"steps": 1}, {"steps": 3, "teacher_forcing": teacher_forcing}])
    trainer = make_trainer(tokenizer, tmp_path, model=eos_biased_model(tokenizer), curriculum=curriculum,
                           stm_source="snapshot", max_completion_length=6, advantage_estimator="group",
                           num_generations=2, beta=0.0)  # fmt: skip
    trainer.set_epoch(1)
    assert (trainer.steps, trainer.teacher_forcing) == (3, teacher_forcing)
    ids = special(tokenizer)
    bos, q, a, eos = ids["bos_token_id"], ids["query_token_id"], ids["answer_token_id"], ids["eos_token_id"]
    forbidden = {ids["pad_token_id"], bos, q, a}
    torch.manual_seed(1)
    rollout = trainer.rollout(episodes)
    policy = trainer.model.policy

    # turn_mask: exactly `steps` answer steps (the follow-ups); missing follow-ups are masked
    expected_mask = torch.tensor([[step < n for step in range(3)] for n in FOLLOW_UPS])
    assert torch.equal(rollout["turn_mask"], expected_mask)
    assert rollout["rewards"].shape == rollout["advantages"].shape == (4, 3)
    # the STM starts from the model's initial STM (no random resets)
    torch.testing.assert_close(rollout["start_stm"], policy.initial_stm(4).transpose(0, 1), rtol=0, atol=0)

    lengths, ended = [], 0
    for b, episode in enumerate(episodes):
        q0, a0 = episode[0]
        first = [bos, q, *q0, a, *a0, eos]
        assert row(rollout["first_ids"][b], rollout["first_mask"][b]) == first
        assert row(rollout["saved_ids"][b, 0], rollout["saved_mask"][b, 0]) == first  # written, never answered
        for step in range(3):
            if step >= FOLLOW_UPS[b]:
                assert rollout["action_mask"][b, step].sum() == 0
                continue
            query, reference = episode[step + 1]
            qa = row(rollout["qa_ids"][b, step], rollout["qa_mask"][b, step])
            prompt = [bos, q, *query, a]
            assert qa[: len(prompt)] == prompt and rollout["prompt_len"][b, step] == len(prompt)
            positions = action_positions(rollout, b, step)
            action = rollout["qa_ids"][b, step, positions].tolist()
            # the action mask covers exactly the generated tokens after [A], up to and including [EOS]
            assert positions == list(range(len(prompt), len(qa))) and action == qa[len(prompt) :]
            assert 1 <= len(action) <= 6 and not forbidden & set(action)
            assert eos not in action[:-1] and (action[-1] == eos or len(action) == 6)
            lengths.append(len(action))
            ended += action[-1] == eos
            if step + 1 < 3 and step + 1 < FOLLOW_UPS[b]:  # the next step writes this turn into memory
                saved = row(rollout["saved_ids"][b, step + 1], rollout["saved_mask"][b, step + 1])
                written = [*reference, eos] if teacher_forcing else action
                assert saved == prompt + written
    assert ended >= 2 and len(set(lengths)) >= 3  # answers that stop at [EOS] (kept in the action) and full ones

    # memory changes at every step; snapshots chain; our replay reproduces the rollout's STM and old log-probs
    replayed = replay(policy, rollout)
    valid = rollout["turn_mask"]
    for step, states in enumerate(replayed):
        rows = valid[:, step]
        before, after = rollout["stm_before"][:, step].transpose(0, 1), rollout["stm_after"][:, step].transpose(0, 1)
        assert not torch.allclose(after[:, rows], before[:, rows], atol=1e-3)
        if step:
            torch.testing.assert_close(before[:, rows], rollout["stm_after"][:, step - 1].transpose(0, 1)[:, rows])
        torch.testing.assert_close(states["after"][:, rows], after[:, rows], atol=1e-5, rtol=0)
        for b in rows.nonzero().flatten().tolist():
            positions = action_positions(rollout, b, step)
            mine = token_logps(states["logits"][b], rollout["qa_ids"][b, step], positions)
            old = rollout["old_logps"][b, step, [p - 1 for p in positions]]
            torch.testing.assert_close(mine, old, atol=1e-5, rtol=0)

    # compute_loss replays the memory (stm_source="replay"): ratio == 1 at the first iteration
    trainer.args.stm_source = "replay"
    for name in ("entropy_coef", "interstep_kl_coef", "stm_diff_coef"):
        setattr(trainer.args, name, 0.0)
    inputs = {k: v for k, v in rollout.items() if k not in ("stm_before", "stm_after")}
    inputs["advantages"] = torch.ones(4, 3)
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    assert abs(loss.item() + 1.0) < 1e-5  # -mean(min(ratio, clip(ratio)) * 1) with ratio == 1
    assert trainer._metrics["train"]["clip_ratio"] == [0.0]


# --------------------------------------------------------------------------------------------------------------------
# 3. Reward modes through the trainer


class RecordingReward:
    def __init__(self, reward_fn):
        self.reward_fn, self.calls = reward_fn, []

    def __call__(self, generated, reference, saved, mode="standard", running_mean=None, first_step=False, **retention):
        out = self.reward_fn(generated, reference, saved, mode=mode, running_mean=running_mean, first_step=first_step,
                             **retention)  # fmt: skip
        self.calls.append({"generated": generated, "reference": reference, "saved": saved, "mode": mode,
                           "running_mean": running_mean, "first_step": first_step, **retention, "out": out})  # fmt: skip
        return out

    def __getattr__(self, name):
        return getattr(self.reward_fn, name)


@pytest.mark.parametrize("strategy", ["long_range", "multi_step", "delayed"])
def test_reward_modes_and_saved_data_follow_the_strategy(tokenizer, episodes, tmp_path, strategy):
    trainer = make_trainer(tokenizer, tmp_path, model=eos_biased_model(tokenizer), curriculum="3",
                           strategy="multi_step" if strategy == "delayed" else strategy,
                           delayed_final_reward=strategy == "delayed", max_completion_length=5,
                           advantage_estimator="group", num_generations=2, beta=0.0)  # fmt: skip
    recorder = RecordingReward(trainer.reward_fn)
    trainer.reward_fn = recorder
    ids = special(tokenizer)
    pad, eos = ids["pad_token_id"], ids["eos_token_id"]
    torch.manual_seed(2)
    rollout = trainer.rollout(episodes)

    modes = [call["mode"] for call in recorder.calls]
    expected = {"long_range": ["negative", "standard", "long_range"],
                "multi_step": ["standard", "standard", "standard"],
                "delayed": ["standard", "standard", "standard", "long_range"]}[strategy]  # fmt: skip
    assert modes == expected
    assert [c["first_step"] for c in recorder.calls[:3]] == [True, False, False]
    assert recorder.calls[0]["running_mean"] is None and recorder.calls[1]["running_mean"] is not None

    def bodies(tensor):
        return [[t for t in r if t != pad] for r in tensor.tolist()]

    first = [q0 + a0 for (q0, a0), *_ in episodes]
    answer_calls = recorder.calls[:3]
    for step, call in enumerate(answer_calls):
        if call["mode"] in ("negative", "long_range"):
            assert bodies(call["saved"]) == first  # the first interaction (topic change / long-range recall)
        elif step == 0:
            assert bodies(call["saved"]) == first
        else:  # the previous turn: its query and reference answer
            assert bodies(call["saved"]) == [e[step][0] + e[step][1] if len(e) > step else [] for e in episodes]
        assert bodies(call["reference"]) == [e[step + 1][1] if len(e) > step + 1 else [] for e in episodes]
        for b in rollout["turn_mask"][:, step].nonzero().flatten().tolist():  # the answer without [EOS]
            action = rollout["qa_ids"][b, step, action_positions(rollout, b, step)].tolist()
            assert bodies(call["generated"])[b] == [t for t in action if t != eos]
    if strategy == "delayed":
        assert bodies(recorder.calls[3]["saved"]) == first
        total = recorder.calls[2]["out"] + recorder.calls[3]["out"]
        torch.testing.assert_close(rollout["rewards"][:, 2], total)
    else:
        torch.testing.assert_close(rollout["rewards"], torch.stack([c["out"] for c in answer_calls], dim=1))


def test_fixed_answers_are_scored_instead_of_generated(tokenizer, episodes, tmp_path):
    """`rollout(answers=...)` / `evaluate(answers=...)` score the given answers (here the references: the reward's
    ceiling, scripts/eval_mrl.py) exactly where generated ones would be: actions = answer + [EOS], reward of
    (answer, reference); `generate` is never called."""
    trainer = make_trainer(tokenizer, tmp_path, curriculum="3", per_device_eval_batch_size=len(ROWS))
    recorder = RecordingReward(trainer.reward_fn)
    trainer.reward_fn = recorder
    trainer.model.policy.generate = None  # fails if called
    eos = special(tokenizer)["eos_token_id"]

    def references(episode):
        return [answer for _, answer in episode[1:]]

    rollout = trainer.rollout(episodes, greedy=True, answers=references)
    for step, call in enumerate(recorder.calls):
        assert torch.equal(call["generated"], call["reference"])
        for b in rollout["turn_mask"][:, step].nonzero().flatten().tolist():
            action = rollout["qa_ids"][b, step, action_positions(rollout, b, step)].tolist()
            assert action == episodes[b][step + 1][1] + [eos]
    torch.testing.assert_close(rollout["rewards"], torch.stack([c["out"] for c in recorder.calls], dim=1))
    valid = rollout["turn_mask"].bool()
    assert (rollout["rewards"][valid] > 0.5).all()  # 0.5 x BLEU of an answer against itself (1) + 0.5 x cosine

    def shortened(episode):  # a worse answer scores less
        return [answer[:1] for _, answer in episode[1:]]

    rows = Dataset.from_list(ROWS)
    exact = trainer.evaluate(eval_dataset=rows, answers=references)["eval_reward"]
    assert exact == pytest.approx(rollout["rewards"][valid].mean().item(), abs=1e-6)
    assert trainer.evaluate(eval_dataset=rows, answers=shortened)["eval_reward"] < exact


# --------------------------------------------------------------------------------------------------------------------
# 4. Loss terms against their formulas


@pytest.fixture(scope="module")
def loss_case(tokenizer, episodes, tmp_path_factory):
    """A trainer (no critic, reference model = copy of the initial policy), a 3-step rollout of the perturbed
    policy, and our own replay of it."""
    model = eos_biased_model(tokenizer, seed=3)  # varied answer lengths between steps (interstep KL alignment)
    reference = copy.deepcopy(model)
    trainer = make_trainer(tokenizer, tmp_path_factory.mktemp("loss"), model=model, curriculum="3", beta=0.1,
                           max_completion_length=6, advantage_estimator="group", num_generations=2)  # fmt: skip
    torch.manual_seed(4)
    with torch.no_grad():  # the policy moves away from the frozen reference
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    rollout = trainer.rollout(episodes)
    return trainer, reference, rollout, replay(model, rollout)


def run_loss(trainer, rollout, advantages=None, old_logps=None, **settings):
    defaults = dict(epsilon=0.2, beta=0.0, entropy_coef=0.0, interstep_kl_coef=0.0, stm_diff_coef=0.0,
                    cosine_sim_coef=0.0, use_stm_cosine_sim=False, stm_diff_metric="mse",
                    entropy_normalisation="mean", ref_kl_estimator="reference", bptt_steps=1)  # fmt: skip
    for name, value in {**defaults, **settings}.items():
        setattr(trainer.args, name, value)
    inputs = dict(rollout)
    inputs["advantages"] = torch.zeros(4, 3) if advantages is None else advantages
    if old_logps is not None:
        inputs["old_logps"] = old_logps
    trainer.model.train()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def test_clipped_policy_loss_equals_formula(loss_case):
    trainer, _, rollout, replayed = loss_case
    generator = torch.Generator().manual_seed(5)
    old_logps = rollout["old_logps"] + (torch.rand(rollout["old_logps"].shape, generator=generator) - 0.5)
    advantages = torch.randn(4, 3, generator=generator)
    loss, metrics = run_loss(trainer, rollout, advantages=advantages, old_logps=old_logps, epsilon=0.2)
    per_step, clipped_fraction = [], []
    for step, states in enumerate(replayed):
        rows, clipped, tokens = [], 0, 0
        for b in rollout["turn_mask"][:, step].nonzero().flatten().tolist():
            positions = action_positions(rollout, b, step)
            logp = token_logps(states["logits"][b], rollout["qa_ids"][b, step], positions)
            ratio = (logp - old_logps[b, step, [p - 1 for p in positions]]).exp()
            adv = advantages[b, step]
            rows.append(-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean())
            clipped += int(((ratio < 0.8) | (ratio > 1.2)).sum())
            tokens += len(positions)
        per_step.append(torch.stack(rows).mean())
        clipped_fraction.append(clipped / tokens)
    expected = torch.stack(per_step).mean()
    assert 0.05 < sum(clipped_fraction) / 3 < 0.95  # clipping is active on some tokens, not all
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert metrics["policy_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["clip_ratio"] == pytest.approx(sum(clipped_fraction) / 3, abs=1e-6)


@pytest.mark.parametrize(("bptt_steps", "step"), [(0, 2), (1, 2), (2, 1), (2, 2)])
def test_bptt_steps_sets_which_memory_writes_the_loss_reaches(loss_case, bptt_steps, step):
    """Only `step` has advantages: its policy loss reaches the writes since the last detach (every `bptt_steps`
    steps, before that step's write; 0: never)."""
    trainer, _, rollout, _ = loss_case
    model = trainer.model
    rows = rollout["turn_mask"][:, step].nonzero().flatten().tolist()
    advantages = torch.zeros(4, 3)
    advantages[rows, step] = torch.linspace(-1.0, 1.5, len(rows))
    params = {n: p for n, p in model.named_parameters() if ".memory_attention." in n}

    def manual_grads(detach_every: int) -> dict:
        model.zero_grad()
        stm = rollout["start_stm"].transpose(0, 1)
        for k in range(step + 1):
            if detach_every and k % detach_every == 0:
                stm = stm.detach()
            stm = model(input_ids=rollout["saved_ids"][:, k], attention_mask=rollout["saved_mask"][:, k], stm=stm,
                        mode="memory_update").stm  # fmt: skip
        logits = model(input_ids=rollout["qa_ids"][:, step], attention_mask=rollout["qa_mask"][:, step],
                       stm=stm).logits.float()  # fmt: skip
        per_row = []
        for b in rows:
            positions = action_positions(rollout, b, step)
            logp = token_logps(logits[b], rollout["qa_ids"][b, step], positions)
            ratio = (logp - rollout["old_logps"][b, step, [p - 1 for p in positions]]).exp()
            adv = advantages[b, step]
            per_row.append(-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean())
        (torch.stack(per_row).mean() / 3).backward()  # the loss is the mean over the 3 steps; the others give 0
        return {n: p.grad.clone() for n, p in params.items()}

    model.train()
    expected = manual_grads(bptt_steps)
    model.zero_grad()
    loss, _ = run_loss(trainer, rollout, advantages=advantages, bptt_steps=bptt_steps)
    loss.backward()
    for name, param in params.items():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)
    one_step = manual_grads(1)
    reaches_earlier_writes = bptt_steps == 0 or step % bptt_steps != 0
    assert reaches_earlier_writes == any(not torch.allclose(one_step[n], expected[n], atol=1e-7) for n in params)
    model.zero_grad()


@pytest.mark.parametrize("normalisation", ["mean", "reference"])
def test_entropy_term_equals_masked_mean(loss_case, normalisation):
    trainer, _, rollout, replayed = loss_case
    loss, metrics = run_loss(trainer, rollout, entropy_coef=0.3, entropy_normalisation=normalisation)
    per_step = []
    for step, states in enumerate(replayed):
        width = int(rollout["qa_mask"][:, step].sum(-1).max()) - 1  # T_pad: the step's own padded length
        values = []
        for b in rollout["turn_mask"][:, step].nonzero().flatten().tolist():
            probs = states["logits"][b].softmax(-1)
            entropy = -(probs * probs.log()).sum(-1)
            token_entropy = entropy[[p - 1 for p in action_positions(rollout, b, step)]]
            values.append(token_entropy if normalisation == "mean" else token_entropy.mean()[None] / width)
        per_step.append(torch.cat(values).mean())
    expected = torch.stack(per_step)
    torch.testing.assert_close(loss, -0.3 * expected.mean(), atol=1e-5, rtol=1e-5)
    assert metrics["entropy"] == pytest.approx(expected.mean().item(), rel=1e-5)


@pytest.mark.parametrize("estimator", ["reference", "k3"])
def test_reference_kl_equals_formula(loss_case, estimator):
    trainer, reference, rollout, replayed = loss_case
    loss, metrics = run_loss(trainer, rollout, beta=0.4, ref_kl_estimator=estimator)
    per_step = []
    with torch.no_grad():
        for step, states in enumerate(replayed):
            ref_logits = reference(input_ids=rollout["qa_ids"][:, step], attention_mask=rollout["qa_mask"][:, step],
                                   stm=states["after"]).logits.float()  # fmt: skip
            rows = []
            for b in rollout["turn_mask"][:, step].nonzero().flatten().tolist():
                positions = action_positions(rollout, b, step)
                logp = token_logps(states["logits"][b], rollout["qa_ids"][b, step], positions)
                ref = token_logps(ref_logits[b], rollout["qa_ids"][b, step], positions)
                kl = ref.exp() * (ref - logp) if estimator == "reference" else (ref - logp).exp() - (ref - logp) - 1
                rows.append(kl.mean())
            per_step.append(torch.stack(rows).mean())
    expected = torch.stack(per_step).mean()
    assert expected.abs() > 1e-6  # the policy differs from the reference (small: probabilities are ~1/400)
    torch.testing.assert_close(loss, 0.4 * expected, atol=1e-9, rtol=1e-4)
    assert metrics["ref_kl"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-9)


def test_interstep_kl_equals_formula(loss_case):
    trainer, _, rollout, replayed = loss_case
    loss, metrics = run_loss(trainer, rollout, interstep_kl_coef=0.5)
    terms, mismatched = [], 0
    for step in range(1, 3):
        total, count = 0.0, 0
        for b in rollout["turn_mask"][:, step].nonzero().flatten().tolist():
            now, before = action_positions(rollout, b, step), action_positions(rollout, b, step - 1)
            count += len(now)
            mismatched += len(now) != len(before)
            for j in range(min(len(now), len(before))):  # same answer position j in consecutive steps
                log_p = replayed[step]["logits"][b, now[j] - 1].log_softmax(-1)
                log_q = replayed[step - 1]["logits"][b, before[j] - 1].log_softmax(-1)
                total = total + (log_p.exp() * (log_p - log_q)).sum()
        terms.append(total / count)
    expected = torch.stack(terms)
    assert mismatched and (expected > 0).all()  # some answers are longer than the previous step's
    torch.testing.assert_close(loss, 0.5 * expected.sum() / 3, atol=1e-6, rtol=1e-5)  # no term at step 0
    assert metrics["interstep_kl"] == pytest.approx(expected.mean().item(), rel=1e-4)


@pytest.mark.parametrize("metric", ["mse", "rmse", "cosine"])
def test_memory_regulariser_equals_formula(loss_case, metric):
    trainer, _, rollout, replayed = loss_case
    if metric == "cosine":
        loss, _ = run_loss(trainer, rollout, use_stm_cosine_sim=True, cosine_sim_coef=0.7)
    else:
        loss, metrics = run_loss(trainer, rollout, stm_diff_coef=0.3, stm_diff_metric=metric)
    terms, diffs = [], []
    for step, states in enumerate(replayed):
        rows = rollout["turn_mask"][:, step]
        new, old = states["after"][:, rows], states["before"][:, rows]
        if metric == "cosine":
            cosines = [F.cosine_similarity(new[l, b].flatten(), old[l, b].flatten(), 0)
                       for l in range(new.shape[0]) for b in range(new.shape[1])]  # fmt: skip
            terms.append(-0.7 * torch.stack(cosines).mean())
            continue
        diff = ((new - old) ** 2).mean()
        diff = diff.sqrt() if metric == "rmse" else diff
        diffs.append(diff)
        terms.append(math.sqrt(step + 1) * 0.3 * diff)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-5)
    if metric != "cosine":
        assert metrics["stm_diff"] == pytest.approx(torch.stack(diffs).mean().item(), rel=1e-5)


def test_supervised_anchor_is_the_reference_answers_nll_on_the_policys_stm(tokenizer, episodes, tmp_path):
    """`sft_coef`: the rollout stores each step's reference answer on the step's prompt; the loss adds `sft_coef` x the
    mean over steps of the mean over episodes of the reference tokens' (+ [EOS]) NLL read from the same STM as the
    policy, and its gradient reaches the memory writer."""
    trainer = make_trainer(tokenizer, tmp_path, curriculum="3", teacher_forcing=True, sft_coef=0.6,
                           advantage_estimator="group", num_generations=2)  # no critic loss
    rollout = trainer.rollout(episodes)
    ids = special(tokenizer)
    model = trainer.model
    replayed = replay(model, rollout)
    per_step = []
    for step, states in enumerate(replayed):
        logits = model(input_ids=rollout["sft_ids"][:, step], attention_mask=rollout["sft_mask"][:, step],
                       stm=states["after"]).logits.float()  # fmt: skip
        rows = []
        for b, episode in enumerate(episodes):
            if len(episode) <= step + 1:
                assert row(rollout["sft_ids"][b, step], rollout["sft_mask"][b, step]) == [
                    ids["bos_token_id"], ids["query_token_id"], ids["answer_token_id"], ids["eos_token_id"]]
                continue  # a placeholder row: its episode has no step here, so it has no targets
            query, answer = episode[step + 1]
            prompt = [ids["bos_token_id"], ids["query_token_id"], *query, ids["answer_token_id"]]
            reference = prompt + answer + [ids["eos_token_id"]]
            assert row(rollout["sft_ids"][b, step], rollout["sft_mask"][b, step]) == reference
            assert int(rollout["prompt_len"][b, step]) == len(prompt)
            targets = list(range(len(prompt), len(reference)))
            rows.append(-token_logps(logits[b], rollout["sft_ids"][b, step], targets).mean())
        if step == 0:
            rows_step0 = [r.detach() for r in rows]
        per_step.append(torch.stack(rows).mean())
    expected = torch.stack(per_step).mean()
    loss, metrics = run_loss(trainer, rollout, sft_coef=0.6, bptt_steps=0)
    torch.testing.assert_close(loss, 0.6 * expected, atol=1e-5, rtol=1e-5)
    assert metrics["sft_loss"] == pytest.approx(expected.item(), rel=1e-5)
    model.zero_grad()
    loss.backward()
    writer = [p.grad for n, p in model.named_parameters() if ".memory_attention." in n]
    assert all(g is not None for g in writer) and any(g.abs().sum() > 0 for g in writer)
    model.zero_grad()
    without, _ = run_loss(trainer, rollout, sft_coef=0.0)  # the policy loss alone (advantages 0)
    assert without.abs().item() < 1e-7
    trainer.args.sft_coef = 0.6
    minibatch = {k: v[2:3] for k, v in rollout.items()}  # one 1-step episode: steps 1 and 2 have no episode
    loss, _ = run_loss(trainer, minibatch, advantages=torch.zeros(1, 3), sft_coef=0.6, bptt_steps=0)
    torch.testing.assert_close(loss, 0.6 * rows_step0[2] / 1, atol=1e-5, rtol=1e-5)  # mean over the 1 present step


def test_each_step_runs_on_its_own_width(loss_case):
    """Every step's memory write and answer forward run up to that step's last real position: widening the stacked
    tensors with trailing pads changes neither the loss nor the gradients, and the forwards see the step widths."""
    trainer, _, rollout, _ = loss_case
    model = trainer.model
    settings = dict(advantages=torch.randn(4, 3, generator=torch.Generator().manual_seed(8)), beta=0.1,
                    entropy_coef=0.2, interstep_kl_coef=0.3, stm_diff_coef=0.3, bptt_steps=0)  # fmt: skip
    widths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)  # fmt: skip
    try:
        model.zero_grad()
        loss, _ = run_loss(trainer, rollout, **settings)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        per_step = [tuple(int(rollout[f"{kind}_mask"][:, step].sum(-1).max()) for kind in ("saved", "qa"))
                    for step in range(3)]
        assert widths == [w for pair in per_step for w in pair]  # write, then answer, per step
        assert min(qa for _, qa in per_step) < rollout["qa_ids"].shape[-1]  # this case has a step to cut

        widened = dict(rollout)
        for key in ("saved_ids", "saved_mask", "qa_ids", "qa_mask", "action_mask", "critic_ids", "critic_mask",
                    "old_logps"):  # fmt: skip
            value = trainer.ids["pad_token_id"] if key.endswith("_ids") else 0
            widened[key] = F.pad(rollout[key], (0, 5), value=value)
        model.zero_grad()
        widened_loss, _ = run_loss(trainer, widened, **settings)
        widened_loss.backward()
    finally:
        hook.remove()
    torch.testing.assert_close(widened_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5, msg=name)
    model.zero_grad()


def test_critic_loss_equals_clamped_mse(tokenizer, episodes, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, curriculum="3", beta=0.0, max_completion_length=4,
                           critic_value_clip=0.05)  # fmt: skip
    torch.manual_seed(6)
    rollout = trainer.rollout(episodes)
    loss, metrics = run_loss(trainer, rollout)
    terms = []
    with torch.no_grad():
        for step in range(3):
            rows = rollout["turn_mask"][:, step]
            values = trainer.model.critic(rollout["critic_ids"][:, step], rollout["critic_mask"][:, step])
            target = rollout["rewards"][:, step]
            terms.append(((values.clamp(-0.05, 0.05) - target.clamp(-0.05, 0.05))[rows] ** 2).mean())
    expected = torch.stack(terms).mean()
    assert expected > 0
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert metrics["critic_loss"] == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(rollout["values"], torch.stack(
        [trainer.model.critic(rollout["critic_ids"][:, s], rollout["critic_mask"][:, s]) for s in range(3)], 1),
        atol=1e-5, rtol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# 5. Advantages


def zscore(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + eps)


def test_advantages_group_critic_gae_and_modes(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, beta=0.0, gae_gamma=0.9, gae_lambda=0.8)
    args = trainer.args
    generator = torch.Generator().manual_seed(7)
    # group: 2 episodes x 3 answers; the second episode has 2 follow-ups
    rewards = torch.rand(6, 3, generator=generator)
    mask = torch.tensor([[True] * 3] * 3 + [[True, True, False]] * 3)
    args.advantage_estimator, args.advantage_mode = "group", "none"
    got = trainer.compute_advantages(rewards, None, mask, repeats=3)
    expected = torch.zeros(6, 3)
    for group in range(2):
        for step in range(3):
            rows = [group * 3 + i for i in range(3) if mask[group * 3 + i, step]]
            if rows:
                expected[rows, step] = zscore(rewards[rows, step], 1e-4)
    torch.testing.assert_close(got, expected)
    assert got[3:, 2].eq(0).all()

    # critic: R - V, masked
    values = torch.rand(6, 3, generator=generator)
    args.advantage_estimator = "critic"
    torch.testing.assert_close(trainer.compute_advantages(rewards, values, mask, 1),
                               (rewards - values).masked_fill(~mask, 0))  # fmt: skip

    # GAE against a hand loop (done after each episode's last valid step)
    args.use_gae = True
    gae = trainer.compute_advantages(rewards, values, mask, 1)
    for b in range(6):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            following = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + 0.9 * following - values[b, t].item()
            running = delta + (0.9 * 0.8 * running if t + 1 < n else 0.0)
            assert gae[b, t].item() == pytest.approx(running, abs=1e-6)
        assert gae[b, n:].eq(0).all()
    args.use_gae = False

    # normalisation modes on R - V with one outlier among 150 valid entries (z ~ 12: clipped to 10 except in "all")
    rewards = torch.randn(100, 3, generator=generator)
    rewards[0, 0] = 40.0
    values = torch.zeros(100, 3)
    mask = torch.ones(100, 3, dtype=torch.bool)
    mask[:, 2] = False
    mask[::2, 1] = False
    raw = rewards.masked_fill(~mask, 0)
    valid = raw[mask]
    for mode in ("none", "all", "batch", "step"):
        args.advantage_mode = mode
        got = trainer.compute_advantages(rewards, values, mask, 1)
        if mode == "none":
            expected = raw
        elif mode in ("all", "batch"):
            expected = ((raw - valid.mean()) / (valid.std() + 1e-8)).masked_fill(~mask, 0)
        else:
            expected = torch.zeros(100, 3)
            for step in range(2):
                rows = mask[:, step]
                expected[rows, step] = zscore(raw[rows, step], 1e-8)
        if mode in ("batch", "step"):
            expected = expected.clamp(-10, 10)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got[:, 2].eq(0).all() and got[::2, 1].eq(0).all()
    args.advantage_mode = "all"
    assert trainer.compute_advantages(rewards, values, mask, 1)[0, 0] > 10
    args.advantage_mode = "batch"
    assert trainer.compute_advantages(rewards, values, mask, 1)[0, 0] == 10


# --------------------------------------------------------------------------------------------------------------------
# 6. Freeze stages


def test_frac_reward_zero_std_counts_groups_without_spread(tokenizer, tmp_path):
    """TRL GRPO's `frac_reward_zero_std`: share of (episode, step) groups whose rollouts all got the same reward."""
    trainer = make_trainer(tokenizer, tmp_path, num_generations=2)
    rewards = torch.tensor([[0.5, 0.2, 0.7], [0.5, 0.3, 0.1],   # episode 0: step 0 equal, steps 1, 2 differ
                            [0.4, 0.9, 0.0], [0.4, 0.9, 0.6]])  # episode 1: steps 0, 1 equal, step 2 absent
    mask = torch.tensor([[True] * 3] * 2 + [[True, True, False]] * 2)
    trainer._metrics["train"].clear()
    trainer._log_rollout({"rewards": rewards, "turn_mask": mask, "action_mask": torch.ones(4, 3, 5)})
    assert trainer._metrics["train"]["frac_reward_zero_std"] == [pytest.approx(3 / 5)]


def test_unfreeze_epochs_give_the_freeze_stages():
    args = MRLConfig(output_dir="unused", report_to="none", use_cpu=True, unfreeze_epoch="[1, 2, 3]")
    assert args.unfreeze == [(1, None), (2, None), (3, None)]
    assert [freeze_stage(args.unfreeze, epoch) for epoch in range(5)] == ["warmup", "fetch", "update", "all", "all"]
    args = MRLConfig(output_dir="unused", report_to="none", use_cpu=True, unfreeze_epoch="2")
    assert [freeze_stage(args.unfreeze, epoch) for epoch in range(4)] == ["fetch", "fetch", "all", "all"]
    args = MRLConfig(output_dir="unused", report_to="none", use_cpu=True, unfreeze_epoch="[[1, 1e-3], 1, [4, 2e-4]]")
    assert args.unfreeze == [(1, 1e-3), (1, None), (4, 2e-4)]
    assert [freeze_stage(args.unfreeze, epoch) for epoch in range(5)] == ["warmup", "update", "update", "update", "all"]
    assert freeze_stage(0, 0) == "all"


def param_component(name: str) -> str:
    return "critic" if name.startswith("critic.") else component_of(name.replace("policy.", "", 1))


def test_gradients_reach_exactly_the_unfrozen_components(tokenizer, episodes, tmp_path):
    curriculum = json.dumps([{"steps": 2, "epochs": 4}])
    trainer = make_trainer(tokenizer, tmp_path, curriculum=curriculum, unfreeze_epoch="[1, 2, 3]",
                           max_completion_length=4, num_iterations=1, beta=0.1)  # fmt: skip
    names = [name for name, _ in trainer.model.named_parameters()]
    fetch_markers = (".memory_cross_attention.", ".norm2.", ".stm_norm.")
    expected_policy = {
        "warmup": {n for n in names if param_component(n) == "memory_attention"},
        "fetch": {n for n in names if param_component(n) == "memory_attention"
                  or (param_component(n) == "decoder" and any(m in n for m in fetch_markers))},
        "update": {n for n in names if param_component(n) in ("memory_attention", "encoder", "embedding")
                   or (param_component(n) == "decoder" and any(m in n for m in fetch_markers))},
        "all": {n for n in names if param_component(n) != "critic"},
    }  # fmt: skip
    critic = {n for n in names if n.startswith("critic.")}
    assert critic and all(n.startswith("policy.") for n in expected_policy["all"])
    assert any(".memory_cross_attention." in n for n in expected_policy["fetch"])
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop; training_step is called directly
    for epoch, stage in enumerate(("warmup", "fetch", "update", "all")):
        trainer.set_epoch(epoch)
        assert trainer.freeze_stage == stage
        assert trainer.trainable == expected_policy[stage] | critic
        assert {n for n in names if trains_in_stage(n, stage, False)} == trainer.trainable
        trainer.model.zero_grad(set_to_none=True)
        trainer._buffer, trainer._step = [], 0
        trainer.model.train()
        torch.manual_seed(epoch)
        loss = trainer.training_step(trainer.model, {"episodes": episodes})
        assert torch.isfinite(loss)
        reached = set()
        for name, param in trainer.model.named_parameters():
            if name not in trainer.trainable:
                assert param.grad is None, (stage, name)
            elif param.grad is not None and param.grad.abs().sum() > 0:
                reached.add(param_component(name))
        assert reached == {param_component(n) for n in trainer.trainable}, stage
        if stage in ("fetch", "update"):
            grads = {n: p.grad for n, p in trainer.model.named_parameters() if ".memory_cross_attention." in n}
            assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not trains_in_stage("policy.model.embed_tokens.weight", "all", True)
    assert trains_in_stage("policy.model.embed_tokens.weight", "all", False)


# --------------------------------------------------------------------------------------------------------------------
# 7. Config validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"strategy": "sometimes"}, "strategy"),
        ({"advantage_estimator": "rloo"}, "advantage_estimator"),
        ({"advantage_mode": "global"}, "advantage_mode"),
        ({"advantage_estimator": "group", "num_generations": 1}, "num_generations"),
        ({"advantage_estimator": "group", "num_generations": 2, "use_gae": True}, "use_gae"),
        ({"advantage_estimator": "group", "num_generations": 2, "critic_name_or_path": "runs/mrl"},
         "critic_name_or_path='runs/mrl' needs advantage_estimator='critic'"),
        ({"curriculum": "1,two,4"}, "curriculum"),
        ({"curriculum": "1,0"}, "steps=0"),
        ({"curriculum": "[]"}, "curriculum"),
        ({"curriculum": '[{"steps": 2, "epochs": 1, "stepz": 3}]'}, "stepz"),
        ({"curriculum": '[{"steps": 2, "strategy": "nope"}]'}, "strategy"),
        ({"curriculum": '[{"steps": 2, "random_resets_ratio": 1.5}]'}, "random_resets_ratio"),
        ({"unfreeze_epoch": "[3, 2, 1]"}, "unfreeze_epoch"),
        ({"entropy_coef": -0.1}, "entropy_coef"),
        ({"beta": -1.0}, "beta"),
        ({"interstep_kl_coef": -0.01}, "interstep_kl_coef"),
        ({"stm_diff_coef": -1e-4}, "stm_diff_coef"),
        ({"sft_coef": -0.5}, "sft_coef=-0.5: expected a finite value >= 0"),
        ({"sft_coef": float("inf")}, "sft_coef=inf"),
        ({"epsilon": -0.2}, "epsilon"),
        ({"stm_diff_metric": "mae"}, "stm_diff_metric"),
        ({"ref_kl_estimator": "k2"}, "ref_kl_estimator"),
        ({"bptt_steps": -1}, "bptt_steps=-1: expected 0"),
        ({"bptt_steps": 0, "stm_source": "snapshot"}, "bptt_steps=0 needs stm_source='replay'"),
        ({"bleu_factor": 0.9}, "bleu_factor"),
        ({"replay_buffer_size": -1}, "replay_buffer_size=-1: expected an integer >= 0"),
        ({"replay_buffer_size": 2, "replay_buffer_update_size": 3},
         r"replay_buffer_update_size=3: expected <= replay_buffer_size \(2\)"),
        ({"replay_buffer_size": 2, "replay_buffer_update_size": 0}, "replay_buffer_update_size=0: expected an integer"),
        ({"replay_buffer_size": 2, "replay_buffer_max_age": 0}, "replay_buffer_max_age=0: expected an integer >= 1"),
        ({"curriculum": '[{"steps": 2, "replay_buffer": true}]'}, "replay_buffer=true needs replay_buffer_size > 0"),
        ({"curriculum": '[{"steps": 2, "replay_buffer": {"size": 2, "update_size": 5}}]'},
         r"curriculum stage 0 replay_buffer\.update_size=5: expected <= curriculum stage 0 replay_buffer\.size \(2\)"),
        ({"curriculum": '[{"steps": 1}, {"steps": 2, "replay_buffer": {"sise": 2}}]'}, "stage 1 replay_buffer.*sise"),
        ({"curriculum": '[{"steps": 2, "replay_buffer": "big"}]'}, "replay_buffer='big'"),
    ],
)
def test_config_validation_names_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        mrl_config(tmp_path, **kwargs)


def test_curriculum_parsing_and_single_step_alias(tmp_path):
    args = mrl_config(tmp_path, curriculum="1,2,4")
    assert [stage.steps for stage in args.curriculum_stages] == [1, 2, 4]
    assert args.num_train_epochs == 3
    assert [args.stage_at(epoch)[0].steps for epoch in range(5)] == [1, 2, 4, 4, 4]
    args = mrl_config(tmp_path, curriculum='[{"steps": 2, "epochs": 2}, {"steps": 5, "strategy": "long_range"}]')
    assert args.num_train_epochs == 3
    assert [(s.steps, s.epochs, s.strategy) for s in args.curriculum_stages] == [(2, 2, None), (5, 1, "long_range")]
    assert args.stage_at(1)[1] == 1 and args.stage_at(2)[0].steps == 5
    assert args.ddp_static_graph  # several DDP forwards (replay, decoder, critic) per backward
    with pytest.warns(UserWarning, match="single_step"):
        args = mrl_config(tmp_path, strategy="single_step")
    assert args.strategy == "multi_step"


# --------------------------------------------------------------------------------------------------------------------
# 8. Reward rises on a learnable task


def test_reward_rises_on_a_learnable_episode_set(tokenizer, tmp_path):
    """Every follow-up answer is "Yes.": group-normalised IMPO must move the policy towards it."""
    rows = [{"query": r["query"], "answer": r["answer"], "interactions": [{"query": "Is it true?", "answer": "Yes."}]}
            for r in ROWS] * 4  # fmt: skip
    trainer = make_trainer(tokenizer, tmp_path, train_dataset=Dataset.from_list(rows), curriculum="1", max_steps=80,
                           advantage_estimator="group", num_generations=4, beta=0.0, max_completion_length=6,
                           num_iterations=2, learning_rate=5e-3, lr_scheduler_type="constant")  # fmt: skip
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(rewards) == 40  # one rollout every num_iterations = 2 steps
    head, tail = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert tail > head + 0.15 and tail > 3 * head, rewards


# --------------------------------------------------------------------------------------------------------------------
# 9. Saving


def test_save_model_writes_a_remote_code_policy_and_the_critic(tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model = tiny_model(tokenizer, seed=8)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tokenizer, tmp_path / "run", model=model, train_dataset=Dataset.from_list(ROWS),
                           curriculum="2", max_steps=2, num_iterations=1, max_completion_length=4,
                           beta=0.0)  # fmt: skip
    trainer.train()
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters())
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "config.json").is_file() and (out / "modeling_rxt.py").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "critic" / "model.safetensors").is_file()
    assert json.loads((out / "critic" / "config.json").read_text())["activation"] == "sigmoid"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rxt.RxTForCausalLM"
    # the folder's own code (the package's registered classes would win in this process)
    remote_class = get_class_from_dynamic_module(config["auto_map"]["AutoModelForCausalLM"], str(out))
    assert remote_class is not RxTForCausalLM and remote_class.__name__ == "RxTForCausalLM"
    remote = remote_class.from_pretrained(str(out)).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    model.eval()
    ids = special(tokenizer)
    interaction = torch.tensor([[ids["bos_token_id"], ids["query_token_id"], 51, 373, ids["answer_token_id"], 57, 85,
                                 ids["eos_token_id"]]])  # fmt: skip
    prompt = interaction[:, :5]
    logits = []
    with torch.no_grad():
        for net in (model, loaded, remote):  # write an interaction into memory, then decode a prompt reading it
            stm = net(input_ids=interaction, mode="memory_update", stm=net.initial_stm(1)).stm
            logits.append(net(input_ids=prompt, stm=stm).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    torch.testing.assert_close(logits[2], logits[0], rtol=0, atol=0)
    critic = load_file(str(out / "critic" / "model.safetensors"))
    state = trainer.model.critic.state_dict()
    assert set(critic) == set(state) and all(torch.equal(critic[k], state[k]) for k in state)


def test_critic_name_or_path_loads_the_critic_strictly(tokenizer, tmp_path):
    """An MRL output (policy model.safetensors + critic/model.safetensors: the critic's is taken) or a folder holding
    the critic's model.safetensors itself; a mismatch names the folder and the key."""
    from safetensors.torch import save_file

    source = RxTCritic(tiny_model(tokenizer, seed=3))
    with torch.no_grad():
        source.shift.fill_(0.5)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    (tmp_path / "mrl_output" / "critic").mkdir(parents=True)
    save_file({"not_the_critic": torch.zeros(1)}, str(tmp_path / "mrl_output" / "model.safetensors"))
    save_file(weights, str(tmp_path / "mrl_output" / "critic" / "model.safetensors"))
    (tmp_path / "file_only").mkdir()
    save_file(weights, str(tmp_path / "file_only" / "model.safetensors"))
    for folder in ("mrl_output", "file_only"):
        trainer = make_trainer(tokenizer, tmp_path / "out", critic_name_or_path=str(tmp_path / folder))
        state = trainer.model.critic.state_dict()
        assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights), folder
    del weights["value.bias"]
    (tmp_path / "broken").mkdir()
    save_file(weights, str(tmp_path / "broken" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)critic_name_or_path='.*broken'.*value\.bias"):
        make_trainer(tokenizer, tmp_path / "out", critic_name_or_path=str(tmp_path / "broken"))
    (tmp_path / "mrl_output" / "critic" / "config.json").write_text('{"activation": "tanh", "init_scale": 10.0}')
    with pytest.raises(ValueError, match=r"activation 'tanh', this run uses critic_activation='sigmoid'"):
        make_trainer(tokenizer, tmp_path / "out", critic_name_or_path=str(tmp_path / "mrl_output"))
    trainer = make_trainer(tokenizer, tmp_path / "out", critic_name_or_path=str(tmp_path / "mrl_output"),
                           critic_activation="tanh")  # fmt: skip
    assert trainer.model.critic.activation == "tanh"


# --------------------------------------------------------------------------------------------------------------------
# 10. Two-process DDP


DDP_BODY = r"""
from trainers.mrl_config import MRLConfig
from trainers.mrl_trainer import MRLTrainer
model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tok), learned_stm_init=True, stm_init="normal", **ids))
before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
args = MRLConfig(output_dir=sys.argv[2], per_device_train_batch_size=2, report_to="none", use_cpu=True,
                 save_strategy="no", disable_tqdm=True, learning_rate=3e-3, logging_steps=1, curriculum="1,2",
                 advantage_estimator="critic", num_iterations=1, max_completion_length=4, max_length=64, beta=0.05,
                 replay_buffer_size=2, replay_buffer_update_size=1)
rows = Dataset.from_list(generate_dialogues(8, seed=9, min_turns=3, max_turns=3))
trainer = MRLTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
seen, rollout = [], trainer.rollout
def recording_rollout(episodes, repeats=1):
    seen.append([query for (query, _), *_ in episodes])
    return rollout(episodes, repeats)
trainer.rollout = recording_rollout
trainer.train()
rank = dist.get_rank()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as handle:
    json.dump({"hash": digest, "changed": not torch.equal(flat[: before.numel()], before),
               "steps": trainer.state.global_step, "world": dist.get_world_size(), "queries": seen,
               "episode_steps": [e["episode_steps"] for e in trainer.state.log_history if "episode_steps" in e],
               "replayed": [e["replayed_episodes"] for e in trainer.state.log_history if "replayed_episodes" in e]},
              handle)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_mrl_two_process_ddp_keeps_replicas_in_sync(tmp_path):
    _, out = run_torchrun(DDP_BODY, tmp_path, master_port=29531)
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["world"] == 2 and r["changed"] for r in reports)
    assert reports[0]["steps"] == reports[1]["steps"] >= 2
    assert reports[0]["queries"] != reports[1]["queries"]  # each rank rolled out its own episodes...
    assert reports[0]["hash"] == reports[1]["hash"]  # ...and the replicas are bit-identical after training
    assert set(reports[0]["episode_steps"]) == {1.0, 2.0}  # the curriculum switched from 1 to 2 steps
    # each process replays its own buffer (2 episodes from the stage's first rollout; emptied at the stage switch)
    assert reports[0]["replayed"] == reports[1]["replayed"] == [0.0, 2.0, 0.0, 2.0]


FSDP2_BODY = r"""
import copy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from trainers.mrl_config import MRLConfig
from trainers.mrl_trainer import MRLCollator, MRLTrainer
dist.init_process_group("gloo")
model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tok), learned_stm_init=True, stm_init="normal", **ids))
episodes = MRLCollator(tok, max_length=64)(generate_dialogues(4, seed=9, min_turns=3, max_turns=3))["episodes"]
def make(net):
    args = MRLConfig(output_dir=sys.argv[2], per_device_train_batch_size=4, report_to="none", use_cpu=True,
                     save_strategy="no", curriculum="2", max_completion_length=6, max_length=64, beta=0.05)
    return MRLTrainer(model=net, args=args, processing_class=tok)
plain, sharded = make(copy.deepcopy(model)), make(copy.deepcopy(model))
wrapper = sharded.model  # as scripts/accelerate/fsdp.yaml wraps the trainer's model: its layers, then the root
wrapper.critic.load_state_dict(plain.model.critic.state_dict())  # the same critic head (its init drew other numbers)
for module in wrapper.modules():
    if type(module).__name__ in wrapper.policy._no_split_modules:
        fully_shard(module)
fully_shard(wrapper)
report = {}
for name, trainer in (("plain", plain), ("sharded", sharded)):
    net = trainer.model
    rollout = trainer.rollout(episodes, greedy=True)  # the policy called directly, the initial STM read outside forward
    net.train()
    net.zero_grad()
    loss = trainer.compute_loss(net, {k: v for k, v in rollout.items() if torch.is_tensor(v) and v.dim() > 0})
    loss.backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    report[name] = {"rewards": rollout["rewards"].tolist(), "values": rollout["values"].tolist(), "loss": loss.item(),
                    "grads": {n: full(p.grad).tolist() for n, p in net.named_parameters() if p.grad is not None}}
    torch.optim.SGD(net.parameters(), lr=50.0).step()  # a large step: the embedding the reward reads moves
    report[name]["rewards_after_step"] = trainer.rollout(episodes, greedy=True, answers=lambda e: [a for _, a in e[1:]])["rewards"].tolist()
    report[name]["embedding"] = full(net.policy.get_input_embeddings().weight).detach().flatten()[:64].tolist()
    # saving as Trainer.save_model does under FSDP2: every process, with accelerate's gathered full state dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    trainer._save(os.path.join(sys.argv[2], name), state_dict=get_model_state_dict(net, options=options)
                  if name == "sharded" else None)
if dist.get_rank() == 0:
    with open(os.path.join(sys.argv[2], "report.json"), "w") as handle:
        json.dump(report, handle)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_mrl_fsdp2_sharded_model_gets_the_unsharded_rollout_loss_and_gradients(tmp_path):
    """A rollout + IMPO loss on the trainer's model sharded as `scripts/accelerate/fsdp.yaml` does (FSDP2, 2 CPU
    processes, the same episodes on both) equals the unsharded one: rewards, critic values, loss, every gradient;
    after an optimizer step the reward's cosine reads the trained embedding, not the copy taken before sharding; and
    the folders saved from accelerate's gathered state dict hold the unsharded model's policy and critic."""
    from safetensors.torch import load_file

    _, out = run_torchrun(FSDP2_BODY, tmp_path, master_port=29533)
    report = json.loads((out / "report.json").read_text())
    plain, sharded = report["plain"], report["sharded"]
    assert sharded["rewards"] == plain["rewards"] and sharded["values"] == plain["values"]
    assert sharded["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert set(sharded["grads"]) == set(plain["grads"]) and len(plain["grads"]) > 50
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(torch.tensor(sharded["grads"][name]), torch.tensor(grad), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(sharded["embedding"]), torch.tensor(plain["embedding"]))
    assert plain["rewards_after_step"] != plain["rewards"]
    torch.testing.assert_close(torch.tensor(sharded["rewards_after_step"]), torch.tensor(plain["rewards_after_step"]))
    for file in ("model.safetensors", "critic/model.safetensors"):  # the saved folders: the same tensors, full size
        saved, expected = load_file(out / "sharded" / file), load_file(out / "plain" / file)
        assert set(saved) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-6)  # after the lr-50 step
    assert load_file(out / "sharded" / "critic" / "model.safetensors")["scale"].shape == ()  # the reference layout


# --------------------------------------------------------------------------------------------------------------------
# 11. Replay buffer


def hand_episode(i: int) -> dict:
    return {"id": torch.tensor([[i]])}


def buffer_ids(buffer: MrlReplayBuffer) -> list[int]:
    return [int(episode["id"]) for episode in buffer.episodes()]


def test_replay_buffer_score_is_mean_over_steps_of_mean_minus_std_over_generations():
    import statistics

    # 2 episodes x G = 3 generations x 3 steps; the second episode has 2 steps (its third is masked)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.8, 0.2, 0.5], [0.6, 0.4, 0.5],
                            [0.3, 0.9, 9.0], [0.3, 0.1, 9.0], [0.3, 0.5, 9.0]])  # fmt: skip
    mask = torch.tensor([[True, True, True]] * 3 + [[True, True, False]] * 3)
    expected = []
    for episode, steps in ((0, 3), (1, 2)):
        rows = rewards[3 * episode : 3 * episode + 3].tolist()
        per_step = [statistics.mean(r[s] for r in rows) - statistics.stdev(r[s] for r in rows) for s in range(steps)]
        expected.append(statistics.mean(per_step))
    torch.testing.assert_close(MrlReplayBuffer.score(rewards, mask, generations=3), torch.tensor(expected))
    assert expected[0] == pytest.approx((0.8 - 0.2 + 0.2 - 0.2 + 0.5) / 3)  # the spread is subtracted
    # G = 1 (critic): no spread within a step, the score is the mean reward over the episode's steps
    single = MrlReplayBuffer.score(rewards, mask, generations=1)
    torch.testing.assert_close(single[:3], rewards[:3].mean(-1))
    torch.testing.assert_close(single[3:], rewards[3:, :2].mean(-1))
    # an episode without steps ranks last
    assert MrlReplayBuffer.score(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool), 2).item() == float("-inf")


def test_replay_buffer_ageing_eviction_order_and_replacement():
    buffer = MrlReplayBuffer(size=4, update_size=1, max_age=2)
    # an empty buffer takes the 4 best of the first collection (best first)
    assert buffer.add([hand_episode(i) for i in range(6)], [0.1, 0.5, 0.3, 0.9, 0.2, 0.4]) == {"evicted": 0,
                                                                                                "inserted": 4}
    assert buffer_ids(buffer) == [3, 1, 5, 2] and [e["age"] for e in buffer.entries] == [0, 0, 0, 0]
    # full: update_size = 1 entry replaced, the lowest score (no entry is aged yet), even by a worse new episode
    assert buffer.add([hand_episode(10)], [0.05]) == {"evicted": 1, "inserted": 1}
    assert buffer_ids(buffer) == [3, 1, 5, 10] and [e["age"] for e in buffer.entries] == [1, 1, 1, 0]
    # entries aged >= max_age go first, lowest score first among them: 5 (0.4), not 10 (0.05, age 1)
    buffer.add([hand_episode(20), hand_episode(21)], [0.01, 0.8])
    assert buffer_ids(buffer) == [3, 1, 10, 21]  # ... replaced by the best new episode
    assert [e["age"] for e in buffer.entries] == [2, 2, 1, 0]
    # 10 is now aged too, and the lowest of the aged ones (3: 0.9, 1: 0.5, 10: 0.05)
    buffer.add([hand_episode(30), hand_episode(31), hand_episode(32)], [0.6, 0.7, 0.1])
    assert buffer_ids(buffer) == [3, 1, 21, 31]
    # two aged entries, two replacements: both aged ones go although they score highest
    buffer = MrlReplayBuffer(size=3, update_size=2, max_age=1)
    buffer.add([hand_episode(i) for i in range(3)], [0.9, 0.8, 0.1])
    buffer.add([hand_episode(7), hand_episode(8)], [0.2, 0.3])  # all aged: lowest scores 2 (0.1), 1 (0.8) go
    assert buffer_ids(buffer) == [0, 8, 7] and [e["score"] for e in buffer.entries] == [0.9, 0.3, 0.2]


def test_replay_buffer_size_cap_and_state_round_trip():
    buffer = MrlReplayBuffer(size=4, update_size=3)
    buffer.add([hand_episode(0), hand_episode(1)], [0.5, 0.6])  # fewer new episodes than free slots
    assert len(buffer) == 2
    buffer.add([hand_episode(i) for i in range(10, 13)], [0.1, 0.2, 0.3])  # 3 replaced: 2 free + 1 evicted (0.5)
    assert len(buffer) == 4 and buffer_ids(buffer) == [1, 12, 11, 10]
    for round_ in range(5):
        buffer.add([hand_episode(100 + round_ * 10 + i) for i in range(8)], torch.rand(8).tolist())
        assert len(buffer) == 4
    restored = MrlReplayBuffer.from_state_dict(buffer.state_dict())
    assert buffer_ids(restored) == buffer_ids(buffer)
    assert [(e["score"], e["age"]) for e in restored.entries] == [(e["score"], e["age"]) for e in buffer.entries]
    for args, field in (((0, 1), "size=0"), ((2, 3), r"update_size=3: expected <= size \(2\)"),
                        ((2, 1, 0), "max_age=0"), ((2, 0), "update_size=0")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            MrlReplayBuffer(*args)


def test_replay_buffer_settings_per_curriculum_stage(tokenizer, tmp_path):
    curriculum = json.dumps([{"steps": 1, "replay_buffer": False}, {"steps": 2}, {"steps": 3, "replay_buffer": {
        "size": 6, "max_age": 5}}, {"steps": 4, "replay_buffer": 2}])  # fmt: skip
    trainer = make_trainer(tokenizer, tmp_path, curriculum=curriculum, replay_buffer_size=4, beta=0.0)
    stages = trainer.args.curriculum_stages
    assert trainer.args.replay_buffer == ReplayBufferSettings(4, 2, 3)  # update_size None: size // 2
    assert [s.replay_buffer for s in stages] == [None, (4, 2, 3), (6, 3, 5), (2, 1, 3)]
    assert trainer.replay_buffer is None  # stage 0: off
    trainer.set_epoch(1)
    buffer = trainer.replay_buffer
    assert (buffer.size, buffer.update_size, buffer.max_age) == (4, 2, 3)
    buffer.add([hand_episode(0)], [1.0])
    trainer.set_epoch(1)
    assert trainer.replay_buffer is buffer and len(buffer) == 1  # same stage: kept
    trainer.set_epoch(2)
    assert trainer.replay_buffer is not buffer and len(trainer.replay_buffer) == 0  # a new stage starts empty
    assert mrl_config(tmp_path).replay_buffer is None  # off by default


def test_concat_padded_pads_every_dimension():
    a = {"qa_ids": torch.ones(1, 2, 3, dtype=torch.long), "prompt_len": torch.full((1, 2), 4), "x": torch.ones(1, 2)}
    b = {"x": torch.ones(2, 3), "qa_ids": torch.ones(2, 3, 5, dtype=torch.long), "prompt_len": torch.full((2, 3), 4)}
    out = concat_padded([a, b], pad_id=7)
    assert out["qa_ids"].shape == (3, 3, 5) and out["qa_ids"][0, :2, 3:].eq(7).all() and out["qa_ids"][0, 2].eq(7).all()
    assert out["prompt_len"][0].tolist() == [4, 4, 1] and out["x"][0].tolist() == [1, 1, 0]


def action_row_key(batch: dict, row: int) -> tuple:
    """A rollout row by content: per step its action tokens, and its rewards."""
    steps = batch["turn_mask"].shape[1]
    actions = tuple(tuple(batch["qa_ids"][row, s][batch["action_mask"][row, s].bool()].tolist()) for s in range(steps))
    return actions, tuple(round(r, 6) for r in batch["rewards"][row].tolist())


def action_logps(batch: dict, row: int) -> torch.Tensor:
    steps = batch["turn_mask"].shape[1]
    return torch.cat([batch["old_logps"][row, s][batch["action_mask"][row, s, 1:].bool()] for s in range(steps)])


@pytest.mark.parametrize("log_probs_source", ["collect", "update"])
def test_replay_buffer_episodes_enter_the_loss(tokenizer, tmp_path, log_probs_source):
    """4 rollouts of 4 episodes x 2 generations; the buffer (3 episodes) joins rollouts 2-4. Every replayed row in the
    loss is a row collected by an earlier rollout; its old log-probs are the sampler's (collect) or recomputed by the
    current policy (update)."""
    trainer = make_trainer(tokenizer, tmp_path, model=eos_biased_model(tokenizer), curriculum="2", max_steps=8,
                           train_dataset=Dataset.from_list(ROWS * 2), per_device_train_batch_size=2,
                           steps_per_generation=2, num_iterations=1, advantage_estimator="group", num_generations=2,
                           beta=0.0, max_completion_length=4, replay_buffer_size=3, replay_buffer_update_size=2,
                           log_probs_source=log_probs_source)  # fmt: skip
    rollouts, losses = [], []
    rollout, compute_loss = trainer.rollout, trainer.compute_loss

    def recording_rollout(*args, **kwargs):
        out = rollout(*args, **kwargs)
        rollouts.append({k: v.clone() for k, v in out.items()})
        return out

    def recording_loss(model, inputs, *args, **kwargs):
        losses.append((len(rollouts), {k: v.clone() for k, v in inputs.items()}))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.rollout, trainer.compute_loss = recording_rollout, recording_loss
    trainer.train()
    logs = trainer.state.log_history
    assert all(math.isfinite(e["loss"]) for e in logs if "loss" in e)
    assert [e["replayed_episodes"] for e in logs if "replayed_episodes" in e] == [0, 3, 3, 3]
    assert [e["replay_buffer_episodes"] for e in logs if "replay_buffer_episodes" in e] == [3, 3, 3, 3]
    assert sum(e["replayed_rows"] for e in logs if "replayed_rows" in e) == 3 * 3 * 2  # 3 episodes x G, 3 rollouts
    stored = defaultdict(list)  # row content -> [(rollout index, old log-probs at collection)] (short answers repeat)
    for index, batch in enumerate(rollouts, start=1):
        for row in range(batch["rewards"].shape[0]):
            stored[action_row_key(batch, row)].append((index, action_logps(batch, row)))
    replayed, moved = 0, 0
    for index, inputs in losses:
        assert {"replayed", "advantages", "old_logps"} <= set(inputs)
        for row in range(inputs["rewards"].shape[0]):
            origins = stored[action_row_key(inputs, row)]
            if not inputs["replayed"][row]:
                assert index in [origin for origin, _ in origins]  # fresh rows come from this rollout
                continue
            replayed += 1
            earlier = [logps for origin, logps in origins if origin < index]
            assert earlier  # replayed rows were collected by an earlier rollout
            same = [torch.equal(action_logps(inputs, row), logps) for logps in earlier]
            if log_probs_source == "collect":  # the sampler's log-probs of that collection
                assert any(same)
            else:  # recomputed by the policy of this update, which has moved since
                moved += not any(torch.allclose(action_logps(inputs, row), logps, atol=1e-6) for logps in earlier)
    assert replayed == 18
    if log_probs_source == "update":
        assert moved == replayed  # recomputed by the policy of that update, which has moved since collection
        # ... and the recomputation is the policy's log-prob of the action on the replayed STM
        episodes = concat_padded(trainer.replay_buffer.episodes(), special(tokenizer)["pad_token_id"])
        policy = trainer.model.policy.eval()
        refreshed = trainer._refresh_replayed(dict(episodes))
        for step, states in enumerate(replay(policy, episodes)):
            for b in episodes["turn_mask"][:, step].nonzero().flatten().tolist():
                positions = action_positions(episodes, b, step)
                mine = token_logps(states["logits"][b], episodes["qa_ids"][b, step], positions)
                torch.testing.assert_close(refreshed["old_logps"][b, step, [p - 1 for p in positions]], mine,
                                           atol=1e-5, rtol=0)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# 12. Resume from a checkpoint


def run_mrl(tokenizer, output, resume=None, **kwargs):
    """An MRL run on 8 episodes with checkpoints every 3 steps; returns the per-step logs, the trainer."""
    rows = Dataset.from_list(ROWS * 2)
    trainer = make_trainer(tokenizer, output, model=tiny_model(tokenizer, seed=5), train_dataset=rows, curriculum="1,2",
                           save_strategy="steps", save_steps=3, max_completion_length=4, **kwargs)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}, trainer


RESUME_CASES = {
    # critic, reference KL, replay buffer, random resets (carried STM + reset RNG); a generation every 4 steps
    "critic": dict(max_steps=14, per_device_train_batch_size=2, steps_per_generation=2, num_iterations=2,
                   random_resets=True, random_resets_ratio=0.5, replay_buffer_size=3, replay_buffer_update_size=2),
    # group advantages, gradient accumulation 2: a generation every 4 optimizer steps of 2 micro-batches
    "group_accumulation": dict(max_steps=13, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                               steps_per_generation=4, num_iterations=2, advantage_estimator="group",
                               num_generations=2, beta=0.0),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_checkpoint_repeats_the_uninterrupted_run(tokenizer, tmp_path, case):
    """Resuming inside a generation batch (checkpoint-3) and in the second curriculum stage (checkpoint-9, epoch 1)
    gives the same logs (losses, rewards, replay counts) and the same policy, critic and optimizer state, bit for bit.
    """
    kwargs = RESUME_CASES[case]
    full, trainer = run_mrl(tokenizer, tmp_path / "full", **kwargs)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    optimizer = trainer.optimizer.state_dict()["state"]
    assert any(n.startswith("critic.") for n in final) == (case == "critic")
    state = torch.load(tmp_path / "full" / "checkpoint-3" / "mrl_state_0.pt", weights_only=True)
    assert state["step"] == 3 * trainer.args.gradient_accumulation_steps and state["generation_batch"]
    if case == "critic":  # a checkpoint on a generation boundary stores no generation batch
        assert not torch.load(tmp_path / "full" / "checkpoint-12" / "mrl_state_0.pt", weights_only=True)[
            "generation_batch"]  # fmt: skip
        assert len(state["replay_buffer"]["entries"]) == 3
    for checkpoint in (3, 9):
        resumed, trainer = run_mrl(tokenizer, tmp_path / f"resumed{checkpoint}",
                                   resume=str(tmp_path / "full" / f"checkpoint-{checkpoint}"), **kwargs)  # fmt: skip
        steps = range(checkpoint + 1, kwargs["max_steps"] + 1)
        assert set(steps) <= set(resumed)
        for step in steps:
            assert resumed[step] == full[step], (checkpoint, step)
        assert any("reward" in resumed[step] for step in steps)  # rollouts after the resume
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param, final[name]), name
        for index, values in trainer.optimizer.state_dict()["state"].items():
            assert all(torch.equal(v, optimizer[index][k]) for k, v in values.items())


def test_evaluate_starts_from_the_initial_stm_and_leaves_the_training_state(tokenizer, tmp_path):
    """Greedy evaluation episodes start from the initial STM (not the STM carried between training batches) and
    neither the carried STM nor the reset RNG of the training rollouts change."""
    rows = Dataset.from_list(ROWS)
    trainer = make_trainer(tokenizer, tmp_path, train_dataset=rows, curriculum="2", random_resets=True,
                           random_resets_ratio=0.5, per_device_eval_batch_size=len(ROWS))  # fmt: skip
    fresh = trainer.evaluate(eval_dataset=rows)
    carried = torch.randn_like(trainer.model.policy.initial_stm(len(ROWS)))
    trainer._carry_stm = carried.clone()
    rng_state = trainer._rng.get_state()
    assert trainer.evaluate(eval_dataset=rows)["eval_reward"] == fresh["eval_reward"]
    assert torch.equal(trainer._carry_stm, carried)
    assert torch.equal(trainer._rng.get_state(), rng_state)


def test_load_best_model_at_end_restores_the_best_checkpoint(tokenizer, tmp_path):
    """With `load_best_model_at_end` the policy and critic after training are those of the best-scoring checkpoint."""
    from safetensors.torch import load_file

    rows = Dataset.from_list(ROWS)
    args = mrl_config(tmp_path, curriculum="1", max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                      eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_reward",
                      greater_is_better=True, max_completion_length=4)  # fmt: skip
    trainer = MRLTrainer(model=tiny_model(tokenizer), args=args, processing_class=tokenizer, train_dataset=rows,
                         eval_dataset=rows)  # fmt: skip
    evaluate = trainer.evaluate

    def evaluate_first_best(*args, **kwargs):  # the real evaluation, scored so that the first checkpoint is best
        metrics = evaluate(*args, **kwargs)
        metrics["eval_reward"] = 1.0 / trainer.state.global_step
        return metrics

    trainer.evaluate = evaluate_first_best
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")  # not the last one: the weights must actually be reloaded
    policy = load_file(os.path.join(best, "model.safetensors"))
    critic = load_file(os.path.join(best, "critic", "model.safetensors"))
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(wrapper.policy.state_dict()[k], v) for k, v in policy.items())
    assert all(torch.equal(wrapper.critic.state_dict()[k], v) for k, v in critic.items())


def test_critic_formula(tokenizer):
    """docs/conversion.md#critic: V = act(Linear(LayerNorm(a[:D] * silu(a[D:])))) * scale + shift, a = GLU(masked
    mean)."""
    torch.manual_seed(0)
    critic = RxTCritic(tiny_model(tokenizer), activation="tanh", init_scale=3.0)
    with torch.no_grad():
        critic.shift.fill_(0.25)
    ids = torch.randint(7, len(tokenizer), (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        hidden = critic.encoder(input_ids=ids, attention_mask=mask, mode="encode").last_hidden_state
        pooled = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
        a = critic.glu(pooled)
        dim = pooled.shape[-1]
        expected = torch.tanh(critic.value(critic.norm(a[:, :dim] * F.silu(a[:, dim:]))).squeeze(-1)) * 3.0 + 0.25
        torch.testing.assert_close(critic(ids, mask), expected)

"""Model behaviour: every architecture option runs and trains, cached generation equals recomputation, multi-turn
memory through generate + update_memory, chat sessions, STM persistence, bad inputs."""

import contextlib
import math
import threading
import warnings

import pytest
import torch
from transformers import TextIteratorStreamer

import modeling_rxt  # noqa: F401 - registers the Auto classes
from modeling_rxt import CACHE_KWARG, RxTCache, RxTChatSession, RxTConfig, RxTForCausalLM, RxTStatelessConfig
from modeling_rxt.modeling_rxt import RxTFeedForward, RxTModel, RxTStatelessForCausalLM, apply_rotary
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer

V = 256


def build(config: RxTConfig, seed: int = 0) -> RxTForCausalLM:
    torch.manual_seed(seed)
    return RxTForCausalLM(config).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(7, V, (batch, length), generator=generator)


MOE = dict(use_moe=True, num_experts=4, moe_top_k=2, ff_dim=16)
GATED = dict(use_gated_residual=True)
OPTION_CASES = {
    "simple-static-sigmoid": ("simple", {}, {}, {**GATED, "residual_gate_type": "static", "use_tanh_residual_gate": False}),
    "simple-ungated-disable-residual": ("simple", {}, {}, {"disable_residual": True}),
    "self-gated-rms-tanh": (
        "self",
        {"use_rms_norm": False, "use_gated": False, "ff_activation": "gelu"},
        {"use_rms_norm": False},
        {**GATED, "norm_type": "rms", "use_gate_for_self_attention": True, "residual_per_slot_gate": False},
    ),
    "interlayer-linear-gates-linear-status": (
        "interlayer",
        {"use_gated_attention": True, "use_attention_output_bias": False},
        {},
        {**GATED, "residual_gate_type": "linear", "residual_gate_slot_status_type": "linear", "norm_type": "layer"},
    ),
    "self-interlayer-adaptive": ("self-interlayer", {"use_rope": False}, {"use_rope": False}, {**GATED, "norm_type": "adaptive"}),
    "grouped-positional": (
        "grouped-self-interlayer",
        dict(num_layers=4),
        dict(num_layers=4),
        {**GATED, "num_layers": 4, "num_groups": 2, "norm_type": "positional", "residual_gate_type": "elementwise",
         "residual_gate_slot_status_type": "linear"},
    ),
    "moe-shared1-global": ("simple", {**MOE, "num_shared_experts": 1, "shared_expert_dim": 12}, {}, {}),
    "moe-shared2-local-weighted": (
        "simple",
        {**MOE, "num_shared_experts": 2, "moe_bias_mode": "local", "moe_shared_experts_bias_mode": "global",
         "moe_use_weighted_shared_experts": True},
        {},
        {},
    ),
    "moe-top1-off-stateless": (
        "self-interlayer",
        {**MOE, "moe_top_k": 1, "num_shared_experts": 0, "moe_bias_mode": "off", "stateless_layers_config": ["dense", "moe"],
         "final_stateless_layers_config": ["moe"], "dense_layer_dim": 24, "head_norm_type": "layer_norm"},
        {},
        {},
    ),
    "revsqa-mqa-gqa": (
        "self-interlayer",
        {"self_att_type": "sqa", "att_query_groups": 1, "att_groups": 2, "cross_att_type": "mqa"},
        {"self_att_type": "gqa", "att_groups": 2},
        {"att_type": "mha", "interlayer_att_type": "sqa", "interlayer_att_query_groups": 1, "interlayer_att_groups": 4},
    ),
}


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_every_option_runs_trains_and_round_trips(name, tmp_path):
    variant, decoder, encoder, memory = OPTION_CASES[name]
    layout = "split_concat" if "moe" in name else "interleaved"
    config = RxTConfig.tiny(
        memory_attention_variant=variant, decoder=decoder, encoder=encoder, memory_attention=memory,
        rope_layout=layout, use_mlm_head=True, learned_stm_init=True,
    )  # fmt: skip
    model = build(config)
    ids, mask = random_ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0

    model.train()
    new_stm = model(ids, attention_mask=mask, stm=model.initial_stm(2), mode="memory_update").stm
    out = model(ids, attention_mask=mask, stm=new_stm, labels=ids.masked_fill(mask == 0, -100))
    mlm = model(ids, attention_mask=mask, labels=ids, mode="mlm")
    loss = out.loss + mlm.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    assert torch.isfinite(loss)
    if "moe" in name:
        assert out.aux_loss is not None and out.aux_loss > 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradients: {missing}"

    model.eval()
    stm = model.initial_stm(2)
    logits = model(ids, attention_mask=mask, stm=stm).logits
    updated = model.update_memory(ids, mask, stm)
    assert updated.shape == stm.shape and torch.isfinite(updated).all()
    model.save_pretrained(tmp_path)
    reloaded = RxTForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids, attention_mask=mask, stm=stm).logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.update_memory(ids, mask, stm), updated, rtol=0, atol=0)


def test_rope_layouts_rotate_pairs_as_documented():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0
    angle = torch.tensor(1.0)
    cos, sin = torch.stack([angle, angle / 100]).cos(), torch.stack([angle, angle / 100]).sin()
    interleaved = apply_rotary(x, cos, sin, "interleaved").flatten()
    split = apply_rotary(x, cos, sin, "split_concat").flatten()
    torch.testing.assert_close(interleaved, torch.tensor([angle.cos(), angle.sin(), 0.0, 0.0]))
    torch.testing.assert_close(split, torch.tensor([angle.cos(), 0.0, angle.sin(), 0.0]))


def test_rope_complex_fast_path_equals_the_real_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=generator).transpose(1, 2).requires_grad_()  # [B, H, T, hd] as _split gives
    angles = torch.randn(2, 1, 5, 8, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    fast = apply_rotary(x, cos, sin, "interleaved")  # fp32: one complex multiply
    x64 = x.detach().double().requires_grad_()
    real = apply_rotary(x64, cos.double(), sin.double(), "interleaved")  # other dtypes: slices + stack
    torch.testing.assert_close(fast, real.float(), rtol=0, atol=1e-6)
    weights = torch.randn(fast.shape, generator=generator)
    (fast * weights).sum().backward()
    (real * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=0, atol=1e-6)
    odd = torch.randn(2, 3, 5, 17, generator=generator)[..., 1:]  # odd strides and offset: the real form is used
    torch.testing.assert_close(apply_rotary(odd, cos, sin, "interleaved"),
                               apply_rotary(odd.double(), cos.double(), sin.double(), "interleaved").float())  # fmt: skip


def test_gated_feed_forward_equals_the_formula_and_backprops_without_slices():
    """`fc2(a[:F] · act(a[F:]))` with `a = fc1(x)`, values and gradients exactly; the halves come from one chunk, so the
    backward concatenates the two gradients instead of zero-filling a `[.., 2F]` buffer per half (SliceBackward)."""
    torch.manual_seed(0)
    ff = RxTFeedForward(16, 24, gated=True, activation="silu", dropout=0.0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = ff(x)
    a = torch.nn.functional.linear(x, ff.fc1.weight, ff.fc1.bias)
    expected = ff.fc2(a[..., :24] * torch.nn.functional.silu(a[..., 24:]))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weights = torch.randn(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), (x, ff.fc1.weight, ff.fc1.bias))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x, ff.fc1.weight, ff.fc1.bias))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    nodes, seen = [out.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert type(node).__name__ != "SliceBackward0", "the gated FF halves are slices: backward zero-fills [.., 2F]"
        nodes.extend(next_node for next_node, _ in node.next_functions)


def test_rope_traces_into_one_compiled_graph():
    """Under torch.compile the fp32 interleaved rotation takes the real form without a graph break (the fast path's
    stride / storage-offset checks must not run while compiling)."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=generator).transpose(1, 2)  # [B, H, T, hd]
    angles = torch.randn(2, 1, 5, 8, generator=generator)
    compiled = torch.compile(apply_rotary, backend="eager", fullgraph=True)  # a graph break raises here
    torch.testing.assert_close(compiled(x, angles.cos(), angles.sin(), "interleaved"),
                               apply_rotary(x, angles.cos(), angles.sin(), "interleaved"), rtol=0, atol=1e-6)  # fmt: skip


def test_padding_changes_nothing_on_real_positions():
    model = build(RxTConfig.tiny())
    stm = model.initial_stm(1)
    ids = random_ids(1, 9)
    padded = torch.cat([ids, torch.full((1, 4), 77)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask, stm=stm).logits[:, :9], model(ids, stm=stm).logits)
    torch.testing.assert_close(model.update_memory(padded, mask, stm), model.update_memory(ids, None, stm))
    torch.testing.assert_close(model.encode(padded, mask)[:, :, :9], model.encode(ids))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_cached_generation_equals_uncached_recomputation(batch_size):
    model = build(RxTConfig.tiny(decoder=dict(stateless_layers_config=["dense"], final_stateless_layers_config=["dense"])))
    ids = random_ids(batch_size, 7)
    stm = torch.randn(2, batch_size, 8, 32, generator=torch.Generator().manual_seed(3))
    cache = RxTCache(stm=stm)
    out = model.generate(
        ids, cache=cache, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    full = model(out.sequences, stm=stm).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, rtol=0, atol=1e-5)
    assert torch.equal(full.argmax(-1), out.sequences[:, ids.shape[1] :])
    assert getattr(out, CACHE_KWARG) is cache and cache.stm is stm


def test_past_key_values_is_an_alias_of_cache():
    """transformers 5.24 renamed the cache keyword to `cache`; the old name still reaches the same code path."""
    model = build(RxTConfig.tiny())
    ids, stm = random_ids(1, 6), torch.randn(2, 1, 8, 32, generator=torch.Generator().manual_seed(4))
    by_new = model(ids, cache=RxTCache(stm=stm), use_cache=True)
    expectation = pytest.warns(FutureWarning, match="cache") if CACHE_KWARG == "cache" else contextlib.nullcontext()
    with expectation:
        by_old = model(ids, past_key_values=RxTCache(stm=stm), use_cache=True)
    torch.testing.assert_close(by_old.logits, by_new.logits, rtol=0, atol=0)
    assert by_old.cache.get_seq_length() == 6 and by_old.cache.stm is stm
    generated = {}
    for name in ("cache", "past_key_values"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            generated[name] = model.generate(ids, **{name: RxTCache(stm=stm)}, max_new_tokens=4, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert torch.equal(generated["cache"], generated["past_key_values"])
    with pytest.raises(ValueError, match="Both `past_key_values` and `cache` are set.*Pass the RxTCache once"):
        model(ids, cache=RxTCache(stm=stm), past_key_values=RxTCache(stm=stm))


def test_memory_kv_projected_once_per_turn(monkeypatch):
    model = build(RxTConfig.tiny())
    calls = []
    for layer in model.model.decoder.layers:
        original = layer.project_memory
        monkeypatch.setattr(layer, "project_memory", lambda s, original=original: calls.append(1) or original(s))
    cache = RxTCache()
    out = model.generate(random_ids(1, 5), cache=cache, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert len(calls) == 2  # one projection per memory layer for the whole turn, not per token
    model.update_memory(out, None, cache)
    assert len(calls) == 4  # the memory update projects the next turn's K/V from the new STM ...
    model.generate(random_ids(1, 5, seed=3), cache=cache, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert len(calls) == 4  # ... so the next turn's prompt phase does not
    model.train()
    model.update_memory(out, None, cache)
    assert len(calls) == 4 and cache.memory_kv == {}  # training mode reads memory K/V uncached: nothing to prepare


def test_left_padded_batch_generation_equals_single_rows():
    model = build(RxTConfig.tiny())
    rows = [random_ids(1, 6, seed=5), random_ids(1, 9, seed=6)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - row.shape[1] :], mask[i, 9 - row.shape[1] :] = row, 1
    batched = model.generate(ids, attention_mask=mask, cache=RxTCache(), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)  # fmt: skip
    for i, row in enumerate(rows):
        single = model.generate(row, cache=RxTCache(), max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, 9:], single[0, row.shape[1] :])


def test_two_turns_through_generate_and_update_memory():
    model = build(RxTConfig.tiny())
    cache = RxTCache()
    turn1 = random_ids(1, 6, seed=11)
    out1 = model.generate(turn1, cache=cache, max_new_tokens=5, do_sample=False, eos_token_id=None)
    first_stm = cache.stm.clone()
    torch.testing.assert_close(first_stm, model.initial_stm(1))
    new_stm = model.update_memory(out1, None, cache)
    assert cache.get_seq_length() == 0 and cache.stm is new_stm and not torch.allclose(new_stm, first_stm)
    assert sorted(cache.memory_kv) == [0, 1]  # the next turn's memory K/V, projected from the new STM
    for layer in model.model.decoder.layers:
        i = layer.memory_layer_idx
        for got, want in zip(cache.memory_kv[i], layer.project_memory(new_stm[i])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    turn2 = random_ids(1, 8, seed=12)
    out2 = model.generate(turn2, cache=cache, max_new_tokens=5, do_sample=False, eos_token_id=None,
                          return_dict_in_generate=True, output_logits=True)  # fmt: skip
    assert torch.equal(out2.sequences[:, :8], turn2)  # the turn-2 prompt is intact (nothing sliced off)
    with_memory = model(out2.sequences, stm=new_stm).logits[:, 7:-1]
    torch.testing.assert_close(torch.stack(out2.logits, 1), with_memory, rtol=0, atol=1e-5)
    fresh = model(out2.sequences, stm=first_stm).logits[:, 7:-1]
    assert (with_memory - fresh).abs().max() > 1e-3  # the output depends on the STM

    with pytest.raises(ValueError, match="previous turn"):
        model.generate(turn2, cache=cache, max_new_tokens=2)


def test_beams_and_return_sequences_with_batch1_stm():
    model = build(RxTConfig.tiny())
    stm = torch.randn(2, 1, 8, 32, generator=torch.Generator().manual_seed(0))
    ids = random_ids(1, 5)
    cache = RxTCache(stm=stm)
    beams = model.generate(ids, cache=cache, max_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None)
    assert beams.shape == (1, 9)
    greedy_first = model(ids, stm=stm).logits[0, -1].argmax()
    cache = RxTCache(stm=stm)
    sampled = model.generate(ids, cache=cache, max_new_tokens=4, num_return_sequences=3, do_sample=True,
                             top_k=5, eos_token_id=None)  # fmt: skip
    assert sampled.shape == (3, 9) and cache.stm.shape == (2, 1, 8, 32)  # one STM row per conversation again
    torch.testing.assert_close(cache.stm, stm, rtol=0, atol=0)
    assert greedy_first.ndim == 0


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"my name is alice {i} and i live in paris number {i * 7}" for i in range(200)]
    return train_rxt_tokenizer(texts, vocab_size=300, min_frequency=1)


def test_streamer_in_thread_terminates(tokenizer):
    model = build(RxTConfig.tiny(vocab_size=len(tokenizer)))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    prompt = tokenizer("[BOS][Q]hello[A]", add_special_tokens=False, return_tensors="pt")
    thread = threading.Thread(
        target=model.generate,
        kwargs=dict(**prompt, cache=RxTCache(), streamer=streamer, max_new_tokens=8, do_sample=False),
    )
    thread.start()
    text = "".join(streamer)
    thread.join(timeout=30)
    assert not thread.is_alive() and isinstance(text, str)


@pytest.mark.parametrize("background", [False, True])
def test_chat_session_turns_update_memory(tokenizer, background, tmp_path):
    model = build(RxTConfig.tiny(vocab_size=len(tokenizer)))
    session = RxTChatSession(model, tokenizer, background_update=background)
    initial = session.stm.clone()
    answer = session.interact("my name is alice", max_new_tokens=6)
    assert isinstance(answer, str)
    after_one = session.stm.clone()  # waits for a background update
    assert not torch.equal(after_one, initial)
    session.interact("where do i live", max_new_tokens=6)
    assert not torch.equal(session.stm, after_one)

    path = tmp_path / "conversation.safetensors"
    session.save(str(path))
    restored = RxTChatSession.load(model, tokenizer, str(path))
    assert torch.equal(restored.stm, session.stm)  # bit-exact

    # the same turn from the same state gives the same answer and the same next STM
    a = session.interact("what is my name", max_new_tokens=6)
    b = restored.interact("what is my name", max_new_tokens=6)
    assert a == b and torch.equal(session.stm, restored.stm)


def test_chat_session_batches_conversations(tokenizer):
    model = build(RxTConfig.tiny(vocab_size=len(tokenizer)))
    batched = RxTChatSession(model, tokenizer, batch_size=2)
    answers = batched.interact(["my name is alice", "i live in paris number 7 and more"], max_new_tokens=5)
    singles = [RxTChatSession(model, tokenizer) for _ in range(2)]
    expected = [s.interact(q, max_new_tokens=5) for s, q in zip(singles, ["my name is alice", "i live in paris number 7 and more"])]
    assert answers == expected
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched.stm[:, i : i + 1], single.stm, rtol=0, atol=1e-5)


def test_stateless_baseline_same_blocks_no_memory(tmp_path):
    config = RxTStatelessConfig.from_rxt_config(RxTConfig.tiny())
    torch.manual_seed(0)
    baseline = RxTStatelessForCausalLM(config).eval()
    assert not any("memory" in name or "stm" in name for name, _ in baseline.named_parameters())
    ids = random_ids(2, 8)
    out = baseline.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                            output_logits=True)  # fmt: skip
    full = baseline(out.sequences).logits[:, 7:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    baseline.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, RxTStatelessForCausalLM)


# -- bad inputs ---------------------------------------------------------------------------------------------------
def test_bad_stm_inputs_name_the_expected_shape():
    model = build(RxTConfig.tiny())
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"expected \[L=2, batch, S=8, D=32\]"):
        model(ids, stm=torch.zeros(3, 2, 8, 32))
    with pytest.raises(ValueError, match="S=8"):
        model(ids, stm=torch.zeros(2, 2, 9, 32))
    with pytest.raises(ValueError, match="D=32"):
        model.update_memory(ids, None, torch.zeros(2, 2, 8, 16))
    with pytest.raises(ValueError, match="stm batch 3 does not fit the input batch 2"):
        model(ids, stm=torch.zeros(2, 3, 8, 32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(ids, stm=torch.full((2, 2, 8, 32), float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.update_memory(ids, None, torch.full((2, 1, 8, 32), float("inf")))
    with pytest.raises(ValueError, match="must be a tensor"):
        model(ids, stm=torch.zeros(8, 32))


def test_seq_len_is_not_a_hard_limit():
    """docs/spec.md#configuration: `seq_len` is a RoPE-table hint; longer inputs run, causally consistent."""
    model = build(RxTConfig.tiny())  # seq_len 256
    ids = random_ids(1, 300)
    stm = model.initial_stm(1)
    with torch.no_grad():
        long_logits = model(ids, stm=stm).logits
        head_logits = model(ids[:, :256], stm=stm).logits
        ed = model.encode(ids)
    assert long_logits.shape[1] == 300 and ed.shape[2] == 300
    torch.testing.assert_close(long_logits[:, :256], head_logits, atol=1e-5, rtol=0)


def test_bad_token_inputs():
    model = build(RxTConfig.tiny())
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model.update_memory(random_ids(2, 4), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="mode='bogus'"):
        model(random_ids(1, 4), mode="bogus")
    with pytest.raises(ValueError, match="no MLM head"):
        model.mlm_logits(random_ids(1, 4))
    with pytest.raises(ValueError, match="RxTCache"):
        from transformers import DynamicCache

        model.generate(random_ids(1, 4), cache=DynamicCache(), max_new_tokens=2)


def test_missing_files_in_model_folder(tmp_path):
    build(RxTConfig.tiny()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin|no file named"):
        RxTForCausalLM.from_pretrained(tmp_path)


def test_chat_session_rejects_tokenizer_without_rxt_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.add_special_tokens(["<unk>", "<pad>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(ValueError, match=r"missing RxT special tokens .*\[Q\]"):
        RxTChatSession(build(RxTConfig.tiny()), plain)


def test_chat_session_rejects_mismatched_token_ids(tokenizer):
    model = build(RxTConfig.tiny(vocab_size=len(tokenizer), answer_token_id=7))
    with pytest.raises(ValueError, match="answer_token_id=6 vs 7"):
        RxTChatSession(model, tokenizer)


def test_initialisation_of_gated_attention_and_positional_norm_scales():
    """gate_proj ~ N(1, 0.01) (docs/spec.md#gated-attention); positional norm scale ~ N(1, 0.1), also the per-dim [D]
    scale (docs/spec.md#memory-norms)."""
    torch.manual_seed(0)
    config = RxTConfig.tiny(decoder={"use_gated_attention": True},
                            memory_attention={"norm_type": "positional", "norm_per_dim_scale": True})  # fmt: skip
    model = build(config)
    gates = torch.cat([m.gate_proj.weight.flatten() for m in model.modules() if getattr(m, "gate_proj", None) is not None])
    assert abs(gates.mean().item() - 1.0) < 0.005 and abs(gates.std().item() - 0.01) < 0.002
    scales = [m.scale for m in model.modules() if getattr(m, "norm_type", None) == "positional"]
    assert scales and all(s.shape == (config.memory_attention_config.embed_dim,) for s in scales)
    values = torch.cat([s.flatten() for s in scales])
    assert abs(values.mean().item() - 1.0) < 0.05 and 0.05 < values.std().item() < 0.15


def test_linear_init_modes(tmp_path):
    """`linear_init='pytorch'`: every Linear gets nn.Linear's own init (U(±1/√fan_in), std 1/√(3·fan_in), bias too)
    except gate_proj (N(1, 0.01)); embeddings keep N(0, initializer_range). Loading does not re-initialise."""
    config = RxTConfig.tiny(
        embed_dim=64, linear_init="pytorch", initializer_range=0.05, decoder={"use_gated_attention": True}
    )
    model = build(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    gated = [n for n in linears if n.endswith("gate_proj")]
    assert gated
    for name, linear in linears.items():
        if name in gated:
            assert abs(linear.weight.mean().item() - 1.0) < 0.01
            continue
        bound = 1 / math.sqrt(linear.in_features)
        assert linear.weight.abs().max() <= bound and linear.weight.std() > 0.8 * bound / math.sqrt(3), name
        if linear.bias is not None:
            assert 0 < linear.bias.abs().max() <= bound, name
    assert abs(model.model.embed_tokens.weight.std().item() - 0.05) < 0.005
    normal = build(RxTConfig.tiny(embed_dim=64, decoder={"use_gated_attention": True}))
    q = normal.model.decoder.layers[0].attention.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.003  # the default: transformers' N(0, 0.02)
    stateless = RxTStatelessConfig.from_rxt_config(config)
    assert (stateless.linear_init, stateless.initializer_range) == ("pytorch", 0.05)
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = RxTForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match=r"linear_init='kaiming'.*expected one of \['normal', 'pytorch'\]"):
        RxTConfig.tiny(linear_init="kaiming")
    with pytest.raises(ValueError, match=r"initializer_range=-0.1: expected a positive float"):
        RxTStatelessConfig(decoder_config=config.decoder_config.to_dict(), initializer_range=-0.1)


def test_from_pretrained_standard_and_strict(tmp_path):
    """transformers' contract by default (missing weights initialised and reported); `strict=True`
    (docs/conversion.md#strictness-and-the-report) makes a missing or unexpected weight an error listing them all,
    never a partial load."""
    from safetensors.torch import load_file, save_file

    build(RxTConfig.tiny()).save_pretrained(tmp_path)
    assert isinstance(RxTModel.from_pretrained(tmp_path, strict=True), RxTModel)  # a CausalLM's LM head not counted
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.decoder.head_norm.weight"]
    weights["model.bogus"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\): model.decoder.head_norm.weight; unexpected \(1\): model.bogus"):
        RxTForCausalLM.from_pretrained(tmp_path, strict=True)
    model, info = RxTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"model.decoder.head_norm.weight"} or set(info["missing_keys"]) == {
        "model.decoder.head_norm.weight"
    }
    assert "model.bogus" in info["unexpected_keys"]
    assert torch.equal(model.model.decoder.head_norm.weight, torch.ones(32))  # initialised (unit norm)


def test_stateless_from_pretrained_strict(tmp_path):
    """The stateless baseline loads as the RxT classes (`strict=True` as strictly)."""
    from safetensors.torch import load_file, save_file

    RxTStatelessForCausalLM(RxTStatelessConfig.from_rxt_config(RxTConfig.tiny())).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop(next(k for k in weights if k.endswith("head_norm.weight")))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"RxTStatelessForCausalLM.*missing \(1\): .*head_norm.weight"):
        RxTStatelessForCausalLM.from_pretrained(tmp_path, strict=True)
    assert isinstance(RxTStatelessForCausalLM.from_pretrained(tmp_path), RxTStatelessForCausalLM)

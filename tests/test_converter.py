"""Tests of the reference-checkpoint converter (modeling_rxt/conversion/, scripts/convert_rxlm_checkpoint.py).

Rules under test: docs/conversion.md. Inputs are the fixture cases under ../shared/fixtures/reference and
synthetic variants of them built in tmp folders (legacy MoE storage, whole-model files, broken checkpoints).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT
from modeling_rxt.configuration_rxt import RxTConfig
from modeling_rxt.conversion import (
    ConversionError,
    convert_rxlm_checkpoint,
    convert_rxlm_critic,
    expected_state_dict_shapes,
    read_safetensors,
    write_converted_folder,
)
from modeling_rxt.tokenization_rxt import RXT_SPECIAL_TOKENS, RXT_TOKEN_ID_FIELDS

FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "reference"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").is_file()) if FIXTURES.is_dir() else []


def test_reference_fixtures_present():
    assert CASES, f"reference fixtures not found at {FIXTURES} (expected ../shared beside the repo)"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def case_json(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())


def component_args(root: Path, rope_layout="from_case", case: str | None = None) -> dict:
    args = {
        "decoder": root / "decoder",
        "encoder": root / "encoder",
        "memory_attention": root / "memory_attention",
    }
    if (root / "mlm_head").is_dir():
        args["mlm_head"] = root / "mlm_head"
    if rope_layout == "from_case":
        args["rope_layout"] = case_json(case or root.name)["rope_layout"]
    elif rope_layout is not None:
        args["rope_layout"] = rope_layout
    return args


def convert_case(case: str, **overrides):
    args = component_args(FIXTURES / case, case=case)
    args.update(overrides)
    return convert_rxlm_checkpoint(**args)


def copy_case(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    for comp in ("decoder", "encoder", "memory_attention", "mlm_head"):
        if (FIXTURES / case / comp).is_dir():
            shutil.copytree(FIXTURES / case / comp, dst / comp)
    return dst


def edit_tensors(folder: Path, fn) -> None:
    tensors, metadata = read_safetensors(folder / "model.safetensors")
    fn(tensors, metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata=metadata)


def edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def heads(c, site="self"):
    return c.self_attention_heads if site == "self" else c.cross_attention_heads


def assert_full_coverage(report: dict, roots: dict) -> None:
    """Every stored tensor of every input is consumed (mapped, stacked or compared) or listed as ignored / dropped."""
    consumed = set(report["consumed_keys"])
    ignored = {entry["key"] for entry in report["ignored_keys"]} | set(report["dropped_keys"])
    assert not consumed & ignored
    for role, folder in roots.items():
        tensors, _ = read_safetensors(folder / "model.safetensors")
        for name in tensors:
            key = f"{role}:{name}"
            assert key in consumed or key in ignored, f"{key} neither consumed nor ignored"
    assert report["counts"]["project_tensors"] == len(report["key_map"])


# ---------------------------------------------------------------------------------------------------------------
# every fixture converts, with the configuration the case describes
# ---------------------------------------------------------------------------------------------------------------

EXPECTED = {
    "alpha_dense_sqa": dict(
        L=2,
        D=48,
        V=192,
        H=4,
        S=8,
        self=(2, 2),
        cross=(2, 2),
        enc=(2, 2),
        use_gated=True,
        act="silu",
        rms=True,
        head_norm=None,
        bias=True,
        gated_att=False,
        gated_cross=False,
        moe=None,
        stateless=(None, None),
        rope_base=10000,
        variant="interlayer",
        norm="classic-rms",
        main=(2, 2),
        inter=(2, 2),
        self_mem=None,
        gated_res=True,
        gate_type="linear",
        per_slot=True,
        status="mean",
        tanh=False,
        mlm=True,
    ),
    "moe_gqa": dict(
        L=2,
        D=32,
        V=160,
        H=4,
        S=12,
        self=(4, 2),
        cross=(4, 1),
        enc=(4, 2),
        use_gated=True,
        act="silu",
        rms=True,
        head_norm="rms_norm",
        bias=True,
        gated_att=False,
        gated_cross=False,
        moe=dict(E=4, k=2, Ns=1, Fs=40, bias="global", shared_bias="local", F=48),
        stateless=(None, None),
        rope_base=10000,
        variant="simple",
        norm="classic-rms",
        main=(4, 4),
        inter=None,
        self_mem=None,
        gated_res=True,
        gate_type="static",
        per_slot=True,
        status="mean",
        tanh=False,
        gate_init=1.0,
        mlm=False,
    ),
    "padded_batch": dict(
        L=2,
        D=48,
        V=160,
        H=4,
        S=16,
        self=(2, 4),
        cross=(4, 2),
        enc=(4, 4),
        use_gated=True,
        act="relu",
        rms=True,
        head_norm="rms_norm",
        bias=True,
        gated_att=False,
        gated_cross=False,
        moe=None,
        stateless=(None, None),
        rope_base=10000,
        variant="simple",
        norm="classic-rms",
        main=(2, 4),
        inter=None,
        self_mem=None,
        gated_res=False,
        mlm=True,
    ),
    "self_interlayer_gated_attn": dict(
        L=2,
        D=48,
        V=192,
        H=4,
        S=8,
        self=(2, 1),
        cross=(4, 2),
        enc=(2, 2),
        use_gated=True,
        act="silu",
        rms=True,
        head_norm="layer_norm",
        bias=False,
        gated_att=True,
        gated_cross=False,
        moe=dict(E=4, k=1, Ns=0, bias="off", F=48),
        stateless=(["dense"], ["moe"]),
        dense_layer_dim=64,
        rope_base=100000,
        variant="self-interlayer",
        norm="classic-rms",
        main=(2, 2),
        inter=(2, 2),
        self_mem=None,
        gated_res=True,
        gate_type="elementwise",
        per_slot=True,
        status="mean",
        tanh=False,
        gate_init=3.0,
        mlm=False,
    ),
    "self_memattn_tanh": dict(
        L=3,
        D=64,
        V=160,
        H=8,
        S=10,
        self=(2, 2),
        cross=(2, 2),
        enc=(2, 2),
        use_gated=False,
        act="gelu",
        rms=False,
        head_norm=None,
        bias=True,
        gated_att=False,
        gated_cross=False,
        moe=None,
        stateless=(None, None),
        rope_base=10000,
        variant="self",
        norm="rms",
        main=(2, 2),
        inter=None,
        self_mem=(4, 2),
        self_gate=True,
        gated_res=True,
        gate_type="elementwise",
        per_slot=False,
        status="mean",
        tanh=True,
        gate_init=1.0,
        norm_init_gate=0.0,
        mlm=True,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_fixture_converts_with_described_config(case):
    config, sd, report = convert_case(case)
    info = case_json(case)
    exp = EXPECTED.get(case)
    assert config.memory_attention_variant == info["memory_attention_variant"]
    assert config.rope_layout == info["rope_layout"]
    dec, enc, mem = config.decoder_config, config.encoder_config, config.memory_attention_config
    dims = info["dims"]
    assert (dec.num_layers, dec.embed_dim, dec.vocab_size, dec.att_heads) == (
        dims["num_layers"],
        dims["embed_dim"],
        dims["vocab_size"],
        dims["att_heads"],
    )
    assert mem.stm_size == dec.stm_size == dims["stm_size"]
    # the state dict is exactly the project's key contract
    shapes = expected_state_dict_shapes(config)
    assert set(sd) == set(shapes)
    assert all(tuple(sd[k].shape) == tuple(shapes[k]) for k in sd)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    # every stored tensor consumed or explicitly ignored
    roots = {
        r: FIXTURES / case / r
        for r in ("decoder", "encoder", "memory_attention", "mlm_head")
        if (FIXTURES / case / r).is_dir()
    }
    assert_full_coverage(report, roots)
    assert report["conflicts"] == []
    assert report["embedding"]["decoder_max_abs_diff"] == 0.0
    # every attention site written explicitly as sqa with (Hq, Hkv)
    for c in (dec, enc):
        assert c.self_att_type == "sqa" and c.cross_att_type == "sqa"
    for prefix in ("att_", "interlayer_att_", "self_att_"):
        assert getattr(mem, prefix + "type") == "sqa"
    if exp is None:
        return
    assert (dec.num_layers, dec.embed_dim, dec.vocab_size, dec.att_heads, mem.stm_size) == (
        exp["L"],
        exp["D"],
        exp["V"],
        exp["H"],
        exp["S"],
    )
    assert heads(dec) == exp["self"] and heads(dec, "cross") == exp["cross"] and heads(enc) == exp["enc"]
    assert dec.use_gated == exp["use_gated"] and dec.ff_activation == exp["act"] and dec.use_rms_norm == exp["rms"]
    assert enc.use_rms_norm == exp["rms"]
    assert dec.use_head_norm == (exp["head_norm"] is not None)
    if exp["head_norm"]:
        assert dec.head_norm_type == exp["head_norm"]
    assert dec.use_attention_output_bias == exp["bias"] and dec.use_gated_attention == exp["gated_att"]
    assert dec.use_gated_cross_attention == exp["gated_cross"]
    assert (
        dec.rope_base == exp["rope_base"] and enc.rope_base == exp["rope_base"] and mem.rope_base == exp["rope_base"]
    )
    assert dec.use_rope and enc.use_rope
    if exp["moe"]:
        moe = exp["moe"]
        assert dec.use_moe and dec.num_experts == moe["E"] and dec.moe_top_k == moe["k"] and dec.ff_dim == moe["F"]
        assert dec.num_shared_experts == moe["Ns"] and dec.moe_bias_mode == moe["bias"]
        if moe["Ns"]:
            assert dec.shared_expert_dim == moe["Fs"] and dec.moe_shared_experts_bias_mode == moe["shared_bias"]
    else:
        assert not dec.use_moe
    assert not enc.use_moe
    assert (dec.stateless_layers_config, dec.final_stateless_layers_config) == exp["stateless"]
    if "dense_layer_dim" in exp:
        assert dec.dense_layer_dim == exp["dense_layer_dim"]
    assert mem.norm_type == exp["norm"] and mem.heads("att_") == exp["main"]
    if exp["inter"]:
        assert mem.heads("interlayer_att_") == exp["inter"]
    if exp["self_mem"]:
        assert mem.heads("self_att_") == exp["self_mem"]
        assert mem.use_gate_for_self_attention == exp["self_gate"]
    assert mem.use_gated_residual == exp["gated_res"]
    if exp["gated_res"]:
        assert mem.residual_gate_type == exp["gate_type"] and mem.residual_per_slot_gate == exp["per_slot"]
        assert mem.residual_gate_slot_status_type == exp["status"]
        assert mem.use_tanh_residual_gate == exp["tanh"]
    if "gate_init" in exp:
        assert mem.residual_gate_init == exp["gate_init"]
    if "norm_init_gate" in exp:
        assert mem.norm_init_gate == exp["norm_init_gate"]
    assert config.use_mlm_head == exp["mlm"]
    assert not config.learned_stm_init and "model.stm_init.stm" not in sd
    # values are copied, not re-initialised
    dec_t = load_file(FIXTURES / case / "decoder" / "model.safetensors")
    assert torch.equal(sd["lm_head.weight"], dec_t["model.head.weight"])
    enc_t = load_file(FIXTURES / case / "encoder" / "model.safetensors")
    assert torch.equal(sd["model.embed_tokens.weight"], enc_t["model.embedding.weight"])


def test_report_contents():
    config, sd, report = convert_case("alpha_dense_sqa", rope_layout=None)
    # RoPE layout: no old-era signal -> interleaved, stated in the report
    assert config.rope_layout == "interleaved"
    assert report["rope_layout"]["value"] == "interleaved" and report["rope_layout"]["old_era_signals"] == []
    assert "no old-era signal" in report["rope_layout"]["decided_by"]
    assert report["memory_attention_variant"]["value"] == "interlayer"
    assert "keys" in report["memory_attention_variant"]["decided_by"]
    for role in ("decoder", "encoder", "memory_attention", "mlm_head"):
        assert len(report["inputs"][role]["config_sha256"]) == 64
    inferred = report["inferred"]
    assert inferred["decoder"]["self_attention_heads"] == {
        "value": {"Hq": 2, "Hkv": 2},
        "source": "shape",
        "detail": "model.layers.0.attention.{q,k}_proj.weight",
    }
    assert inferred["decoder"]["ff_activation"]["source"] == "config"
    assert inferred["decoder"]["gated_attention_activation"]["source"] == "default"
    filled = {(d["component"], d["field"]) for d in report["defaults_filled"]}
    assert ("decoder", "gated_attention_activation") in filled and ("decoder", "rope_base") in filled
    ignored = {d["key"] for d in report["ignored_keys"]}
    assert "decoder:model.stm.memory" in ignored and "memory_attention:model.stm.memory" in ignored
    assert "decoder:model.layers.0.attention.rope.inv_freq" in ignored
    assert report["token_ids"]["values"]["bos_token_id"] == 2 and "usual" in report["token_ids"]["source"]
    assert (
        config.pad_token_id,
        config.unk_token_id,
        config.bos_token_id,
        config.eos_token_id,
        config.mask_token_id,
        config.query_token_id,
        config.answer_token_id,
    ) == (0, 1, 2, 3, 4, 5, 6)
    assert report["dtype_conversions"] == []
    assert {"component": "decoder", "field": "use_flash_attention", "value": False} not in report[
        "dropped_config_fields"
    ]
    json.dumps(report)  # serialisable


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors listing every offending key / field
# ---------------------------------------------------------------------------------------------------------------


def test_missing_safetensors_and_config(tmp_path):
    root = copy_case("moe_gqa", tmp_path)
    (root / "encoder" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"encoder folder .*encoder' has no model\.safetensors"):
        convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"))
    (root / "memory_attention" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"memory_attention folder .* has no config\.json"):
        convert_rxlm_checkpoint(**component_args(root, case="moe_gqa") | {"encoder": FIXTURES / "moe_gqa/encoder"})


def test_unexpected_missing_and_mismatched_keys_all_listed(tmp_path):
    root = copy_case("alpha_dense_sqa", tmp_path)

    def damage(t, meta):
        t["model.layers.1.extra_proj.weight"] = torch.zeros(3, 48)  # unexpected
        t["model.layers.0.attention.q_proj.bias"] = torch.zeros(24)  # unexpected (no q bias in the project)
        del t["model.layers.1.norm2.weight"]  # missing
        del t["model.head.bias"]  # missing
        t["model.layers.1.ff.fc2.weight"] = torch.zeros(48, 90)  # shape mismatch

    edit_tensors(root / "decoder", damage)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        convert_rxlm_checkpoint(**component_args(root, case="alpha_dense_sqa"), output=out)
    msg = str(info.value)
    assert "decoder:model.layers.1.extra_proj.weight [3, 48]" in msg
    assert "model.decoder.layers.0.attention.q_proj.bias" in msg
    assert "missing keys (2)" in msg
    assert "model.decoder.layers.1.norm2.weight [48]" in msg and "lm_head.bias [192]" in msg
    assert (
        "model.decoder.layers.1.ff.fc2.weight from decoder:model.layers.1.ff.fc2.weight: shape [48, 90], "
        "expected [48, 96]" in msg
    )
    assert not out.exists(), "nothing may be written when the conversion fails"


def test_unknown_and_out_of_scope_config_fields(tmp_path):
    root = copy_case("moe_gqa", tmp_path)
    edit_config(root / "decoder", lambda c: c.update(my_new_option=True, att_experts=4))
    edit_config(root / "memory_attention", lambda c: c.update(interlayer_att_query_experts=2))
    with pytest.raises(ValueError) as info:
        convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"))
    msg = str(info.value)
    assert "decoder config field 'my_new_option' is unknown" in msg
    assert "decoder config field 'att_experts'=4" in msg and "expected null" in msg
    assert "memory_attention config field 'interlayer_att_query_experts'=2" in msg
    root2 = copy_case("padded_batch", tmp_path)
    edit_config(root2 / "decoder", lambda c: c.update(self_att_type="hybrid"))
    with pytest.raises(ValueError, match=r"'self_att_type'='hybrid' is out of scope"):
        convert_rxlm_checkpoint(**component_args(root2, case="padded_batch"))
    root3 = copy_case("self_memattn_tanh", tmp_path)
    edit_config(root3 / "mlm_head", lambda c: c.update(activation="gelu"))
    with pytest.raises(ValueError, match=r"mlm_head config field 'activation' is unknown"):
        convert_rxlm_checkpoint(**component_args(root3, case="self_memattn_tanh"))


def test_rope_base_and_nope_checks(tmp_path):
    root = copy_case("self_interlayer_gated_attn", tmp_path)
    edit_config(root / "encoder", lambda c: c.pop("rope_base"))  # default 10000, tensors say 100000
    with pytest.raises(ValueError, match=r"encoder: RoPE inv_freq .* implies rope_base≈100000.* rope_base=10000"):
        convert_rxlm_checkpoint(**component_args(root, case="self_interlayer_gated_attn"))
    root2 = copy_case("moe_gqa", tmp_path)
    edit_config(root2 / "decoder", lambda c: c.update(use_nope=True))
    with pytest.raises(ValueError, match=r"use_nope=true but the checkpoint has RoPE buffers"):
        convert_rxlm_checkpoint(**component_args(root2, case="moe_gqa"))
    root3 = copy_case("moe_gqa", tmp_path / "b")
    edit_config(root3 / "decoder", lambda c: c.update(att_heads=8))
    with pytest.raises(ValueError, match=r"att_heads=8 .* must agree"):
        convert_rxlm_checkpoint(**component_args(root3, case="moe_gqa"))


def test_nope_component_converts(tmp_path):
    root = copy_case("moe_gqa", tmp_path)
    for comp in ("decoder", "encoder"):

        def drop_rope(t, meta):
            for k in [k for k in t if ".rope." in k]:
                del t[k]
            meta.clear()

        edit_tensors(root / comp, drop_rope)
        edit_config(root / comp, lambda c: c.update(use_nope=True))
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"))
    assert not config.decoder_config.use_rope and not config.encoder_config.use_rope
    assert config.decoder_config.att_heads == 4
    assert report["inferred"]["decoder"]["head_dim"]["source"] == "config"


def test_config_shape_conflicts_are_reported(tmp_path):
    root = copy_case("padded_batch", tmp_path)
    # an old-style config: cross groups stated differently from the weights, wrong stm_size and ff_dim
    edit_config(root / "decoder", lambda c: c.update(cross_att_groups=4, stm_size=32, ff_dim=80))
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case="padded_batch"))
    fields = {(c["component"], c["field"]) for c in report["conflicts"]}
    assert ("decoder", "cross_att_type/cross_att_groups/cross_att_query_groups") in fields
    assert ("decoder", "stm_size") in fields and ("decoder", "ff_dim") in fields
    assert config.decoder_config.cross_attention_heads == (4, 2)
    assert config.decoder_config.stm_size == 16 and config.decoder_config.ff_dim == 64


# ---------------------------------------------------------------------------------------------------------------
# memory-attention variant (docs/conversion.md#memory-attention-variant)
# ---------------------------------------------------------------------------------------------------------------


def make_ungated_interlayer(tmp_path, slot_status=False) -> Path:
    root = copy_case("alpha_dense_sqa", tmp_path)

    def ungate(t, meta):
        for k in [k for k in t if "residual_gate_layers." in k]:
            del t[k]
        if slot_status:  # ungated gates with linear slot status keep slot_status keys (only in self-interlayer)
            for fam in ("residual_gate_layers", "mean_residual_gate_layers", "interlayer_gate_layers"):
                for i in range(2):
                    t[f"model.{fam}.{i}.slot_status.weight"] = torch.randn(1, 48)
                    t[f"model.{fam}.{i}.slot_status.bias"] = torch.randn(1)

    edit_tensors(root / "memory_attention", ungate)
    edit_config(
        root / "memory_attention",
        lambda c: c.update(
            use_gated_residual=False, residual_gate_slot_status_type="linear" if slot_status else "mean"
        ),
    )
    return root


def test_ambiguous_ungated_interlayer_needs_flag(tmp_path):
    root = make_ungated_interlayer(tmp_path)
    args = component_args(root, case="alpha_dense_sqa")
    with pytest.raises(ValueError, match=r"ambiguous.*--memory-attention-variant"):
        convert_rxlm_checkpoint(**args)
    config, sd, report = convert_rxlm_checkpoint(**args, memory_attention_variant="interlayer")
    assert config.memory_attention_variant == "interlayer" and not config.memory_attention_config.use_gated_residual
    assert "flag" in report["memory_attention_variant"]["decided_by"]
    config, sd, _ = convert_rxlm_checkpoint(**args, memory_attention_variant="self-interlayer")
    assert config.memory_attention_variant == "self-interlayer"
    assert not any("gate" in k for k in sd if k.startswith("model.memory_attention."))
    with pytest.raises(ValueError, match=r"contradicts the keys"):
        convert_rxlm_checkpoint(**args, memory_attention_variant="simple")
    # num_groups in a component config reveals the grouped self-interlayer class
    edit_config(root / "memory_attention", lambda c: c.update(num_groups=2))
    config, _, report = convert_rxlm_checkpoint(**args)
    assert config.memory_attention_variant == "grouped-self-interlayer"
    assert config.memory_attention_config.num_groups == 2


def test_ungated_self_interlayer_with_linear_slot_status(tmp_path):
    root = make_ungated_interlayer(tmp_path, slot_status=True)
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case="alpha_dense_sqa"))
    assert config.memory_attention_variant == "self-interlayer"
    ignored = [d["key"] for d in report["ignored_keys"] if "slot_status" in d["key"]]
    assert len(ignored) == 12 and all(
        "ungated or static" in d["reason"] for d in report["ignored_keys"] if "slot_status" in d["key"]
    )
    assert not any("slot_status" in k for k in sd)


def test_variant_keys_contradicting_families_fatal(tmp_path):
    root = copy_case("self_memattn_tanh", tmp_path)
    edit_tensors(root / "memory_attention", lambda t, m: t.update({"model.mean_stm_norm.scale": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"both self-attention .* and interlayer"):
        convert_rxlm_checkpoint(**component_args(root, case="self_memattn_tanh"))


def test_unused_gates_of_simple_disable_residual_are_ignored(tmp_path):
    root = copy_case("moe_gqa", tmp_path)
    edit_config(root / "memory_attention", lambda c: c.update(disable_residual=True))
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"))
    assert config.memory_attention_config.disable_residual
    assert not any("residual_gate_layers" in k for k in sd)
    reasons = {d["key"]: d["reason"] for d in report["ignored_keys"]}
    assert "disable_residual" in reasons["memory_attention:model.residual_gate_layers.0.gate"]


# ---------------------------------------------------------------------------------------------------------------
# RoPE layout (docs/conversion.md#rope-layout) and legacy MoE (docs/conversion.md#legacy-moe-storage)
# ---------------------------------------------------------------------------------------------------------------


def make_legacy_moe(tmp_path, shared=1, with_biases=True, keep_stacked=False, perturb=False) -> tuple[Path, dict]:
    root = copy_case("moe_gqa", tmp_path)
    originals = {}
    gen = torch.Generator().manual_seed(0)

    def to_legacy(t, meta):
        for i in range(2):
            p = f"model.layers.{i}.ff."
            w1, w2 = t[p + "w1"], t[p + "w2"]
            originals[i] = {"w1": w1.clone(), "w2": w2.clone()}
            if not keep_stacked:
                del t[p + "w1"], t[p + "w2"]
            del t[p + "global_bias"]
            b1s, b2s = [], []
            for e in range(w1.shape[0]):
                t[f"{p}experts.{e}.fc1.linear.weight"] = w1[e].t().contiguous()
                t[f"{p}experts.{e}.fc2.weight"] = w2[e].t().contiguous() + (1.0 if perturb else 0.0)
                if with_biases:
                    b1s.append(torch.randn(w1.shape[2], generator=gen))
                    b2s.append(torch.randn(w1.shape[1], generator=gen))
                    t[f"{p}experts.{e}.fc1.linear.bias"] = b1s[-1]
                    t[f"{p}experts.{e}.fc2.bias"] = b2s[-1]
            if with_biases:
                originals[i]["b1"], originals[i]["b2"] = torch.stack(b1s), torch.stack(b2s)
            sk = {
                k[len(p + "shared_expert.") :]: t.pop(k) for k in [k for k in t if k.startswith(p + "shared_expert.")]
            }
            originals[i]["shared"] = sk
            for s in range(shared):
                for name, value in sk.items():
                    t[f"{p}shared_experts.{s}.{name}"] = value + s
            if shared > 1:
                t[p + "shared_expert_gate.weight"] = torch.randn(shared, w1.shape[1], generator=gen)
                originals[i]["gate"] = t[p + "shared_expert_gate.weight"].clone()

    edit_tensors(root / "decoder", to_legacy)

    def legacy_config(c):
        for f in ("moe_bias_mode", "use_vectorized_moe", "moe_grouped_gemm"):
            c.pop(f, None)
        c["num_shared_experts"] = shared

    edit_config(root / "decoder", legacy_config)
    return root, originals


def test_legacy_moe_needs_rope_layout_and_converts_to_stacked(tmp_path):
    root, orig = make_legacy_moe(tmp_path)
    with pytest.raises(ValueError, match=r"legacy per-expert MoE keys.*--rope-layout"):
        convert_rxlm_checkpoint(**component_args(root, rope_layout=None))
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, rope_layout="split_concat"))
    dec = config.decoder_config
    assert config.rope_layout == "split_concat" and report["rope_layout"]["decided_by"] == "flag --rope-layout"
    assert dec.use_moe and dec.num_experts == 4 and dec.moe_bias_mode == "local"
    assert dec.num_shared_experts == 1 and dec.shared_expert_dim == 40 and dec.moe_shared_experts_bias_mode == "local"
    for i in range(2):
        p = f"model.decoder.layers.{i}.ff."
        assert torch.equal(sd[p + "w1"], orig[i]["w1"]) and torch.equal(sd[p + "w2"], orig[i]["w2"])
        assert torch.equal(sd[p + "b1"], orig[i]["b1"]) and torch.equal(sd[p + "b2"], orig[i]["b2"])
        assert torch.equal(sd[p + "shared_expert.fc1.weight"], orig[i]["shared"]["fc1.linear.weight"])
        assert torch.equal(sd[p + "shared_expert.fc2.bias"], orig[i]["shared"]["fc2.bias"])
        assert p + "global_bias" not in sd
    assert_full_coverage(report, {r: root / r for r in ("decoder", "encoder", "memory_attention")})
    assert report["consumed_keys"]["decoder:model.layers.1.ff.experts.3.fc1.linear.weight"] == (
        "model.decoder.layers.1.ff.w1[3] (transposed)"
    )
    assert report["consumed_keys"]["decoder:model.layers.1.ff.experts.3.fc2.bias"] == "model.decoder.layers.1.ff.b2[3]"


def test_legacy_moe_multiple_shared_and_no_bias(tmp_path):
    root, orig = make_legacy_moe(tmp_path, shared=2, with_biases=False)
    config, sd, _ = convert_rxlm_checkpoint(**component_args(root, rope_layout="split_concat"))
    dec = config.decoder_config
    assert dec.moe_bias_mode == "off" and dec.num_shared_experts == 2
    p = "model.decoder.layers.0.ff."
    assert sd[p + "shared_w1"].shape == (2, 32, 80) and sd[p + "shared_w2"].shape == (2, 40, 32)
    assert torch.equal(sd[p + "shared_w1"][1], orig[0]["shared"]["fc1.linear.weight"].t() + 1)
    assert torch.equal(sd[p + "shared_b2"][0], orig[0]["shared"]["fc2.bias"])
    assert torch.equal(sd[p + "shared_expert_gate.weight"], orig[0]["gate"])
    assert "b1" not in {k.rsplit(".", 1)[-1] for k in sd if k.startswith(p)}


def test_legacy_moe_with_global_bias_fails(tmp_path):
    root, _ = make_legacy_moe(tmp_path)
    edit_tensors(root / "decoder", lambda t, m: t.update({"model.layers.0.ff.global_bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"legacy per-expert MoE layer also has ff.global_bias"):
        convert_rxlm_checkpoint(**component_args(root, rope_layout="split_concat"))


def test_both_storages_must_agree(tmp_path):
    root, orig = make_legacy_moe(tmp_path / "same", with_biases=False, keep_stacked=True)
    config, sd, _ = convert_rxlm_checkpoint(**component_args(root, rope_layout="interleaved"))
    assert torch.equal(sd["model.decoder.layers.0.ff.w1"], orig[0]["w1"])
    root2, _ = make_legacy_moe(tmp_path / "differ", with_biases=False, keep_stacked=True, perturb=True)
    with pytest.raises(ValueError, match=r"legacy and stacked\s+MoE storage disagree"):
        convert_rxlm_checkpoint(**component_args(root2, rope_layout="interleaved"))


def test_bf16_experts_are_upcast(tmp_path):
    root = copy_case("moe_gqa", tmp_path)
    edit_tensors(
        root / "decoder",
        lambda t, m: t.update(
            {k: t[k].to(torch.bfloat16) for k in list(t) if k.endswith(".ff.w1") or k.endswith(".ff.w2")}
        ),
    )
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"))
    assert sd["model.decoder.layers.0.ff.w1"].dtype == torch.float32
    conv = {d["key"] for d in report["dtype_conversions"]}
    assert "decoder:model.layers.0.ff.w1" in conv and "decoder:model.layers.1.ff.w2" in conv
    assert all(d["from"] == "bfloat16" and d["to"] == "float32" for d in report["dtype_conversions"])


def test_old_era_signals(tmp_path):
    root = copy_case("padded_batch", tmp_path)
    edit_config(root / "memory_attention", lambda c: c.pop("rope_base"))  # 0.3.39 wrote no rope_base
    with pytest.raises(ValueError, match=r"memory-attention config lacks fields .*rope_base.*--rope-layout"):
        convert_rxlm_checkpoint(**component_args(root, rope_layout=None))
    root2 = copy_case("moe_gqa", tmp_path / "b")
    edit_config(root2 / "decoder", lambda c: c.pop("self_att_type"))  # no att_query_groups either: 0.2.x default gqa
    with pytest.raises(ValueError, match=r"omits self_att_type and att_query_groups"):
        convert_rxlm_checkpoint(**component_args(root2, rope_layout=None))
    config, _, report = convert_rxlm_checkpoint(**component_args(root2, rope_layout="split_concat"))
    assert config.decoder_config.self_attention_heads == (4, 2)
    # the project's own rope_layout field in an input config decides (step 2)
    edit_config(root2 / "decoder", lambda c: c.update(rope_layout="split_concat"))
    config, _, report = convert_rxlm_checkpoint(**component_args(root2, rope_layout=None))
    assert config.rope_layout == "split_concat" and "input config" in report["rope_layout"]["decided_by"]


def test_rxnn_encoder_cross_attention(tmp_path):
    root = copy_case("alpha_dense_sqa", tmp_path)
    dec_t = load_file(root / "decoder" / "model.safetensors")

    def add_cross(t, meta):
        for i in range(2):
            for k, v in dec_t.items():
                for part in (
                    f"model.layers.{i}.memory_cross_attention.",
                    f"model.layers.{i}.norm2.",
                    f"model.layers.{i}.stm_norm.",
                ):
                    if k.startswith(part):
                        t[k] = v.clone()
        t["model.stm.memory"] = torch.zeros(2, 1, 8, 48)

    edit_tensors(root / "encoder", add_cross)
    with pytest.raises(ValueError, match=r"--drop-encoder-cross-attention"):
        convert_rxlm_checkpoint(**component_args(root, rope_layout="split_concat"))
    with pytest.raises(ValueError, match=r"encoder memory-cross-attention keys|encoder: memory cross-attention keys"):
        convert_rxlm_checkpoint(**component_args(root, rope_layout=None), drop_encoder_cross_attention=True)
    config, sd, report = convert_rxlm_checkpoint(
        **component_args(root, rope_layout="split_concat"), drop_encoder_cross_attention=True
    )
    assert len(report["dropped_keys"]) == 2 * (5 + 2)
    assert "encoder:model.layers.1.stm_norm.weight" in report["dropped_keys"]
    assert not any(k.startswith("model.encoder.") and "cross" in k for k in sd)


# ---------------------------------------------------------------------------------------------------------------
# whole-model folders and --import-stm (docs/conversion.md#reading-the-reference-folders,
# docs/conversion.md#whole-model-repos)
# ---------------------------------------------------------------------------------------------------------------


def make_whole_model(case: str, tmp_path: Path, variant_name: str, tokenizer_config=None, src=None) -> Path:
    """A whole-model folder (decoder.model. / encoder.model. / memory_attention.model. prefixes) from components."""
    src = Path(src) if src is not None else FIXTURES / case
    out = tmp_path / f"{case}-whole"
    out.mkdir(parents=True)
    tensors, metadata = {}, {"format": "pt"}
    configs = {}
    for comp in ("decoder", "encoder", "memory_attention"):
        t, meta = read_safetensors(src / comp / "model.safetensors")
        prefix = f"{comp}.model."
        for k, v in t.items():
            tensors[prefix + k[len("model.") :]] = v
        for alias, kept in meta.items():
            if kept in t:
                metadata[prefix + alias[len("model.") :]] = prefix + kept[len("model.") :]
        configs[comp] = json.loads((src / comp / "config.json").read_text())
    # shared embedding: the kept name is the decoder's (it sorts first), holding the encoder's (shared) table
    tensors["decoder.model.embedding.weight"] = tensors.pop("encoder.model.embedding.weight")
    metadata["encoder.model.embedding.weight"] = "decoder.model.embedding.weight"
    # shared STM: one buffer, kept as the decoder's
    tensors["decoder.model.stm.memory"] = tensors.pop("memory_attention.model.stm.memory")
    metadata["memory_attention.model.stm.memory"] = "decoder.model.stm.memory"
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    # the nested memory-attention config holds only passed fields: drop those equal to the defaults of
    # docs/conversion.md#order-of-authority
    from modeling_rxt.conversion import MEMORY_ATTENTION_DEFAULTS

    mem_cfg = {
        k: v
        for k, v in configs["memory_attention"].items()
        if k not in MEMORY_ATTENTION_DEFAULTS or MEMORY_ATTENTION_DEFAULTS[k] != v
    }
    mem_cfg = {k: v for k, v in mem_cfg.items() if not k.endswith("_experts")}
    whole = {
        "decoder_config": configs["decoder"],
        "encoder_config": configs["encoder"],
        "memory_attention_config": mem_cfg,
        "tokenizer_config": tokenizer_config
        or {
            "bos_token_id": 2,
            "eos_token_id": 3,
            "query_token_id": 5,
            "answer_token_id": 6,
            "pad_token_id": 0,
        },
        "memory_attention_variant": variant_name,
        "tokenizer": None,
    }
    (out / "config.json").write_text(json.dumps(whole, indent=2))
    return out


@pytest.mark.parametrize(
    "case,name",
    [
        ("alpha_dense_sqa", "interlayer"),
        ("self_interlayer_gated_attn", "interlayer"),
        ("self_memattn_tanh", "self"),
        ("moe_gqa", "simple"),
    ],
)
def test_whole_model_equals_component_route(tmp_path, case, name):
    whole = make_whole_model(case, tmp_path, name)
    info = case_json(case)
    c1, sd1, r1 = convert_case(case, mlm_head=None)
    c2, sd2, r2 = convert_rxlm_checkpoint(whole_model=whole, rope_layout=info["rope_layout"])
    assert set(sd1) == set(sd2)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    for sub in ("decoder_config", "encoder_config", "memory_attention_config"):
        assert getattr(c1, sub).to_dict() == getattr(c2, sub).to_dict(), sub
    assert c1.memory_attention_variant == c2.memory_attention_variant == info["memory_attention_variant"]
    assert r2["embedding"]["decoder_max_abs_diff"] == 0.0
    assert_full_coverage(r2, {"whole_model": whole})
    assert r2["consumed_keys"]["whole_model:decoder.model.embedding.weight"] == "model.embed_tokens.weight"
    if case == "self_interlayer_gated_attn":  # the name 'interlayer' contradicts the keys: keys win, reported
        assert any(c["field"] == "memory_attention_variant" for c in r2["conflicts"])


def test_whole_model_ambiguous_variant_and_tokens(tmp_path):
    ungated = make_ungated_interlayer(tmp_path)
    tok = {
        "bos_token_id": 12,
        "eos_token_id": 13,
        "query_token_id": 15,
        "answer_token_id": 16,
        "pad_token_id": 10,
        "think_token_id": 17,
    }
    w1 = make_whole_model("alpha_dense_sqa", tmp_path / "a", "interlayer", tokenizer_config=tok, src=ungated)
    w2 = make_whole_model("alpha_dense_sqa", tmp_path / "b", "self-interlayer", tokenizer_config=tok, src=ungated)
    with pytest.raises(ValueError, match=r"whole-model config names 'interlayer'.*--memory-attention-variant"):
        convert_rxlm_checkpoint(whole_model=w1, rope_layout="interleaved")
    config, _, report = convert_rxlm_checkpoint(
        whole_model=w1, rope_layout="interleaved", memory_attention_variant="interlayer"
    )
    assert config.memory_attention_variant == "interlayer"
    config, _, report = convert_rxlm_checkpoint(whole_model=w2, rope_layout="interleaved")
    assert config.memory_attention_variant == "self-interlayer"
    assert "whole-model config" in report["memory_attention_variant"]["decided_by"]
    assert (config.bos_token_id, config.pad_token_id, config.think_token_id) == (12, 10, 17)
    assert "tokenizer_config" in report["token_ids"]["source"]


def test_import_stm(tmp_path):
    config, sd, report = convert_case("self_memattn_tanh", import_stm=True)
    stm = load_file(FIXTURES / "self_memattn_tanh/memory_attention/model.safetensors")["model.stm.memory"]
    assert config.learned_stm_init and torch.equal(sd["model.stm_init.stm"], stm)
    assert report["stm_import"]["source_key"] == "memory_attention:model.stm.memory"
    whole = make_whole_model("moe_gqa", tmp_path, "simple")
    config, sd, report = convert_rxlm_checkpoint(whole_model=whole, import_stm=True, rope_layout="interleaved")
    assert report["stm_import"]["source_key"] == "whole_model:decoder.model.stm.memory"
    assert sd["model.stm_init.stm"].shape == (2, 1, 12, 32)
    # an STM with a different slot count cannot be imported
    root = copy_case("moe_gqa", tmp_path)
    edit_tensors(root / "memory_attention", lambda t, m: t.update({"model.stm.memory": torch.zeros(2, 1, 5, 32)}))
    with pytest.raises(ValueError, match=r"--import-stm: .* expected \[L, 1, S, D\] = \[2, 1, 12, 32\]"):
        convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"), import_stm=True)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer, output folder, CLI
# ---------------------------------------------------------------------------------------------------------------


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = RXT_SPECIAL_TOKENS[:8]  # [PAD] … [T]: ids 3..10 after three words
    vocab = {w: i for i, w in enumerate(["a", "b", "c", *specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=RXT_TOKEN_ID_FIELDS["unk_token_id"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))


def test_tokenizer_lookup_and_output(tmp_path):
    make_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    config, sd, report = convert_case("moe_gqa", tokenizer=tmp_path / "tok")
    assert (config.pad_token_id, config.unk_token_id, config.bos_token_id, config.eos_token_id) == (3, 4, 5, 6)
    assert (config.mask_token_id, config.query_token_id, config.answer_token_id, config.think_token_id) == (
        7,
        8,
        9,
        10,
    )
    assert config.tool_call_token_id is None
    assert report["token_ids"]["source"].endswith("tokenizer.json")
    write_converted_folder(config, sd, report, out, use_model=False)
    assert (out / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and tok.pad_token == RXT_TOKEN_ID_FIELDS["pad_token_id"]
    assert "tokenizer.json" in json.loads((out / "conversion_report.json").read_text())["tokenizer_files"]


def test_write_folder_without_model(tmp_path):
    out = tmp_path / "out"
    config, sd, report = convert_case("self_interlayer_gated_attn")
    write_converted_folder(config, sd, report, out, use_model=False)
    assert {"config.json", "model.safetensors", "conversion_report.json"} <= {p.name for p in out.iterdir()}
    reloaded = RxTConfig.from_pretrained(str(out))
    assert reloaded.memory_attention_variant == "self-interlayer"
    assert reloaded.decoder_config.to_dict() == config.decoder_config.to_dict()
    assert reloaded.memory_attention_config.to_dict() == config.memory_attention_config.to_dict()
    tensors, metadata = read_safetensors(out / "model.safetensors")
    assert metadata == {"format": "pt"} and set(tensors) == set(sd)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    rep = json.loads((out / "conversion_report.json").read_text())
    assert rep["rope_layout"]["value"] == "interleaved" and rep["output"] == str(out.resolve())


def test_write_folder_with_model_loads_strictly(tmp_path):
    from modeling_rxt.modeling_rxt import RxTForCausalLM

    out = tmp_path / "out"
    config, sd, report = convert_case("padded_batch", output=out)
    assert report["output_writer"] == "RxTForCausalLM.save_pretrained"
    model = RxTForCausalLM.from_pretrained(str(out))
    own = model.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)
    # a state dict that does not fit the model is refused, listing the differences, before anything is written
    bad = dict(sd)
    bad.pop("lm_head.bias")
    bad["model.decoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)model\.decoder\.extra.*lm_head\.bias \[160\]"):
        write_converted_folder(config, bad, report, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_rxlm_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or "/",
        timeout=300,
    )


def _component_flags(root, decoder=None) -> list[str]:
    """`--decoder --encoder --memory-attention` of the component folders under `root` (`decoder` overrides one)."""
    return ["--decoder", str(decoder or root / "decoder"), "--encoder", str(root / "encoder"),
            "--memory-attention", str(root / "memory_attention")]  # fmt: skip


@pytest.mark.slow
def test_cli(tmp_path):
    case = FIXTURES / "self_memattn_tanh"
    out = tmp_path / "converted"
    proc = _cli(
        *_component_flags(case),
        "--mlm-head",
        str(case / "mlm_head"),
        "--rope-layout",
        "interleaved",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted ->" in proc.stdout and "self" in proc.stdout
    assert {"config.json", "model.safetensors", "conversion_report.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["use_mlm_head"] is True
    broken = copy_case("self_memattn_tanh", tmp_path)
    (broken / "decoder" / "model.safetensors").unlink()
    proc = _cli(
        *_component_flags(case, decoder=broken / "decoder"),
        "--output",
        str(tmp_path / "x"),
    )
    assert proc.returncode != 0
    assert "model.safetensors" in proc.stderr and str(broken / "decoder") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_embedding_difference_is_reported(tmp_path):
    root = copy_case("padded_batch", tmp_path)
    edit_tensors(root / "decoder", lambda t, m: t["model.embedding.weight"].add_(0.5))
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case="padded_batch"))
    enc = load_file(root / "encoder" / "model.safetensors")["model.embedding.weight"]
    assert torch.equal(sd["model.embed_tokens.weight"], enc)
    assert report["embedding"]["decoder_max_abs_diff"] == pytest.approx(0.5)
    assert report["consumed_keys"]["decoder:model.embedding.weight"].startswith("compared with the encoder's table")
    assert any("embedding" in n for n in report["notes"])


def test_conversion_error_is_value_error():
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ValueError, match=r"--rope-layout 'rotate_half'"):
        convert_case("moe_gqa", rope_layout="rotate_half")
    with pytest.raises(ValueError, match=r"either --whole-model or"):
        convert_rxlm_checkpoint(whole_model=FIXTURES / "moe_gqa", decoder=FIXTURES / "moe_gqa/decoder")


# ---------------------------------------------------------------------------------------------------------------
# synthetic round trips over the option space (held-back cases cover norm / gate / MoE variants not in the fixtures)
# ---------------------------------------------------------------------------------------------------------------


def _reference_component_config(c, encoder: bool) -> dict:
    from modeling_rxt.conversion import COMPONENT_DEFAULTS

    cfg = {k: getattr(c, k) for k in COMPONENT_DEFAULTS if hasattr(c, k)}
    cfg["use_nope"] = not c.use_rope
    if encoder:
        cfg.pop("stateless_layers_config"), cfg.pop("final_stateless_layers_config")
    return cfg


def _reference_memattn_config(m, variant: str) -> dict:
    common = [
        "num_layers",
        "embed_dim",
        "att_heads",
        "seq_len",
        "stm_size",
        "att_type",
        "att_groups",
        "att_query_groups",
        "att_dropout",
        "norm_type",
        "norm_init_gate",
        "norm_per_dim_scale",
        "norm_decay",
        "use_gated_residual",
        "residual_gate_type",
        "residual_per_slot_gate",
        "residual_gate_init",
        "residual_gate_slot_status_type",
        "use_tanh_residual_gate",
        "rope_base",
        "use_flash_attention",
        "debug_mode",
        "debug_interval",
    ]
    if variant == "simple":
        common.append("disable_residual")
    if variant == "self":
        common += [
            "self_att_type",
            "self_att_groups",
            "self_att_query_groups",
            "self_att_dropout",
            "use_gate_for_self_attention",
        ]
    if variant in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
        common += [
            "interlayer_att_type",
            "interlayer_att_groups",
            "interlayer_att_query_groups",
            "interlayer_att_dropout",
        ]
    if variant == "grouped-self-interlayer":
        common.append("num_groups")
    cfg = {k: getattr(m, k) for k in common}
    cfg["att_experts"] = None
    return cfg


def write_reference_folders(config, sd: dict, root: Path) -> Path:
    """Write a project state dict back in the reference component format (the inverse of the converter)."""
    dec, enc, mem = config.decoder_config, config.encoder_config, config.memory_attention_config
    parts = {"decoder": {}, "encoder": {}, "memory_attention": {}, "mlm_head": {}}

    def ref(rest, c):
        if c.use_gated:
            rest = rest.replace(".ff.fc1.", ".ff.fc1.linear.").replace(
                ".ff.shared_expert.fc1.", ".ff.shared_expert.fc1.linear."
            )
        return rest.replace(".ff.router.weight", ".ff.router.gate.weight")

    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            parts["decoder"]["model.embedding.weight"] = v
            parts["encoder"]["model.embedding.weight"] = v
        elif k.startswith("lm_head."):
            parts["decoder"]["model.head." + k[len("lm_head.") :]] = v
        elif k.startswith("model.decoder."):
            parts["decoder"]["model." + ref(k[len("model.decoder.") :], dec)] = v
        elif k.startswith("model.encoder."):
            parts["encoder"]["model." + ref(k[len("model.encoder.") :], enc)] = v
        elif k.startswith("model.memory_attention."):
            parts["memory_attention"]["model." + k[len("model.memory_attention.") :]] = v
        elif k.startswith("mlm_head."):
            parts["mlm_head"][k[len("mlm_head.") :]] = v
    L, S, D = dec.num_layers, mem.stm_size, dec.embed_dim
    for comp, c, first in (
        ("decoder", dec, "model.layers.0.attention."),
        ("encoder", enc, "model.layers.0.attention."),
        ("memory_attention", mem, "model.attention_layers.0."),
    ):
        if getattr(c, "use_rope", True):
            hd = c.embed_dim // c.att_heads
            inv = 1.0 / (float(c.rope_base) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            parts[comp][first + "rope.inv_freq"] = inv
            parts[comp][first + "rope.cache"] = torch.outer(torch.arange(c.seq_len, dtype=torch.float32), inv)
    parts["decoder"]["model.stm.memory"] = torch.randn(L, 1, S, D)
    parts["memory_attention"]["model.stm.memory"] = torch.randn(L, 1, S, D)
    configs = {
        "decoder": _reference_component_config(dec, False),
        "encoder": _reference_component_config(enc, True),
        "memory_attention": _reference_memattn_config(mem, config.memory_attention_variant),
        "mlm_head": {"embed_dim": D, "vocab_size": dec.vocab_size},
    }
    for comp, tensors in parts.items():
        if not tensors:
            continue
        (root / comp).mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(root / comp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (root / comp / "config.json").write_text(json.dumps(configs[comp]))
    return root


MOE = dict(use_moe=True, num_experts=4, moe_top_k=2, ff_dim=24)
SYNTHETIC = {
    "positional-linear-slotstatus": dict(
        memory_attention_variant="self-interlayer",
        memory_attention=dict(
            norm_type="positional",
            use_gated_residual=True,
            residual_gate_type="linear",
            residual_per_slot_gate=True,
            residual_gate_slot_status_type="linear",
            use_tanh_residual_gate=False,
        ),
    ),
    "positional-perdim-static": dict(
        memory_attention_variant="simple",
        memory_attention=dict(
            norm_type="positional",
            norm_per_dim_scale=True,
            use_gated_residual=True,
            residual_gate_type="static",
            residual_per_slot_gate=False,
        ),
    ),
    "adaptive-elementwise-slotstatus": dict(
        memory_attention_variant="interlayer",
        memory_attention=dict(
            norm_type="adaptive",
            use_gated_residual=True,
            residual_gate_type="elementwise",
            residual_gate_slot_status_type="linear",
        ),
    ),
    "layer-linear-not-per-slot": dict(
        memory_attention_variant="grouped-self-interlayer",
        memory_attention=dict(
            norm_type="layer",
            num_groups=2,
            use_gated_residual=True,
            residual_gate_type="linear",
            residual_per_slot_gate=False,
        ),
    ),
    "self-ungated-main-gated-self": dict(
        memory_attention_variant="self",
        memory_attention=dict(
            norm_type="rms",
            use_gated_residual=False,
            use_gate_for_self_attention=True,
            residual_gate_type="linear",
            self_att_groups=1,
            self_att_query_groups=4,
        ),
    ),
    "self-ungated": dict(memory_attention_variant="self", memory_attention=dict(use_gated_residual=False)),
    "moe-shared3-local": dict(
        decoder=dict(
            **MOE,
            num_shared_experts=3,
            shared_expert_dim=16,
            moe_bias_mode="local",
            moe_shared_experts_bias_mode="local",
            moe_use_weighted_shared_experts=True,
            stateless_layers_config=["moe", "dense"],
            dense_layer_dim=40,
        )
    ),
    "moe-dense-experts-global-shared": dict(
        decoder=dict(
            **MOE,
            use_gated=False,
            num_shared_experts=1,
            moe_shared_experts_bias_mode="global",
            final_stateless_layers_config=["moe", "moe"],
        )
    ),
    "moe-shared2-off": dict(
        decoder=dict(**MOE, num_shared_experts=2, moe_bias_mode="off", moe_shared_experts_bias_mode="off")
    ),
    "dense-stateless-width-ff": dict(
        decoder=dict(
            stateless_layers_config=["dense", "moe"], dense_layer_dim=40, final_stateless_layers_config=["moe"]
        )
    ),
    "stateless-coinciding-widths": dict(
        decoder=dict(
            stateless_layers_config=["moe", "dense"], dense_layer_dim=64, final_stateless_layers_config=["dense"]
        )
    ),
    "layernorm-nope-gated-cross": dict(
        decoder=dict(
            use_rms_norm=False,
            use_rope=False,
            use_gated_attention=True,
            use_gated_cross_attention=True,
            gated_attention_activation="tanh",
            use_attention_output_bias=False,
            head_norm_type="layer_norm",
        ),
        encoder=dict(use_rms_norm=False, use_rope=False),
    ),
    "mqa-cross-gqa-self-mlm": dict(
        use_mlm_head=True, decoder=dict(att_groups=1, att_query_groups=4, cross_att_groups=4, cross_att_query_groups=2)
    ),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_round_trip(tmp_path, name):
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SYNTHETIC[name].items()}
    original = RxTConfig.tiny(**kwargs)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) for k, shape in expected_state_dict_shapes(original).items()}
    root = write_reference_folders(original, sd, tmp_path / name)
    args = component_args(root, rope_layout=None)
    variant_flag = None
    if original.memory_attention_variant in ("interlayer", "self-interlayer", "grouped-self-interlayer") and not (
        original.memory_attention_config.use_gated_residual
    ):
        variant_flag = original.memory_attention_variant
    config, out, report = convert_rxlm_checkpoint(**args, memory_attention_variant=variant_flag)
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    assert config.memory_attention_variant == original.memory_attention_variant
    assert config.use_mlm_head == original.use_mlm_head
    for sub in ("decoder_config", "encoder_config", "memory_attention_config"):
        a, b = getattr(original, sub).to_dict(), getattr(config, sub).to_dict()
        if sub != "memory_attention_config" and a["use_gated_cross_attention"] is None:  # written explicitly
            a["use_gated_cross_attention"] = getattr(original, sub).gated_cross_attention
        if (
            sub != "memory_attention_config"
            and a["use_moe"]
            and a["num_shared_experts"]
            and a["shared_expert_dim"] is None
        ):
            a["shared_expert_dim"] = a["ff_dim"]  # written explicitly
        diff = {k for k in a if a[k] != b.get(k)} - {"transformers_version"}
        assert not diff, f"{sub}: {[(k, a[k], b.get(k)) for k in sorted(diff)]}"
    assert report["conflicts"] == []
    assert_full_coverage(
        report, {r: root / r for r in ("decoder", "encoder", "memory_attention", "mlm_head") if (root / r).is_dir()}
    )


# ---------------------------------------------------------------------------------------------------------------
# MRL critic (docs/conversion.md#critic)
# ---------------------------------------------------------------------------------------------------------------


def tiny_critic(activation="tanh"):
    """A tiny policy config and an `RxTCritic` for it, every tensor perturbed (so no two are alike)."""
    from modeling_rxt import RxTForCausalLM
    from trainers.mrl_critic import RxTCritic

    torch.manual_seed(0)
    config = RxTConfig.tiny()
    critic = RxTCritic(RxTForCausalLM(config), activation=activation).eval()
    with torch.no_grad():
        for param in critic.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return config, critic


def write_reference_critic(config, critic, root: Path) -> Path:
    """`critic` in the reference format (`MrlCriticModel`) at root/critic; the encoder goes through
    `write_reference_folders` (scratch output in root/critic_parts)."""
    sd = critic.state_dict()
    encoder = {"model." + k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    parts = write_reference_folders(config, encoder, root / "critic_parts")
    tensors = {"encoder." + k: v for k, v in load_file(parts / "encoder" / "model.safetensors").items()}
    for ref, own in (("value_head.0.linear.", "glu."), ("value_head.1.", "norm."), ("value_head.2.", "value.")):
        tensors.update({ref + n: sd[own + n] for n in ("weight", "bias")})
    tensors.update(scale=sd["scale"], shift=sd["shift"])  # 0-dim
    folder = root / "critic"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    cfg = {"activation": critic.activation, "embed_dim": config.encoder_config.embed_dim, "init_scale": 10.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_critic_round_trip(tmp_path):
    from modeling_rxt import RxTForCausalLM
    from trainers.mrl_critic import RxTCritic

    config, critic = tiny_critic()
    sd, info = convert_rxlm_critic(write_reference_critic(config, critic, tmp_path), config)
    own = critic.state_dict()
    assert set(sd) == set(own) and all(torch.equal(sd[k], own[k]) for k in own)
    assert (info["activation"], info["init_scale"]) == ("tanh", 10.0)
    assert {e["key"] for e in info["ignored_keys"]} == {
        "critic:encoder.model.layers.0.attention.rope.inv_freq",
        "critic:encoder.model.layers.0.attention.rope.cache",
    }
    loaded = RxTCritic(RxTForCausalLM(config), activation=info["activation"]).eval()
    loaded.load_state_dict(sd, strict=True)
    ids = torch.randint(7, config.encoder_config.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), critic(ids, mask), rtol=0, atol=0)


def test_critic_bad_keys_and_config_all_listed(tmp_path):
    config, critic = tiny_critic()
    folder = write_reference_critic(config, critic, tmp_path)

    def damage(t, meta):
        del t["value_head.1.bias"]  # missing
        t["value_head.3.weight"] = torch.zeros(1, 32)  # unexpected
        t["scale"] = torch.ones(1)  # shape mismatch (0-dim expected)

    edit_tensors(folder, damage)
    with pytest.raises(ConversionError) as info:
        convert_rxlm_critic(folder, config)
    msg = str(info.value)
    assert "critic:value_head.3.weight [1, 32]" in msg
    assert "missing keys (1)" in msg and "norm.bias [32]" in msg
    assert "scale from critic:scale: shape [1], expected []" in msg
    edit_config(folder, lambda c: c.update(activation="relu", embed_dim=64, head="mlp"))
    with pytest.raises(ConversionError, match=r"(?s)'head' is unknown.*activation='relu'.*embed_dim=64"):
        convert_rxlm_critic(folder, config)


def test_cli_critic(tmp_path):
    config, critic = tiny_critic()
    gen = torch.Generator().manual_seed(0)
    policy = {k: torch.randn(shape, generator=gen) for k, shape in expected_state_dict_shapes(config).items()}
    root = write_reference_folders(config, policy, tmp_path / "reference")
    out = tmp_path / "converted"
    proc = _cli(
        *_component_flags(root),
        "--critic",
        str(write_reference_critic(config, critic, tmp_path)),
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "--critic_name_or_path" in proc.stdout
    written = load_file(out / "critic" / "model.safetensors")
    own = critic.state_dict()
    assert set(written) == set(own) and all(torch.equal(written[k], own[k]) for k in own)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["critic"]["output"] == "critic/model.safetensors" and report["critic"]["activation"] == "tanh"
    assert json.loads((out / "critic" / "config.json").read_text()) == {"activation": "tanh", "init_scale": 10.0}


# ---------------------------------------------------------------------------------------------------------------
# hostile inputs: stray keys, non-finite weights, broken files, bf16 checkpoints, existing output folders
# ---------------------------------------------------------------------------------------------------------------


def test_stray_layer_key_is_named_not_counted(tmp_path):
    root = copy_case("moe_gqa", tmp_path)  # 2 layers
    stray = torch.zeros(4, 4)
    edit_tensors(root / "decoder", lambda t, m: t.update({"model.layers.7.attention.q_proj.weight": stray}))
    with pytest.raises(ConversionError) as info:
        convert_rxlm_checkpoint(**component_args(root, case="moe_gqa"))
    msg = str(info.value)
    assert "decoder:model.layers.7.attention.q_proj.weight [4, 4]" in msg and "layer counts differ" not in msg
    assert "model.layers.0..1 are complete" in msg
    # a stray key right after the last layer (an incomplete layer 2) is named too, in the memory attention as well
    root = copy_case("padded_batch", tmp_path / "b")
    edit_tensors(root / "memory_attention", lambda t, m: t.update({"model.attention_layers.2.extra": stray}))
    with pytest.raises(ConversionError, match=r"memory_attention:model\.attention_layers\.2\.extra \[4, 4\]"):
        convert_rxlm_checkpoint(**component_args(root, case="padded_batch"))


def test_non_finite_weights_are_refused_and_all_listed(tmp_path):
    root = copy_case("padded_batch", tmp_path)

    def poison(key, value):
        def edit(t, m):
            t[key].view(-1)[:2] = value

        return edit

    edit_tensors(root / "decoder", poison("model.layers.0.attention.q_proj.weight", float("nan")))
    edit_tensors(root / "memory_attention", poison("model.attention_layers.1.k_proj.weight", float("inf")))
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_rxlm_checkpoint(**component_args(root, case="padded_batch"), output=out)
    msg = str(info.value)
    assert "decoder:model.layers.0.attention.q_proj.weight [24, 48]: 2 of 1152 values are NaN or infinite" in msg
    assert "memory_attention:model.attention_layers.1.k_proj.weight" in msg and "expected finite weights" in msg
    assert not out.exists()


def test_truncated_or_foreign_weights_file_is_an_error_line(tmp_path, capsys):
    root = copy_case("padded_batch", tmp_path)
    weights = root / "decoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(
        ConversionError, match=r"decoder/model\.safetensors' \(5000 bytes\) is not a readable safetensors"
    ):
        convert_rxlm_checkpoint(**component_args(root, case="padded_batch"))
    code, err = _cli_in_process(capsys, *_component_flags(root), "--rope-layout", "interleaved", "--output",
                                str(tmp_path / "x"))  # fmt: skip
    assert code == 1 and err.startswith("error: ") and str(weights) in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    torch.save({"w": torch.zeros(2)}, weights)  # a pickle under the safetensors name
    with pytest.raises(ConversionError, match=r"is not a readable safetensors file"):
        convert_rxlm_checkpoint(**component_args(root, case="padded_batch"))
    shutil.copyfile(FIXTURES / "padded_batch" / "decoder" / "model.safetensors", weights)
    (root / "encoder" / "config.json").write_bytes(b"\xff\xfe{")  # not UTF-8
    with pytest.raises(ConversionError, match=r"encoder folder .*config\.json is not valid JSON"):
        convert_rxlm_checkpoint(**component_args(root, case="padded_batch"))


@pytest.mark.parametrize("case", ["self_memattn_tanh", "moe_gqa"])
def test_checkpoint_stored_entirely_in_bf16_converts(tmp_path, case):
    root = copy_case(case, tmp_path)
    originals = {}
    for comp in ("decoder", "encoder", "memory_attention", "mlm_head"):
        if (root / comp).is_dir():
            tensors, _ = read_safetensors(root / comp / "model.safetensors")
            originals[comp] = tensors
            edit_tensors(root / comp, lambda t, m: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert any(k.endswith("rope.inv_freq") for k in originals["decoder"])  # RoPE buffers are bf16 too
    config, sd, report = convert_rxlm_checkpoint(**component_args(root, case=case))
    fp32_config, fp32_sd, _ = convert_case(case)
    assert config.to_dict() == fp32_config.to_dict() and set(sd) == set(fp32_sd)
    for key, value in sd.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, fp32_sd[key].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert report["dtype_conversions"] and all(d["from"] == "bfloat16" for d in report["dtype_conversions"])
    # a wrong rope_base is still caught in bf16, and the message names it (not the dtype)
    edit_config(root / "decoder", lambda c: c.update(rope_base=100000))
    with pytest.raises(ConversionError, match=r"decoder: RoPE inv_freq .* rope_base=100000 .* bfloat16"):
        convert_rxlm_checkpoint(**component_args(root, case=case))


def test_non_empty_output_needs_overwrite_and_leaves_no_stale_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"tokenizer.json": "{}", "model.safetensors.index.json": "{}", "notes.txt": "mine"}
    for name, text in stale.items():
        (out / name).write_text(text)
    (out / "critic").mkdir()
    (out / "critic" / "config.json").write_text("{}")
    config, sd, report = convert_case("padded_batch")
    with pytest.raises(
        ConversionError, match=r"(?s)output folder .*out' is not empty .*model\.safetensors\.index.*--overwrite"
    ):
        write_converted_folder(config, sd, report, out)
    assert {p.name for p in out.iterdir()} == set(stale) | {"critic"}  # untouched
    assert (out / "notes.txt").read_text() == "mine"
    write_converted_folder(config, sd, report, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert not names & (set(stale) | {"critic"}), names
    assert {"config.json", "model.safetensors", "conversion_report.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left behind
    from modeling_rxt.modeling_rxt import RxTForCausalLM

    assert set(RxTForCausalLM.from_pretrained(str(out)).state_dict()) == set(sd)
    # an empty folder is fine without --overwrite; a folder holding an input is refused even with it
    (tmp_path / "empty").mkdir()
    write_converted_folder(config, sd, report, tmp_path / "empty")
    root = copy_case("padded_batch", tmp_path / "inputs")
    with pytest.raises(ConversionError, match=r"--overwrite would replace .* choose another output folder"):
        convert_rxlm_checkpoint(**component_args(root, case="padded_batch"), output=root, overwrite=True)
    assert (root / "decoder" / "model.safetensors").is_file()


def _cli_in_process(capsys, *args) -> tuple[int, str]:
    """`scripts/convert_rxlm_checkpoint.py` run in this process (`test_cli` runs it as a subprocess): exit code and
    stderr."""
    import convert_rxlm_checkpoint

    capsys.readouterr()
    code = convert_rxlm_checkpoint.main(list(args))
    return code, capsys.readouterr().err


def test_cli_overwrite(tmp_path, capsys):
    case = FIXTURES / "padded_batch"
    out = tmp_path / "converted"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    flags = [*_component_flags(case), "--rope-layout", "interleaved", "--output", str(out)]
    code, err = _cli_in_process(capsys, *flags)
    assert code == 1 and err.startswith("error: ") and "--overwrite" in err
    assert {p.name for p in out.iterdir()} == {"tokenizer.json"}
    code, err = _cli_in_process(capsys, *flags, "--overwrite")
    assert code == 0, err
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()

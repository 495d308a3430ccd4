"""Parity with the reference implementation: every fixture case under ../shared/fixtures/reference is converted
with the CLI, loaded through `AutoModelForCausalLM(..., trust_remote_code=True)` and must reproduce every expected
tensor within the case's tolerance on real positions (the contract of ../shared/fixtures/README.md)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FIXTURES, REPO_ROOT

CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").is_file()) if FIXTURES.is_dir() else []


@pytest.fixture(scope="module", params=CASES)
def converted(request, tmp_path_factory):
    case = FIXTURES / request.param
    meta = json.loads((case / "case.json").read_text())
    output = tmp_path_factory.mktemp(request.param) / "model"
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "convert_rxlm_checkpoint.py"),
        "--decoder", str(case / "decoder"), "--encoder", str(case / "encoder"),
        "--memory-attention", str(case / "memory_attention"), "--rope-layout", meta["rope_layout"],
        "--output", str(output),
    ]  # fmt: skip
    if (case / "mlm_head").is_dir():
        command += ["--mlm-head", str(case / "mlm_head")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    return case, meta, model


def test_fixture_cases_exist():
    assert len(CASES) >= 5, f"expected the reference fixtures under {FIXTURES}"


def test_parity_with_reference(converted):
    case, meta, model = converted
    inputs = load_file(case / "inputs.safetensors")
    expected = load_file(case / "expected.safetensors")
    ids, mask, stm = inputs["input_ids"], inputs["attention_mask"], inputs["stm"]
    real = mask.bool()
    assert model.config.memory_attention_variant == meta["memory_attention_variant"]
    assert model.config.rope_layout == meta["rope_layout"]
    with torch.no_grad():
        produced = {
            "decoder_logits": model(input_ids=ids, attention_mask=mask, stm=stm.clone()).logits,
            "updated_stm": model.update_memory(ids, attention_mask=mask, stm=stm.clone()),
            "encoder_hidden_states": model.encode(ids, attention_mask=mask),
        }
        if "mlm_logits" in expected:
            produced["mlm_logits"] = model.mlm_logits(ids, attention_mask=mask)
    assert set(meta["required"]) <= set(produced)
    for name, value in produced.items():
        target = expected[name]
        assert value.shape == target.shape, name
        if name == "updated_stm":
            diff = (value - target).abs().max().item()
        elif name == "encoder_hidden_states":
            diff = (value - target)[:, real].abs().max().item()
        else:
            diff = (value - target)[real].abs().max().item()
        assert diff <= meta["tolerance"], f"{case.name} {name}: max abs diff {diff:.3e} > {meta['tolerance']}"


def test_cached_generation_matches_uncached_on_converted_model(converted):
    case, _, model = converted
    from modeling_rxt import RxTCache  # noqa: F401 - the remote-code cache class is used through generate

    inputs = load_file(case / "inputs.safetensors")
    ids, stm = inputs["input_ids"][:1, :6], inputs["stm"][:, :1]
    cache_cls = type(model).__module__.rsplit(".", 1)[0] + ".cache_rxt"
    cache = sys.modules[cache_cls].RxTCache(stm=stm.clone())
    out = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip
    with torch.no_grad():
        full = model(out.sequences, stm=stm).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
    assert torch.equal(full.argmax(-1), out.sequences[:, ids.shape[1] :])

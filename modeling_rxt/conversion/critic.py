"""The reference MRL critic (`MrlCriticModel`, docs/conversion.md#critic) → the state dict of
`trainers.mrl_critic.RxTCritic` for the converted policy."""

from __future__ import annotations

import torch

from ..configuration_rxt import RxTConfig
from .builder import Builder
from .folders import ConversionError, Folder, View
from .key_mapping import check_strict, map_stack
from .reference_config import check_fields
from .report import Report
from .shapes import expected_state_dict_shapes

CRITIC_FIELDS = ("activation", "embed_dim", "init_scale")  # the reference always writes all three
CRITIC_ACTIVATIONS = ("sigmoid", "tanh", "linear")
# value head: reference prefix -> RxTCritic prefix
_CRITIC_HEAD = (("value_head.0.linear.", "glu."), ("value_head.1.", "norm."), ("value_head.2.", "value."))


def _critic_shapes(config: RxTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `RxTCritic` for a policy with `config`, with its shape: the policy's embedding and memory
    encoder (shapes from the policy built on the meta device) under `encoder.`, then the value head."""
    policy = expected_state_dict_shapes(config)
    shapes = {
        "encoder." + key[len("model.") :]: shape
        for key, shape in policy.items()
        if key.startswith(("model.embed_tokens.", "model.encoder."))
    }
    dim = config.encoder_config.embed_dim
    shapes.update(
        {
            "glu.weight": (2 * dim, dim),  # GLU D -> D: first half linear, second half through SiLU
            "glu.bias": (2 * dim,),
            "norm.weight": (dim,),  # LayerNorm
            "norm.bias": (dim,),
            "value.weight": (1, dim),
            "value.bias": (1,),
            "scale": (),  # 0-dim
            "shift": (),
        }
    )
    return shapes


def convert_rxlm_critic(critic_dir, config: RxTConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Convert a reference MRL critic folder (`MrlCriticModel`) into the state dict of `trainers.mrl_critic.RxTCritic` for a
    policy with `config` (the converted model's config).

    `encoder.model.*` goes through the encoder mapping of the other inputs (RoPE and STM buffers ignored); the value
    head `value_head.{0.linear,1,2}.*` becomes `glu.*`, `norm.*`, `value.*`; `scale` and `shift` keep their names.

    Returns:
        `(state_dict, info)`; `info` holds the config's `activation` and `init_scale`, the input folder (with its
        config hash), the ignored keys and any dtype conversions.

    Raises:
        `ConversionError`: a config field is unknown, missing or invalid, or keys are missing, unexpected or mis-shaped
        (all of them listed, docs/conversion.md#strictness-and-the-report).
    """
    folder = Folder("critic", critic_dir)
    cfg, dim = folder.config, config.encoder_config.embed_dim
    errors = []
    check_fields("critic", cfg, CRITIC_FIELDS, errors)
    errors += [f"critic config field '{field}' is missing" for field in CRITIC_FIELDS if field not in cfg]
    if "activation" in cfg and cfg["activation"] not in CRITIC_ACTIVATIONS:
        errors.append(f"critic activation={cfg['activation']!r}: expected one of {list(CRITIC_ACTIVATIONS)}")
    if "embed_dim" in cfg and cfg["embed_dim"] != dim:
        errors.append(f"critic embed_dim={cfg['embed_dim']}: the policy's is {dim}")
    if errors:
        raise ConversionError(f"critic folder '{folder.path}': invalid config.json:\n  " + "\n  ".join(errors))

    report = Report()
    b = Builder(report)
    encoder = View(folder, "encoder.model.", "encoder")
    if encoder.has("embedding.weight"):
        b.map(encoder, "embedding.weight", "encoder.embed_tokens.weight")
    map_stack(encoder, "encoder", b, report, False, target="encoder.encoder.")
    head = View(folder, "", "critic")
    for key in head.keys():
        if key in ("scale", "shift"):
            b.map(head, key, key)
        for old, new in _CRITIC_HEAD:
            if key.startswith(old):
                b.map(head, key, new + key[len(old) :])
    check_strict([folder], b, _critic_shapes(config), "the policy's critic")

    info = {
        "input": folder.describe(),
        "activation": cfg["activation"],
        "init_scale": cfg["init_scale"],
        "ignored_keys": [
            {"key": f"critic:{name}", "reason": detail}
            for name, (kind, detail) in sorted(folder.status.items())
            if kind == "ignored"
        ],
        "dtype_conversions": report.data["dtype_conversions"],
    }
    return {k: v.contiguous() for k, v in b.sd.items()}, info

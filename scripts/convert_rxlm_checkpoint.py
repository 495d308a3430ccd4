#!/usr/bin/env python
"""Convert reference (rxlm) RxT checkpoints into one project folder (docs/conversion.md#the-output-folder,
docs/conversion.md#how-the-converter-decides).

Component repos:
    python scripts/convert_rxlm_checkpoint.py --decoder DEC --encoder ENC --memory-attention MEM \
        [--mlm-head MLM] [--rope-layout interleaved|split_concat] [--memory-attention-variant NAME] \
        [--import-stm] [--drop-encoder-cross-attention] [--tokenizer DIR] [--critic DIR] --output OUT [--overwrite]
Whole-model repo (RxTAlpha / RxTBeta):
    python scripts/convert_rxlm_checkpoint.py --whole-model DIR [--critic DIR] --output OUT

The output folder holds config.json, model.safetensors, the tokenizer files (when a tokenizer is found) and
conversion_report.json; with --critic also critic/ (model.safetensors + config.json: the MRL checkpoint layout, for
MRL's --critic_name_or_path). Nothing is written unless the conversion is complete and exact; a non-empty output
folder is refused unless --overwrite, which replaces its whole content. Errors are one `error:` line on stderr
(exit status 1). The converter itself is the package `modeling_rxt.conversion`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modeling_rxt.conversion import (  # noqa: E402
    REPORT_NAME,
    ROPE_LAYOUT_CHOICES,
    VARIANT_CHOICES,
    check_output_folder,
    convert_rxlm_checkpoint,
    convert_rxlm_critic,
    write_converted_folder,
)
from trainers.mrl_critic import write_critic_folder  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert reference (rxlm) RxT checkpoints into a project (transformers) folder.",
    )
    parser.add_argument("--decoder", type=Path, help="decoder component folder (config.json + model.safetensors)")
    parser.add_argument("--encoder", type=Path, help="encoder component folder")
    parser.add_argument("--memory-attention", type=Path, help="memory-attention component folder")
    parser.add_argument("--mlm-head", type=Path, help="optional MLM-head folder")
    parser.add_argument("--whole-model", type=Path, help="whole-model folder (instead of the three components)")
    parser.add_argument(
        "--rope-layout",
        choices=ROPE_LAYOUT_CHOICES,
        help="RoPE layout of the checkpoint (required for checkpoints of older reference releases)",
    )
    parser.add_argument(
        "--memory-attention-variant",
        choices=VARIANT_CHOICES,
        help="memory-attention variant when the keys cannot decide it (ungated interlayer family)",
    )
    parser.add_argument(
        "--import-stm", action="store_true", help="use the stored memory-attention STM as a learned initial STM"
    )
    parser.add_argument(
        "--drop-encoder-cross-attention",
        action="store_true",
        help="accept a predecessor-framework encoder and drop its memory cross-attention",
    )
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: search the inputs)")
    parser.add_argument("--critic", type=Path, help="optional MRL critic folder; written to OUT/critic/")
    parser.add_argument("--output", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the whole content of a non-empty output folder (otherwise it is refused)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    inputs = [args.decoder, args.encoder, args.memory_attention, args.mlm_head, args.whole_model, args.tokenizer,
              args.critic]  # fmt: skip
    try:
        check_output_folder(args.output, args.overwrite, inputs)  # before the conversion's work
        config, state_dict, report = convert_rxlm_checkpoint(
            decoder=args.decoder,
            encoder=args.encoder,
            memory_attention=args.memory_attention,
            mlm_head=args.mlm_head,
            whole_model=args.whole_model,
            rope_layout=args.rope_layout,
            memory_attention_variant=args.memory_attention_variant,
            import_stm=args.import_stm,
            drop_encoder_cross_attention=args.drop_encoder_cross_attention,
            tokenizer=args.tokenizer,
        )
        critic = None
        if args.critic is not None:
            critic, report["critic"] = convert_rxlm_critic(args.critic, config)
            report["critic"]["output"] = "critic/model.safetensors"
        tokenizer_dir = report.get("token_ids", {}).get("tokenizer_dir")
        write_converted_folder(
            config,
            state_dict,
            report,
            args.output,
            tokenizer_dir=tokenizer_dir,
            overwrite=args.overwrite,
            inputs=inputs,
        )
        if critic is not None:
            write_critic_folder(critic, report["critic"]["activation"], report["critic"]["init_scale"], args.output)
    except (ValueError, OSError) as error:  # ConversionError is a ValueError; OSError: unreadable / unwritable paths
        print(f"error: {error}", file=sys.stderr)
        return 1
    dec, mem = config.decoder_config, config.memory_attention_config
    counts = report["counts"]
    print(f"converted -> {args.output}")
    print(
        f"  decoder: L={dec.num_layers} D={dec.embed_dim} V={dec.vocab_size} "
        f"{'MoE' if dec.use_moe else 'dense'} FF; memory attention: {config.memory_attention_variant}, "
        f"norm {mem.norm_type}, S={mem.stm_size}"
    )
    print(f"  rope layout: {config.rope_layout} ({report['rope_layout']['decided_by']})")
    print(
        f"  tensors: {counts['project_tensors']} written; {counts['ignored']} ignored, {counts['dropped']} dropped; "
        f"{counts['conflicts']} config/shape conflicts; {len(report['defaults_filled'])} defaults filled"
    )
    diff = report["embedding"].get("decoder_max_abs_diff")
    if diff:
        print(f"  note: decoder and encoder embeddings differ (max abs diff {diff:g}); the encoder's is used")
    print(f"  token ids: {report['token_ids']['source']}")
    if critic is not None:
        print(f"  critic: {args.output / 'critic'} (MRL: --critic_name_or_path {args.output})")
    print(f"  report: {args.output / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m serving MODEL_DIR [--db URL] [--host 127.0.0.1] [--port 8000] [--api-key KEY ...]`"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=(
        "Serve an RxT checkpoint with an OpenAI-compatible API; each conversation's memory (STM) is kept in a "
        "database and every turn processes only the new message. See docs/serving.md."))  # fmt: skip
    parser.add_argument("model_dir", help="RxT checkpoint folder (model + tokenizer, as save_pretrained writes it)")
    parser.add_argument("--db", default=None, help="state store: postgresql://user@host:port/db, sqlite:///PATH or a "
                        "file path (default: rxt_state.sqlite3 in the working directory)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="accepted Bearer key (repeat for several; each key owns what it creates). Also read "
                        "from RXT_SERVE_API_KEYS (comma-separated). None: no authentication.")  # fmt: skip
    parser.add_argument("--keep-snapshots", type=int, default=4, help="STM snapshots kept per conversation "
                        "(the current one included): how many turns back a previous_response_id can fork from")  # fmt: skip
    parser.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: folder name)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most conversations per decode / memory batch")
    parser.add_argument("--max-turns-in-flight", type=int, default=256, help="admitted turns beyond which the "
                        "server answers 429 with Retry-After")  # fmt: skip
    parser.add_argument("--max-output-tokens", type=int, default=256, help="largest max_output_tokens accepted")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    parser.add_argument("--max-input-items", type=int, default=256, help="most messages / items per request")
    parser.add_argument("--update-delay", type=float, default=0.0, help="seconds a memory update may wait to join "
                        "a larger batch while replies are generated (a turn that needs it runs it at once)")  # fmt: skip
    parser.add_argument("--state-cache-mb", type=float, default=1024, help="STMs kept in memory besides the store "
                        "(the latest of recently active conversations), in MiB")  # fmt: skip
    parser.add_argument("--baseline-mode", default="kv", choices=["kv", "history"], help="for a non-RxT causal LM "
                        "(benchmark baselines): keep each conversation's KV cache (kv) or re-read the resent history "
                        "every turn (history)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import torch
    import uvicorn

    from .app import create_app
    from .engine import load_backend
    from .service import Limits
    from .store import open_store

    if args.threads:
        torch.set_num_threads(args.threads)
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("RXT_SERVE_API_KEYS", "").split(",") if k.strip()]
    backend = load_backend(args.model_dir, args.device, args.dtype, args.baseline_mode)
    store = open_store(args.db or "rxt_state.sqlite3", args.keep_snapshots)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_output_tokens=args.max_output_tokens,
                    max_input_items=args.max_input_items, max_turns_in_flight=args.max_turns_in_flight,
                    max_batch_size=args.max_batch_size)  # fmt: skip
    app = create_app(backend, store, keys, limits, args.model_name or Path(args.model_dir).resolve().name,
                     args.update_delay, int(args.state_cache_mb * (1 << 20)))  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

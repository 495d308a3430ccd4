"""A stateful, OpenAI-compatible RxT server: each conversation's Short-Term Memory lives in a database (SQLite or
PostgreSQL) and a turn processes only the new message. Start it with `python -m serving MODEL_DIR`; see
docs/serving.md."""

from .app import create_app
from .engine import (
    CausalLMBackend,
    Engine,
    RxTBackend,
    SamplingParams,
    load_backend,
    load_rxt_backend,
)
from .service import Limits
from .store import PostgresStore, SQLiteStore, Store, open_store

__all__ = [
    "CausalLMBackend",
    "Engine",
    "Limits",
    "PostgresStore",
    "RxTBackend",
    "SQLiteStore",
    "SamplingParams",
    "Store",
    "create_app",
    "load_backend",
    "load_rxt_backend",
    "open_store",
]

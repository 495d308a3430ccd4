"""Conversation state store: one small interface (`Store`), two backends (SQLite, PostgreSQL).

Per conversation the store keeps
- `turn_count`: turns (interactions) recorded, and `version`: turns whose memory update is applied; the STM after
  turn `i` is snapshot version `i + 1` (version 0 = the model's initial STM). `version < turn_count` means "memory
  pending": the recorded turns `version .. turn_count - 1` still have to be written into memory, in order.
- the STM snapshots (safetensors bytes, see `serving.engine.RxTBackend.serialize`), the latest `keep_snapshots`
  versions; the current one is always kept,
- the transcript items, and the recorded turns' memory-update token ids (so a pending update can be re-applied after
  a crash from the recorded transcript, idempotently),
- the responses (their output, and the turn whose STM they were answered from / wrote).

Every write is one transaction. Recording turn N succeeds only if `turn_count == N` and applying turn N only if
`version == N` (compare-and-set), so two server replicas can never both write turn N of one conversation and turns
are applied in order. Nothing here holds a lock across a turn: conversations never wait on each other.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rxt_conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        model_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        metadata TEXT NOT NULL,
        version INTEGER NOT NULL,
        turn_count INTEGER NOT NULL,
        item_count INTEGER NOT NULL,
        head_response_id TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS rxt_snapshots (
        conversation_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        stm {blob} NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (conversation_id, version)
    )""",
    """CREATE TABLE IF NOT EXISTS rxt_turns (
        conversation_id TEXT NOT NULL,
        turn_index INTEGER NOT NULL,
        interaction {blob} NOT NULL,
        response_id TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        applied_at DOUBLE PRECISION,
        PRIMARY KEY (conversation_id, turn_index)
    )""",
    """CREATE TABLE IF NOT EXISTS rxt_items (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        turn_index INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS rxt_items_by_conversation ON rxt_items (conversation_id, seq)",
    """CREATE TABLE IF NOT EXISTS rxt_responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        conversation_id TEXT,
        turn_index INTEGER,
        created_at DOUBLE PRECISION NOT NULL,
        body TEXT NOT NULL
    )""",
]


class StoreError(Exception):
    """Base class of the store's errors."""


class ConflictError(StoreError):
    """A compare-and-set failed: another request (or replica) wrote that turn first."""


@dataclass
class ConversationRow:
    id: str
    owner: str
    model_id: str
    created_at: float
    updated_at: float
    metadata: dict
    version: int
    turn_count: int
    item_count: int
    head_response_id: str | None

    @property
    def pending(self) -> int:
        """Recorded turns whose memory update is not applied yet."""
        return self.turn_count - self.version


@dataclass
class ItemRow:
    id: str
    conversation_id: str
    seq: int
    turn_index: int
    role: str
    content: str
    created_at: float


@dataclass
class TurnRecord:
    """One recorded turn: its memory-update token ids, the transcript items it adds and (for a generated turn) the
    response."""

    interaction: bytes
    items: list[tuple[str, str, str]]  # (item id, role, text)
    response_id: str | None = None
    response_body: dict | None = None
    owner: str = ""
    created_at: float = field(default_factory=time.time)


_CONVERSATION_COLUMNS = "id, owner, model_id, created_at, updated_at, metadata, version, turn_count, item_count, head_response_id"


def _conversation(row) -> ConversationRow:
    values = list(row)
    values[5] = json.loads(values[5])
    return ConversationRow(*values)


class Store(ABC):
    """The state store. Backends provide `_connect()`/`_transaction()`; all SQL is shared (`?` placeholders)."""

    blob_type = "BLOB"
    row_lock = ""  # appended to the SELECT of a conversation row inside a write transaction
    schema_lock = ""  # run first in the schema transaction (PostgreSQL: replicas starting together create tables once)

    def __init__(self, keep_snapshots: int = 4):
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots={keep_snapshots}: expected >= 1 (the current STM is always kept).")
        self.keep_snapshots = keep_snapshots

    # -- backend hooks ------------------------------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator:  # yields a cursor-like `execute(sql, params)` callable
        ...

    @abstractmethod
    def close(self) -> None: ...

    def _schema(self) -> None:
        with self._transaction(write=True) as execute:
            if self.schema_lock:
                execute(self.schema_lock, ())
            for statement in SCHEMA:
                execute(statement.format(blob=self.blob_type))

    # -- conversations --------------------------------------------------------------------------------------------
    def create_conversation(self, conversation_id: str, owner: str, model_id: str, metadata: dict, stm: bytes,
                            items: Sequence[ItemRow] = ()) -> ConversationRow:  # fmt: skip
        """A new conversation at version 0 with `stm` as its snapshot 0 (and optionally a copied transcript)."""
        now = time.time()
        with self._transaction(write=True) as execute:
            execute(
                f"INSERT INTO rxt_conversations ({_CONVERSATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, NULL)",
                (conversation_id, owner, model_id, now, now, json.dumps(metadata), len(items)),
            )
            execute("INSERT INTO rxt_snapshots VALUES (?, ?, ?, ?)", (conversation_id, 0, stm, now))
            for seq, item in enumerate(items):
                execute("INSERT INTO rxt_items VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (item.id, conversation_id, seq, -1, item.role, item.content, item.created_at))  # fmt: skip
        return ConversationRow(conversation_id, owner, model_id, now, now, metadata, 0, 0, len(items), None)

    def get_conversation(self, conversation_id: str) -> ConversationRow | None:
        with self._transaction() as execute:
            rows = execute(f"SELECT {_CONVERSATION_COLUMNS} FROM rxt_conversations WHERE id = ?", (conversation_id,))
        return _conversation(rows[0]) if rows else None

    def set_metadata(self, conversation_id: str, metadata: dict) -> ConversationRow | None:
        with self._transaction(write=True) as execute:
            execute("UPDATE rxt_conversations SET metadata = ?, updated_at = ? WHERE id = ?",
                    (json.dumps(metadata), time.time(), conversation_id))  # fmt: skip
            rows = execute(f"SELECT {_CONVERSATION_COLUMNS} FROM rxt_conversations WHERE id = ?", (conversation_id,))
        return _conversation(rows[0]) if rows else None

    def delete_conversation(self, conversation_id: str) -> bool:
        """Delete the conversation, its snapshots, turns and transcript (its responses stay retrievable)."""
        with self._transaction(write=True) as execute:
            found = execute(f"SELECT id FROM rxt_conversations WHERE id = ?{self.row_lock}", (conversation_id,))
            for table in ("rxt_snapshots", "rxt_turns", "rxt_items"):
                execute(f"DELETE FROM {table} WHERE conversation_id = ?", (conversation_id,))
            execute("DELETE FROM rxt_conversations WHERE id = ?", (conversation_id,))
        return bool(found)

    def pending_conversations(self) -> list[str]:
        """Ids of conversations with recorded turns whose memory update is not applied (re-applied at start-up)."""
        with self._transaction() as execute:
            rows = execute("SELECT id FROM rxt_conversations WHERE version < turn_count ORDER BY updated_at", ())
        return [row[0] for row in rows]

    # -- STM snapshots ------------------------------------------------------------------------------------------
    def get_snapshot(self, conversation_id: str, version: int) -> bytes | None:
        with self._transaction() as execute:
            rows = execute("SELECT stm FROM rxt_snapshots WHERE conversation_id = ? AND version = ?",
                           (conversation_id, version))  # fmt: skip
        return bytes(rows[0][0]) if rows else None

    def snapshot_versions(self, conversation_id: str) -> list[int]:
        with self._transaction() as execute:
            rows = execute("SELECT version FROM rxt_snapshots WHERE conversation_id = ? ORDER BY version",
                           (conversation_id,))  # fmt: skip
        return [row[0] for row in rows]

    # -- turns ----------------------------------------------------------------------------------------------------
    def record_turns(self, conversation_id: str, turn_index: int, turns: Sequence[TurnRecord]) -> None:
        """Record turns `turn_index ..` (memory pending) with their transcript items and responses, atomically.

        Raises `ConflictError` unless the conversation has exactly `turn_index` turns recorded and all of them
        applied (so the new turns were computed from its current STM)."""
        now = time.time()
        with self._transaction(write=True) as execute:
            rows = execute(f"SELECT version, turn_count, item_count FROM rxt_conversations WHERE id = ?{self.row_lock}",
                           (conversation_id,))  # fmt: skip
            if not rows:
                raise ConflictError(f"conversation {conversation_id} no longer exists.")
            version, turn_count, item_count = rows[0]
            if turn_count != turn_index or version != turn_index:
                raise ConflictError(
                    f"conversation {conversation_id} is at turn {turn_count} (memory at {version}), but this turn was "
                    f"computed from turn {turn_index}: another request wrote it first; resend."
                )
            head = None
            for offset, turn in enumerate(turns):
                index = turn_index + offset
                execute("INSERT INTO rxt_turns VALUES (?, ?, ?, ?, ?, NULL)",
                        (conversation_id, index, turn.interaction, turn.response_id, now))  # fmt: skip
                for item_id, role, text in turn.items:
                    execute("INSERT INTO rxt_items VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (item_id, conversation_id, item_count, index, role, text, turn.created_at))  # fmt: skip
                    item_count += 1
                if turn.response_id is not None:
                    execute("INSERT INTO rxt_responses VALUES (?, ?, ?, ?, ?, ?)",
                            (turn.response_id, turn.owner, conversation_id, index, now,
                             json.dumps(turn.response_body)))  # fmt: skip
                    head = turn.response_id
            execute(
                "UPDATE rxt_conversations SET turn_count = ?, item_count = ?, updated_at = ?,"
                " head_response_id = COALESCE(?, head_response_id) WHERE id = ? AND turn_count = ?",
                (turn_index + len(turns), item_count, now, head, conversation_id, turn_index),
            )

    def pending_turns(self, conversation_id: str) -> tuple[int, list[bytes]]:
        """(first pending turn index, the memory-update ids of every pending turn, in order)."""
        with self._transaction() as execute:
            rows = execute("SELECT version FROM rxt_conversations WHERE id = ?", (conversation_id,))
            if not rows:
                return 0, []
            version = rows[0][0]
            turns = execute("SELECT interaction FROM rxt_turns WHERE conversation_id = ? AND turn_index >= ? "
                            "ORDER BY turn_index", (conversation_id, version))  # fmt: skip
        return version, [bytes(row[0]) for row in turns]

    def apply_turn(self, conversation_id: str, turn_index: int, stm: bytes) -> bool:
        """Store the STM after turn `turn_index` (version `turn_index + 1`) and prune old snapshots, atomically.

        Returns False (and writes nothing) when the memory is not at `turn_index` any more — another process applied
        it first — which makes re-applying a pending turn idempotent."""
        now = time.time()
        with self._transaction(write=True) as execute:
            rows = execute(f"SELECT version, turn_count FROM rxt_conversations WHERE id = ?{self.row_lock}",
                           (conversation_id,))  # fmt: skip
            if not rows or rows[0][0] != turn_index or rows[0][1] <= turn_index:
                return False
            new_version = turn_index + 1
            execute("INSERT INTO rxt_snapshots VALUES (?, ?, ?, ?)", (conversation_id, new_version, stm, now))
            execute("UPDATE rxt_turns SET applied_at = ? WHERE conversation_id = ? AND turn_index = ?",
                    (now, conversation_id, turn_index))  # fmt: skip
            execute("UPDATE rxt_conversations SET version = ?, updated_at = ? WHERE id = ? AND version = ?",
                    (new_version, now, conversation_id, turn_index))  # fmt: skip
            execute("DELETE FROM rxt_snapshots WHERE conversation_id = ? AND version <= ?",
                    (conversation_id, new_version - self.keep_snapshots))  # fmt: skip
        return True

    # -- transcript -----------------------------------------------------------------------------------------------
    def list_items(self, conversation_id: str, after_seq: int | None = None, limit: int = 20,
                   descending: bool = False, up_to_turn: int | None = None) -> list[ItemRow]:  # fmt: skip
        where, params = ["conversation_id = ?"], [conversation_id]
        if after_seq is not None:
            where.append("seq < ?" if descending else "seq > ?")
            params.append(after_seq)
        if up_to_turn is not None:
            where.append("turn_index <= ?")
            params.append(up_to_turn)
        order = "DESC" if descending else "ASC"
        with self._transaction() as execute:
            rows = execute(f"SELECT id, conversation_id, seq, turn_index, role, content, created_at FROM rxt_items "
                           f"WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?", (*params, limit))  # fmt: skip
        return [ItemRow(*row) for row in rows]

    def get_item(self, item_id: str) -> ItemRow | None:
        with self._transaction() as execute:
            rows = execute("SELECT id, conversation_id, seq, turn_index, role, content, created_at FROM rxt_items "
                           "WHERE id = ?", (item_id,))  # fmt: skip
        return ItemRow(*rows[0]) if rows else None

    # -- responses ------------------------------------------------------------------------------------------------
    def get_response(self, response_id: str) -> tuple[str, str | None, int | None, dict] | None:
        """(owner, conversation id, turn index, body) of a stored response."""
        with self._transaction() as execute:
            rows = execute("SELECT owner, conversation_id, turn_index, body FROM rxt_responses WHERE id = ?",
                           (response_id,))  # fmt: skip
        if not rows:
            return None
        owner, conversation_id, turn_index, body = rows[0]
        return owner, conversation_id, turn_index, json.loads(body)

    def delete_response(self, response_id: str) -> bool:
        with self._transaction(write=True) as execute:
            found = execute("SELECT id FROM rxt_responses WHERE id = ?", (response_id,))
            execute("DELETE FROM rxt_responses WHERE id = ?", (response_id,))
        return bool(found)


class SQLiteStore(Store):
    """Embedded default: one file in WAL mode (readers never block the writer). One connection per thread; a write
    transaction (`BEGIN IMMEDIATE`) holds the database's write lock, which serialises the compare-and-set checks."""

    def __init__(self, path: str, keep_snapshots: int = 4):
        super().__init__(keep_snapshots)
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._schema()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # a committed turn survives power loss, not just kill -9
            connection.execute("PRAGMA busy_timeout=30000")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self, write: bool = False):
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")

        def execute(sql: str, params: tuple = ()) -> list:
            return connection.execute(sql, params).fetchall()

        try:
            yield execute
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class PostgresStore(Store):
    """PostgreSQL (psycopg 3) for several server replicas sharing conversations. A small connection pool; writes
    lock the conversation row (`SELECT ... FOR UPDATE`) so the compare-and-set checks of `record_turns` and
    `apply_turn` run serialised per conversation only."""

    blob_type = "BYTEA"
    row_lock = " FOR UPDATE"
    schema_lock = "SELECT pg_advisory_xact_lock(727270030)"

    def __init__(self, url: str, keep_snapshots: int = 4, pool_size: int = 4):
        import psycopg

        super().__init__(keep_snapshots)
        self._psycopg = psycopg
        self.url = url
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._all = []
        for _ in range(pool_size):
            connection = psycopg.connect(url, autocommit=True)
            self._pool.put(connection)
            self._all.append(connection)
        self._schema()

    @contextmanager
    def _transaction(self, write: bool = False):
        connection = self._pool.get()
        try:
            with connection.transaction(), connection.cursor() as cursor:

                def execute(sql: str, params: tuple = ()) -> list:
                    cursor.execute(sql.replace("?", "%s"), params)
                    return cursor.fetchall() if cursor.description is not None else []

                yield execute
        finally:
            if connection.broken:
                connection = self._psycopg.connect(self.url, autocommit=True)
            self._pool.put(connection)

    def close(self) -> None:
        for connection in self._all:
            connection.close()


def open_store(url: str, keep_snapshots: int = 4) -> Store:
    """`postgresql://...` (or `postgres://`) → PostgreSQL; `sqlite:///path`, or a plain file path → SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, keep_snapshots)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") :]
    elif "://" in url:
        raise ValueError(f"--db {url!r}: expected postgresql://..., sqlite:///PATH or a file path.")
    return SQLiteStore(url, keep_snapshots)

"""The manager's persistent state: one SQLite file, versioned, written atomically.

Swarmkit keeps its cluster state in a raft log; a single vxnet manager keeps the same objects
(nodes, networks, services, tasks) in SQLite with the write-ahead log and ``synchronous=FULL``,
so a manager killed at any instant reopens at its last commit.

Two tables hold everything:

* ``objects(kind, id, name, body, version)``: the cluster's records, one JSON body each, names
  unique per kind (as ``docker network create`` refuses a taken name);
* ``kv(key, value)``: singletons such as ``"ca"``, ``"tokens"``, ``"keys"`` and ``"cluster"``.

The schema is versioned: ``meta.schema_version`` counts the steps of :data:`MIGRATIONS` applied,
each step in its own transaction.  A file from a newer vxnet is refused rather than guessed at.

The file is created ``0600`` and a missing parent directory ``0700``: it holds the root CA key.
A :class:`Store` belongs to one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from vxnet.errors import Conflict, UsageError

Body = dict[str, Any]
Bodies = list[Body]

#: Schema steps: ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``.
MIGRATIONS: Final[list[tuple[str, ...]]] = [
    (
        """CREATE TABLE objects (
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            name TEXT,
            body TEXT NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (kind, id),
            UNIQUE (kind, name)
        )""",
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
]

FILE_MODE = 0o600
DIR_MODE = 0o700
BUSY_TIMEOUT_MS = 5000


def schema_version() -> int:
    """The schema version this code writes: the number of migration steps it knows."""
    return len(MIGRATIONS)


class Store:
    """The manager's state file.  Open with :meth:`open`; use as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._depth = 0
        self.path = path

    # -- lifetime -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (creating if needed) the state file at ``path`` and bring its schema up to date."""
        file = Path(path)
        _prepare_file(file)
        conn = sqlite3.connect(file, isolation_level=None)
        try:
            _configure(conn)
            _migrate(conn, file)
        except BaseException:
            conn.close()
            raise
        return cls(conn, file)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageError(f"the state store {self.path} is closed")
        return self._conn

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make every write inside the block commit together, or not at all.

        The outermost block is ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception);
        nested blocks are savepoints, so an inner failure that the caller catches undoes only the
        inner writes.
        """
        db = self._db
        begin, commit, undo = _transaction_statements(self._depth)
        db.execute(begin)
        self._depth += 1
        try:
            yield
            db.execute(commit)
        except BaseException:
            if db.in_transaction:  # SQLite may already have rolled back on its own
                for statement in undo:
                    db.execute(statement)
            raise
        finally:
            self._depth -= 1

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    # -- objects ------------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        id: str,
        name: str | None,
        body: Body,
        *,
        expected_version: int | None = None,
    ) -> int:
        """Create or replace object ``(kind, id)``; return its new version (1 when created).

        ``expected_version`` makes the write conditional, as swarmkit's "update out of sequence"
        check does: it must equal the stored version (``0`` for "must not exist yet").
        """
        _check_key("kind", kind)
        _check_key("id", id)
        if not isinstance(body, dict):
            raise UsageError(f"the body of {kind} {id} must be a dict, not {type(body).__name__}")
        text = _to_json(body, f"{kind} {id}")
        with self.transaction():
            current = self.version(kind, id) or 0
            if expected_version is not None and expected_version != current:
                raise Conflict(
                    f"{kind} {id} is at version {current}, not {expected_version}: "
                    "it changed since it was read; read it again and retry"
                )
            self._check_name_free(kind, id, name)
            self._db.execute(
                "INSERT INTO objects (kind, id, name, body, version) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, id) DO UPDATE SET "
                "name = excluded.name, body = excluded.body, version = excluded.version",
                (kind, id, name, text, current + 1),
            )
        return current + 1

    def _check_name_free(self, kind: str, id: str, name: str | None) -> None:
        owner = None if name is None else self.id_of(kind, name)
        if owner is not None and owner != id:
            raise Conflict(
                f"{kind} name {name!r} is already in use by {kind} {owner}; "
                "choose another name or remove that one first"
            )

    def get(self, kind: str, id: str) -> Body | None:
        """The body stored for ``(kind, id)``, or ``None``."""
        return self._one("SELECT body FROM objects WHERE kind = ? AND id = ?", (kind, id))

    def get_by_name(self, kind: str, name: str) -> Body | None:
        """The body of the ``kind`` object called ``name``, or ``None``."""
        return self._one("SELECT body FROM objects WHERE kind = ? AND name = ?", (kind, name))

    def id_of(self, kind: str, name: str) -> str | None:
        """The id of the ``kind`` object called ``name``, or ``None``."""
        found = self._scalar("SELECT id FROM objects WHERE kind = ? AND name = ?", (kind, name))
        return None if found is None else str(found)

    def version(self, kind: str, id: str) -> int | None:
        """The version of ``(kind, id)`` (1 after creation, +1 per put), or ``None``."""
        found = self._scalar("SELECT version FROM objects WHERE kind = ? AND id = ?", (kind, id))
        return None if found is None else int(found)

    def list(self, kind: str) -> Bodies:
        """Every body of ``kind``, ordered by id."""
        rows = self._db.execute("SELECT body FROM objects WHERE kind = ? ORDER BY id", (kind,))
        return [_from_json(row[0]) for row in rows]

    def delete(self, kind: str, id: str) -> bool:
        """Remove ``(kind, id)``; ``False`` if it was not there."""
        with self.transaction():
            cursor = self._db.execute("DELETE FROM objects WHERE kind = ? AND id = ?", (kind, id))
        return cursor.rowcount > 0

    def _one(self, sql: str, params: tuple[str, str]) -> Body | None:
        text = self._scalar(sql, params)
        return None if text is None else _from_json(text)

    def _scalar(self, sql: str, params: tuple[str, ...]) -> Any:
        row = self._db.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # -- singletons ---------------------------------------------------------------------------

    def get_value(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default``."""
        text = self._scalar("SELECT value FROM kv WHERE key = ?", (key,))
        return default if text is None else json.loads(text)

    def set_value(self, key: str, value: Any) -> None:
        """Store a JSON-able ``value`` under ``key``, replacing any previous one."""
        _check_key("key", key)
        text = _to_json(value, f"value {key!r}")
        with self.transaction():
            self._db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, text),
            )

    def delete_value(self, key: str) -> bool:
        """Remove ``key``; ``False`` if it was not there."""
        with self.transaction():
            cursor = self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        return cursor.rowcount > 0


# -- helpers ----------------------------------------------------------------------------------


def _prepare_file(file: Path) -> None:
    """Create the parent directory ``0700`` if missing and the file ``0600``."""
    missing = [p for p in (file.parent, *file.parent.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE)
        directory.chmod(DIR_MODE)
    fd = os.open(file, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise UsageError(f"the state store cannot use write-ahead logging (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")


def _migrate(conn: sqlite3.Connection, file: Path) -> None:
    """Apply the missing :data:`MIGRATIONS` steps, each step atomically with its version bump."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    current = _stored_version(conn)
    target = schema_version()
    if current > target:
        raise UsageError(
            f"the state store {file} has schema version {current}, but this vxnet only knows "
            f"versions up to {target}: upgrade vxnet, or point it at another state directory"
        )
    for step in range(current, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(step + 1),),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _stored_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _transaction_statements(depth: int) -> tuple[str, str, tuple[str, ...]]:
    """(begin, commit, undo) for a transaction block nested ``depth`` deep."""
    if depth == 0:
        return "BEGIN IMMEDIATE", "COMMIT", ("ROLLBACK",)
    sp = f"sp{depth}"
    return f"SAVEPOINT {sp}", f"RELEASE {sp}", (f"ROLLBACK TO {sp}", f"RELEASE {sp}")


def _check_key(field: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{field} must be a non-empty string, not {value!r}")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} cannot be stored: {exc}") from None


def _from_json(text: str) -> Body:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise UsageError(f"stored object is not a JSON object: {text[:60]!r}")
    return value

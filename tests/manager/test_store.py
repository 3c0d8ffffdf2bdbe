"""The manager's state file: round trips, names, transactions, crashes, schema and file modes."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from vxnet.errors import Conflict, UsageError
from vxnet.manager import store as store_module
from vxnet.manager.store import MIGRATIONS, Store, schema_version


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "manager.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as s:
        yield s


NET = {"name": "web", "subnet": "10.0.1.0/24", "vni": 4097, "labels": {"a": "b"}, "ok": True}


# -- objects ----------------------------------------------------------------------------------


def test_put_get_round_trip(store: Store) -> None:
    assert store.put("network", "n1", "web", NET) == 1
    assert store.get("network", "n1") == NET
    assert store.get_by_name("network", "web") == NET
    assert store.id_of("network", "web") == "n1"
    assert store.version("network", "n1") == 1


def test_missing_objects_are_none(store: Store) -> None:
    assert store.get("network", "nope") is None
    assert store.get_by_name("network", "nope") is None
    assert store.version("network", "nope") is None
    assert store.id_of("network", "nope") is None
    assert store.list("network") == []
    assert store.delete("network", "nope") is False


def test_put_again_bumps_version_and_may_rename(store: Store) -> None:
    store.put("network", "n1", "web", NET)
    assert store.put("network", "n1", "front", {**NET, "name": "front"}) == 2
    assert store.get_by_name("network", "web") is None
    assert store.get_by_name("network", "front") == {**NET, "name": "front"}


def test_kinds_are_separate_namespaces(store: Store) -> None:
    store.put("network", "x", "same", {"k": "network"})
    store.put("service", "x", "same", {"k": "service"})
    assert store.get("network", "x") == {"k": "network"}
    assert store.get_by_name("service", "same") == {"k": "service"}


def test_list_is_ordered_by_id_and_per_kind(store: Store) -> None:
    for node_id in ("c", "a", "b"):
        store.put("node", node_id, f"host-{node_id}", {"id": node_id})
    store.put("task", "t1", None, {"id": "t1"})
    assert [b["id"] for b in store.list("node")] == ["a", "b", "c"]


def test_delete(store: Store) -> None:
    store.put("node", "a", "host-a", {})
    assert store.delete("node", "a") is True
    assert store.get("node", "a") is None
    store.put("node", "b", "host-a", {})  # the name is free again


def test_name_taken_is_a_conflict(store: Store) -> None:
    store.put("network", "n1", "web", NET)
    with pytest.raises(Conflict, match=r"network name 'web' is already in use by network n1"):
        store.put("network", "n2", "web", NET)
    assert store.get("network", "n2") is None


def test_unnamed_objects_never_conflict(store: Store) -> None:
    store.put("task", "t1", None, {})
    store.put("task", "t2", None, {})
    assert len(store.list("task")) == 2


def test_expected_version(store: Store) -> None:
    assert store.put("service", "s", "web", {"r": 1}, expected_version=0) == 1
    assert store.put("service", "s", "web", {"r": 2}, expected_version=1) == 2
    with pytest.raises(Conflict, match="changed since it was read"):
        store.put("service", "s", "web", {"r": 3}, expected_version=1)
    assert store.get("service", "s") == {"r": 2}


@pytest.mark.parametrize("body", [{"x": {1, 2}}, {"x": float("nan")}, {"x": object()}])
def test_non_json_body_is_refused(store: Store, body: dict[str, object]) -> None:
    with pytest.raises(UsageError, match="cannot be stored"):
        store.put("node", "a", "a", body)
    assert store.get("node", "a") is None


def test_body_must_be_a_dict(store: Store) -> None:
    with pytest.raises(UsageError, match="must be a dict"):
        store.put("node", "a", "a", [1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "id"), [("", "a"), ("node", "")])
def test_empty_keys_are_refused(store: Store, kind: str, id: str) -> None:
    with pytest.raises(UsageError, match="non-empty"):
        store.put(kind, id, None, {})


# -- singletons -------------------------------------------------------------------------------


def test_values_round_trip(store: Store) -> None:
    assert store.get_value("ca") is None
    assert store.get_value("ca", {}) == {}
    store.set_value("tokens", {"worker": "SWMTKN-1-a-b", "manager": "SWMTKN-1-a-c"})
    store.set_value("keys", [[1, "k1"], [2, "k2"]])
    store.set_value("cluster", "c1")
    store.set_value("cluster", "c2")
    assert store.get_value("tokens")["worker"] == "SWMTKN-1-a-b"
    assert store.get_value("keys") == [[1, "k1"], [2, "k2"]]
    assert store.get_value("cluster") == "c2"
    assert store.delete_value("cluster") is True
    assert store.delete_value("cluster") is False
    assert store.get_value("cluster") is None


# -- transactions -----------------------------------------------------------------------------


def test_transaction_commits_together(store: Store, db_path: Path) -> None:
    with store.transaction():
        store.put("network", "n1", "web", NET)
        store.set_value("cluster", "c1")
        # Nothing is visible to another connection until the block ends.
        with Store.open(db_path) as other:
            assert other.get("network", "n1") is None
            assert other.get_value("cluster") is None
    with Store.open(db_path) as other:
        assert other.get("network", "n1") == NET
        assert other.get_value("cluster") == "c1"


def test_transaction_rolls_back_on_exception(store: Store) -> None:
    store.put("node", "a", "host-a", {"v": 1})
    with pytest.raises(RuntimeError), store.transaction():
        store.put("node", "a", "host-a", {"v": 2})
        store.put("node", "b", "host-b", {})
        store.set_value("cluster", "c1")
        store.delete("node", "a")
        raise RuntimeError("boom")
    assert store.get("node", "a") == {"v": 1}
    assert store.version("node", "a") == 1
    assert store.get("node", "b") is None
    assert store.get_value("cluster") is None
    assert not store.in_transaction


def test_conflict_inside_transaction_rolls_back_everything(store: Store) -> None:
    store.put("network", "n1", "web", NET)
    with pytest.raises(Conflict), store.transaction():
        store.put("network", "n2", "api", NET)
        store.put("network", "n3", "web", NET)
    assert store.get("network", "n2") is None


def test_nested_transaction_undoes_only_the_inner_block(store: Store) -> None:
    with store.transaction():
        store.put("node", "a", "host-a", {})
        with pytest.raises(Conflict), store.transaction():
            store.put("node", "b", "host-b", {})
            store.put("node", "c", "host-a", {})
        store.put("node", "d", "host-d", {})
    assert store.list("node") == [{}, {}]
    assert store.get("node", "b") is None
    assert store.get("node", "d") == {}


def test_writes_are_usable_after_a_failed_transaction(store: Store) -> None:
    with pytest.raises(KeyError), store.transaction():
        store.put("node", "a", "host-a", {})
        raise KeyError("x")
    store.put("node", "a", "host-a", {"again": True})
    assert store.get("node", "a") == {"again": True}


# -- durability -------------------------------------------------------------------------------


def test_reopen_keeps_everything(db_path: Path) -> None:
    with Store.open(db_path) as s:
        s.put("network", "n1", "web", NET)
        s.put("network", "n1", "web", {**NET, "vni": 4098})
        s.set_value("ca", {"cert": "PEM"})
    with Store.open(db_path) as s:
        assert s.get("network", "n1") == {**NET, "vni": 4098}
        assert s.version("network", "n1") == 2
        assert s.get_value("ca") == {"cert": "PEM"}


def test_closed_store_says_so(db_path: Path) -> None:
    s = Store.open(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        s.get("node", "a")


def test_journal_mode_and_synchronous(store: Store, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


CHILD = textwrap.dedent(
    """
    import os, sys
    from vxnet.manager.store import Store
    s = Store.open(sys.argv[1])
    with s.transaction():
        s.put("node", "a", "host-a", {"v": 2})
        s.put("node", "b", "host-b", {})
        s.set_value("cluster", "half-written")
        if sys.argv[2] == "exit":
            os._exit(1)
        print("ready", flush=True)
        sys.stdin.read()
    """
)


def _prime(db_path: Path) -> None:
    with Store.open(db_path) as s:
        s.put("node", "a", "host-a", {"v": 1})
        s.set_value("cluster", "c1")


def _assert_previous_commit(db_path: Path) -> None:
    with Store.open(db_path) as s:
        assert s.get("node", "a") == {"v": 1}
        assert s.get("node", "b") is None
        assert s.get_value("cluster") == "c1"
        s.put("node", "b", "host-b", {"after": "crash"})  # and it is writable again


def test_crash_mid_transaction_exit(db_path: Path) -> None:
    _prime(db_path)
    run = subprocess.run([sys.executable, "-c", CHILD, str(db_path), "exit"], check=False)
    assert run.returncode == 1
    _assert_previous_commit(db_path)


def test_crash_mid_transaction_sigkill(db_path: Path) -> None:
    _prime(db_path)
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path), "kill"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    _assert_previous_commit(db_path)


def test_commit_survives_a_crash_right_after(db_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from vxnet.manager.store import Store\n"
        "s = Store.open(sys.argv[1])\n"
        "s.put('node', 'a', 'host-a', {'v': 7})\n"
        "os._exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(db_path)], check=False).returncode == 3
    with Store.open(db_path) as s:
        assert s.get("node", "a") == {"v": 7}


# -- schema -----------------------------------------------------------------------------------


def _stored_version(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0])
    finally:
        conn.close()


def test_new_file_is_at_current_schema(store: Store, db_path: Path) -> None:
    assert schema_version() == len(MIGRATIONS) >= 1
    assert _stored_version(db_path) == schema_version()


def test_schema_too_new_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(99),))
    conn.close()
    with pytest.raises(UsageError, match=r"schema version 99.*upgrade vxnet"):
        Store.open(db_path)


def test_migrations_apply_in_order_and_keep_data(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(db_path) as s:
        s.put("node", "a", "host-a", {"v": 1})
    step = ("CREATE TABLE extra (x INTEGER)", "INSERT INTO extra VALUES (42)")
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, step])
    with Store.open(db_path) as s:
        assert s.get("node", "a") == {"v": 1}
        assert s._db.execute("SELECT x FROM extra").fetchall() == [(42,)]
    assert _stored_version(db_path) == len(MIGRATIONS) + 1


def test_failed_migration_leaves_the_previous_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.open(db_path).close()
    step = ("CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL")
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, step])
    with pytest.raises(sqlite3.OperationalError):
        Store.open(db_path)
    assert _stored_version(db_path) == len(MIGRATIONS)
    conn = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert "extra" not in tables


# -- file modes -------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_and_directory_modes(db_path: Path) -> None:
    old = os.umask(0)
    try:
        with Store.open(db_path) as s:
            s.put("node", "a", "host-a", {})
            assert _mode(db_path) == 0o600
            assert _mode(db_path.parent) == 0o700
            for side in ("-wal", "-shm"):  # SQLite gives its side files the database's mode
                assert _mode(db_path.with_name(db_path.name + side)) == 0o600, side
    finally:
        os.umask(old)


def test_existing_loose_file_is_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "manager.db"
    path.touch()
    path.chmod(0o644)
    Store.open(path).close()
    assert _mode(path) == 0o600
    assert _mode(tmp_path) == 0o755  # a directory it did not create is left as it is

"""The manager's cluster state machine: init, join tokens, node certificates, heartbeats, reopen."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.manager import pki, tokens
from vxnet.manager.cluster import HEARTBEAT_GRACE, HEARTBEAT_PERIOD, Cluster, parse_duration
from vxnet.manager.keys import GOSSIP, IPSEC, KEYRING_SIZE, SUBSYSTEMS
from vxnet.manager.store import Store

NOW = 1_700_000_000.0
MANAGER_ADDR = "192.168.50.1"
# One CSR serves every node: only its public key matters, the CA fills in the subject.
CSR = pki.make_csr(pki.new_node_key())
TOKEN_RE = re.compile(r"^SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}$")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "m.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as s:
        yield s


def initialize(store: Store, seed: int = 1, **kw: Any) -> Cluster:
    return Cluster.initialize(
        store,
        random.Random(seed),
        NOW,
        hostname="mgr",
        advertise_addr=MANAGER_ADDR,
        data_path_addr=MANAGER_ADDR,
        **kw,
    )


@pytest.fixture
def cluster(store: Store) -> Cluster:
    return initialize(store)


def dt(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


def worker(cluster: Cluster, n: int, now: float = NOW) -> str:
    """A worker that joined and said hello (so it is ready); returns its node id."""
    addr = f"192.168.50.{10 + n}"
    issued = cluster.join(cluster.token("worker"), CSR, f"w{n}", addr, addr, now)
    cluster.hello(issued.node_id, now, {})
    return issued.node_id


# ---------------------------------------------------------------------------------- init


def test_initialize_stores_identity_ca_tokens_and_keys(cluster: Cluster, store: Store) -> None:
    assert re.fullmatch(r"[0-9a-z]{25}", cluster.cluster_id)
    info = store.get_value("cluster")
    assert info["id"] == cluster.cluster_id
    assert info["default_addr_pool"] == ["10.0.0.0/8"]
    assert info["default_addr_pool_mask_length"] == 24
    assert info["data_path_port"] == 4789
    assert cluster.heartbeat_period == HEARTBEAT_PERIOD
    assert store.get_value("ca")["cert"].encode() == cluster.ca_pem
    assert b"BEGIN CERTIFICATE" in cluster.ca_pem
    assert set(store.get_value("tokens")) == {"worker", "manager"}
    for subsystem in SUBSYSTEMS:
        assert len(cluster.keys.keys_for(subsystem)) == KEYRING_SIZE
    assert len(cluster.keys_json()) == KEYRING_SIZE * len(SUBSYSTEMS)
    assert cluster.keys.next_deadline() == NOW + 12 * 3600
    assert cluster.cert_lifetime == timedelta(days=90)


def test_second_initialize_is_refused_and_changes_nothing(cluster: Cluster, store: Store) -> None:
    before = {k: store.get_value(k) for k in ("cluster", "ca", "tokens", "keys")}
    with pytest.raises(Conflict, match="already part of a swarm"):
        initialize(store, seed=2)
    assert {k: store.get_value(k) for k in before} == before


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"data_port": 1023}, "data-path-port"),
        ({"data_port": 49152}, "data-path-port"),
        ({"pools": ("10.0.0.0/8", "10.1.0.0/16")}, "overlap"),
        ({"pools": ("10.0.0.0/16",), "mask_length": 8}, "cannot be split"),
        ({"pools": ("10.0.0.0/8",), "mask_length": 30}, "out of range"),
        ({"rotation_interval": 0.5}, "rotation interval"),
        ({"underlay_mtu": 1279}, "underlay-mtu must be 1280-9000"),
        ({"underlay_mtu": 9001}, "underlay-mtu must be 1280-9000"),
    ],
)
def test_initialize_refuses_bad_settings_and_stores_nothing(
    store: Store, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        initialize(store, **kw)
    assert store.get_value("cluster") is None
    assert store.get_value("ca") is None


def test_initialize_accepts_custom_data_port_and_pools(store: Store) -> None:
    cluster = initialize(store, data_port=7777, pools=("10.20.0.0/16",), mask_length=26)
    assert cluster.info["data_path_port"] == 7777
    assert cluster.info["default_addr_pool"] == ["10.20.0.0/16"]
    assert cluster.info["default_addr_pool_mask_length"] == 26


def test_the_underlay_mtu_is_kept_with_the_cluster(store: Store) -> None:
    initialize(store, underlay_mtu=9000)
    assert Cluster(store, random.Random(2)).underlay_mtu == 9000  # read back from the store


def test_the_underlay_mtu_defaults_to_1500(store: Store) -> None:
    assert initialize(store).underlay_mtu == 1500


def test_cluster_over_an_empty_store_is_refused(store: Store) -> None:
    with pytest.raises(UsageError, match="swarm init"):
        Cluster(store, random.Random(1))


# -------------------------------------------------------------------------------- tokens


def test_tokens_have_docker_format_and_name_this_ca(cluster: Cluster) -> None:
    worker_token, manager_token = cluster.token("worker"), cluster.token("manager")
    assert TOKEN_RE.match(worker_token)
    assert TOKEN_RE.match(manager_token)
    assert worker_token != manager_token
    # Same CA digest, different secrets.
    assert worker_token.split("-")[2] == manager_token.split("-")[2]
    assert worker_token.split("-")[3] != manager_token.split("-")[3]
    for token in (worker_token, manager_token):
        tokens.verify_ca(cluster.ca_pem, token)
        assert tokens.parse_token(token).ca_digest == pki.ca_digest(cluster.ca_pem)
    other = pki.create_root_ca(dt(NOW))
    with pytest.raises(tokens.TokenRefused):
        tokens.verify_ca(other.cert_pem, worker_token)


def test_token_for_unknown_role_is_refused(cluster: Cluster) -> None:
    with pytest.raises(UsageError, match="worker or manager"):
        cluster.token("admin")
    with pytest.raises(UsageError, match="worker or manager"):
        cluster.rotate_token("admin")


def test_role_for_token(cluster: Cluster) -> None:
    assert cluster.role_for_token(cluster.token("worker")) == "worker"
    assert cluster.role_for_token(cluster.token("manager")) == "manager"


def test_token_with_surrounding_whitespace_is_the_same_token(cluster: Cluster) -> None:
    """parse_token accepts a pasted token with blanks around it; matching must agree with it."""
    assert cluster.role_for_token(f"  {cluster.token('worker')}\n") == "worker"
    assert cluster.role_for_token(f"{cluster.token('manager')} ") == "manager"


def test_join_gives_the_token_role(cluster: Cluster, store: Store) -> None:
    w = cluster.join(cluster.token("worker"), CSR, "w1", "192.168.50.11", "10.9.0.11", NOW)
    m = cluster.join(cluster.token("manager"), CSR, "m2", "192.168.50.12", "10.9.0.12", NOW)
    assert (w.role, m.role) == ("worker", "manager")
    assert w.cluster_id == m.cluster_id == cluster.cluster_id
    assert w.ca_pem == cluster.ca_pem
    assert w.node_id != m.node_id
    node = store.get("node", w.node_id)
    assert node is not None
    assert node["hostname"] == "w1"
    assert node["addr"] == "192.168.50.11"
    assert node["data_path_addr"] == "10.9.0.11"
    assert node["status"] == "unknown"
    assert node["availability"] == "active"
    # The first manager leads; a later one is only reachable (no Raft).
    assert cluster.node(m.node_id)["manager_status"] == "Leader"
    third = cluster.join(cluster.token("manager"), CSR, "m3", "192.168.50.13", "10.9.0.13", NOW)
    assert cluster.node(third.node_id)["manager_status"].startswith("Reachable")
    assert cluster.node(w.node_id)["manager_status"] == ""
    assert {n["hostname"] for n in cluster.managers()} == {"m2", "m3"}


def _join(cluster: Cluster, token: str) -> None:
    cluster.join(token, CSR, "intruder", "192.168.50.66", "192.168.50.66", NOW)


def test_join_with_wrong_secret_is_refused(cluster: Cluster, store: Store) -> None:
    wrong = tokens.make_token(cluster.ca_pem, bytes(16))
    with pytest.raises(tokens.TokenRefused, match="does not match"):
        _join(cluster, wrong)
    assert store.list("node") == []


def test_token_built_for_another_ca_is_refused(cluster: Cluster, store: Store) -> None:
    """The right secret with another CA's digest is still refused: the whole token counts."""
    secret = tokens.parse_token(cluster.token("worker")).secret
    other = pki.create_root_ca(dt(NOW))
    forged = tokens.make_token(other.cert_pem, secret)
    with pytest.raises(tokens.TokenRefused):
        _join(cluster, forged)
    assert store.list("node") == []


@pytest.mark.parametrize(
    "token",
    [
        "",
        "SWMTKN-1-abc",
        "SWMTKN-2-" + "0" * 50 + "-" + "0" * 25,
        "XWMTKN-1-" + "0" * 50 + "-" + "0" * 25,
        "SWMTKN-1-" + "0" * 49 + "-" + "0" * 25,
        "SWMTKN-1-" + "0" * 50 + "-" + "A" * 25,
    ],
)
def test_malformed_token_is_a_usage_error(cluster: Cluster, store: Store, token: str) -> None:
    with pytest.raises(UsageError, match="invalid join token"):
        _join(cluster, token)
    assert store.list("node") == []


def test_rotated_token_refuses_the_old_one(cluster: Cluster, db_path: Path) -> None:
    old_worker, manager_token = cluster.token("worker"), cluster.token("manager")
    new_worker = cluster.rotate_token("worker")
    assert new_worker != old_worker
    assert TOKEN_RE.match(new_worker)
    assert new_worker.split("-")[2] == old_worker.split("-")[2]  # same CA
    assert cluster.token("worker") == new_worker
    assert cluster.token("manager") == manager_token  # the other role keeps its token
    with pytest.raises(tokens.TokenRefused, match="rotated"):
        cluster.role_for_token(old_worker)
    assert cluster.role_for_token(new_worker) == "worker"
    assert cluster.role_for_token(manager_token) == "manager"
    with Store.open(db_path) as again:  # the rotation is persistent
        assert Cluster(again, random.Random(9)).token("worker") == new_worker


# --------------------------------------------------------------------------- certificates


def _subject(cert_pem: bytes) -> dict[str, str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    oids = {
        "CN": NameOID.COMMON_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "O": NameOID.ORGANIZATION_NAME,
    }
    return {k: str(cert.subject.get_attributes_for_oid(o)[0].value) for k, o in oids.items()}


def _lifetime(cert_pem: bytes) -> timedelta:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_after_utc - cert.not_valid_before_utc


@pytest.mark.parametrize(("role", "ou"), [("worker", "swarm-worker"), ("manager", "swarm-manager")])
def test_issued_certificate_names_node_role_and_cluster(
    cluster: Cluster, role: str, ou: str
) -> None:
    issued = cluster.issue(role, CSR, "n1", "192.168.50.20", "192.168.50.20", NOW)
    identity = pki.verify_node_cert(
        cluster.ca_pem, issued.cert_pem, dt(NOW + 60), cluster.cluster_id
    )
    assert identity.node_id == issued.node_id
    assert identity.role == ou
    assert identity.cluster_id == cluster.cluster_id
    assert _subject(issued.cert_pem) == {"CN": issued.node_id, "OU": ou, "O": cluster.cluster_id}
    assert identity.not_after == dt(NOW) + timedelta(days=90)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.168.50.20"]


def test_certificate_of_another_cluster_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    with Store.open(tmp_path / "other.db") as other_store:
        other = initialize(other_store, seed=2)
        foreign = other.issue("worker", CSR, "x", "192.168.60.1", "192.168.60.1", NOW)
    with pytest.raises(pki.CertificateRefused):
        pki.verify_node_cert(cluster.ca_pem, foreign.cert_pem, dt(NOW + 60))
    with pytest.raises(pki.CertificateRefused, match="belongs to cluster"):
        pki.verify_node_cert(foreign.ca_pem, foreign.cert_pem, dt(NOW + 60), cluster.cluster_id)


def test_configured_certificate_lifetime(cluster: Cluster, store: Store, db_path: Path) -> None:
    cluster.info["node_cert_lifetime"] = 7200.0
    store.set_value("cluster", cluster.info)
    assert cluster.cert_lifetime == timedelta(hours=2)
    issued = cluster.issue("worker", CSR, "w1", "192.168.50.11", "192.168.50.11", NOW)
    assert _lifetime(issued.cert_pem) == timedelta(hours=2) + pki.CERT_BACKDATE
    pki.verify_node_cert(cluster.ca_pem, issued.cert_pem, dt(NOW + 7199), cluster.cluster_id)
    with pytest.raises(pki.CertificateRefused, match="expired"):
        pki.verify_node_cert(cluster.ca_pem, issued.cert_pem, dt(NOW + 7201))
    # A manager reopened from the store keeps the setting, and renewals use it too.
    with Store.open(db_path) as again:
        reopened = Cluster(again, random.Random(3))
        assert reopened.cert_lifetime == timedelta(hours=2)
        renewed = reopened.renew(issued.node_id, CSR, NOW + 3600)
    assert _lifetime(renewed) == timedelta(hours=2) + pki.CERT_BACKDATE


def test_renew_keeps_identity_and_starts_a_new_lifetime(cluster: Cluster) -> None:
    issued = cluster.issue("manager", CSR, "m1", "192.168.50.2", "192.168.50.2", NOW)
    later = NOW + 50 * 86400
    renewed = cluster.renew(issued.node_id, CSR, later)
    identity = pki.verify_node_cert(cluster.ca_pem, renewed, dt(later), cluster.cluster_id)
    assert (identity.node_id, identity.role) == (issued.node_id, "swarm-manager")
    assert identity.not_after == dt(later) + timedelta(days=90)
    with pytest.raises(NotFound):
        cluster.renew("nosuchnode", CSR, later)


def test_garbage_csr_is_refused_and_registers_nobody(cluster: Cluster, store: Store) -> None:
    with pytest.raises(pki.CertificateRefused):
        cluster.join(cluster.token("worker"), b"not a csr", "w", "10.1.1.1", "10.1.1.1", NOW)
    # The node record is written after signing, so nothing is left behind.
    assert store.list("node") == []


# ----------------------------------------------------------------------------- heartbeats


def test_hello_makes_a_node_ready(cluster: Cluster) -> None:
    issued = cluster.issue("worker", CSR, "w1", "192.168.50.11", "192.168.50.11", NOW)
    assert cluster.node(issued.node_id)["status"] == "unknown"
    node = cluster.hello(issued.node_id, NOW + 1, {"data_path_addr": "10.9.9.9"})
    assert node["status"] == "ready"
    assert cluster.node(issued.node_id)["data_path_addr"] == "10.9.9.9"
    assert cluster.node(issued.node_id)["last_seen"] == NOW + 1


def test_node_goes_down_after_missed_heartbeats_and_comes_back(cluster: Cluster) -> None:
    a, b = worker(cluster, 1), worker(cluster, 2)
    limit = HEARTBEAT_PERIOD * HEARTBEAT_GRACE
    t = NOW
    for _ in range(10):  # b keeps beating, a falls silent
        t += HEARTBEAT_PERIOD
        assert cluster.heartbeat(b, t) is False
        expired = cluster.expire_heartbeats(t)
        if t - NOW <= limit:
            assert expired == []
            assert cluster.node(a)["status"] == "ready"
        elif t - NOW == limit + HEARTBEAT_PERIOD:
            assert expired == [a]
        else:
            assert expired == []  # reported once, not on every check
    assert cluster.node(a)["status"] == "down"
    assert cluster.node(b)["status"] == "ready"
    assert cluster.heartbeat(a, t) is True  # revived
    assert cluster.node(a)["status"] == "ready"
    assert cluster.heartbeat(a, t + 1) is False
    assert cluster.expire_heartbeats(t + limit) == []


def test_expiry_boundary_is_strictly_after_period_times_grace(cluster: Cluster) -> None:
    a = worker(cluster, 1)
    limit = HEARTBEAT_PERIOD * HEARTBEAT_GRACE
    assert cluster.expire_heartbeats(NOW + limit) == []
    assert cluster.expire_heartbeats(NOW + limit + 0.001) == [a]


def test_heartbeat_period_comes_from_the_cluster_info(cluster: Cluster, store: Store) -> None:
    cluster.info["heartbeat_period"] = 5.0
    store.set_value("cluster", cluster.info)
    a = worker(cluster, 1)
    assert cluster.expire_heartbeats(NOW + 15) == []
    assert cluster.expire_heartbeats(NOW + 15.5) == [a]


def test_mark_down_and_remove_node(cluster: Cluster) -> None:
    mgr = cluster.issue("manager", CSR, "mgr", MANAGER_ADDR, MANAGER_ADDR, NOW)
    cluster.hello(mgr.node_id, NOW, {})
    a = worker(cluster, 1)
    with pytest.raises(Conflict, match="not down"):
        cluster.remove_node("w1")
    cluster.mark_down(a)
    assert cluster.node(a)["status"] == "down"
    assert cluster.remove_node(a[:6]) == a  # an id prefix works
    with pytest.raises(NotFound):
        cluster.node(a)
    with pytest.raises(Conflict, match="cannot remove itself"):
        cluster.remove_node("mgr", force=True)
    b = worker(cluster, 2)
    assert cluster.remove_node("w2", force=True) == b
    with pytest.raises(NotFound):
        cluster.find_node("w2")


def test_heartbeat_from_unknown_node_is_not_found(cluster: Cluster) -> None:
    with pytest.raises(NotFound):
        cluster.heartbeat("ghost", NOW)
    with pytest.raises(NotFound):
        cluster.hello("ghost", NOW, {})


def test_nodes_sorted_by_hostname(cluster: Cluster) -> None:
    for n in (3, 1, 2):
        worker(cluster, n)
    assert [n["hostname"] for n in cluster.nodes()] == ["w1", "w2", "w3"]


# ------------------------------------------------------------------------------------ keys


def test_key_rotation_is_due_after_the_interval_and_persists(
    cluster: Cluster, db_path: Path
) -> None:
    before = [k.tag for k in cluster.keys.keys_for(IPSEC)]
    assert cluster.rotate_keys_if_due(NOW + 12 * 3600 - 1) is False
    assert cluster.rotate_keys_if_due(NOW + 12 * 3600) is True
    after = [k.tag for k in cluster.keys.keys_for(IPSEC)]
    assert after[:2] == before[1:]
    assert after[2] > before[2]
    with Store.open(db_path) as again:
        assert [k.tag for k in Cluster(again, random.Random(5)).keys.keys_for(IPSEC)] == after


def test_set_rotation_interval(cluster: Cluster) -> None:
    cluster.set_rotation_interval(60.0, NOW + 10)
    assert cluster.keys.next_deadline() == NOW + 60
    assert cluster.rotate_keys_if_due(NOW + 59) is False
    assert cluster.rotate_keys_if_due(NOW + 60) is True
    assert cluster.keys.next_deadline() == NOW + 120


# ------------------------------------------------------------------------------------ reopen


def test_reopening_the_store_keeps_everything(
    cluster: Cluster, store: Store, db_path: Path
) -> None:
    a = worker(cluster, 1)
    cluster.join(cluster.token("manager"), CSR, "m2", "192.168.50.2", "192.168.50.2", NOW)
    cluster.rotate_token("manager")
    cluster.rotate_keys_if_due(NOW + 12 * 3600)
    cluster_id, ca_pem = cluster.cluster_id, cluster.ca_pem
    token_pair = (cluster.token("worker"), cluster.token("manager"))
    nodes, keys = cluster.nodes(), cluster.keys_json()
    deadline, lamport = cluster.keys.next_deadline(), cluster.keys.lamport_clock
    store.close()
    with Store.open(db_path) as again:
        reopened = Cluster(again, random.Random(77))
        assert reopened.cluster_id == cluster_id
        assert reopened.ca_pem == ca_pem
        assert (reopened.token("worker"), reopened.token("manager")) == token_pair
        assert reopened.nodes() == nodes
        assert reopened.keys_json() == keys
        assert reopened.keys.next_deadline() == deadline
        assert reopened.keys.lamport_clock == lamport
        for subsystem in (GOSSIP, IPSEC):
            assert len(reopened.keys.keys_for(subsystem)) == KEYRING_SIZE
        # It still works as the same swarm: joins, certificates, heartbeats.
        assert reopened.role_for_token(token_pair[0]) == "worker"
        issued = reopened.join(token_pair[0], CSR, "w9", "10.1.1.9", "10.1.1.9", NOW)
        pki.verify_node_cert(ca_pem, issued.cert_pem, dt(NOW), cluster_id)
        assert reopened.expire_heartbeats(NOW + 10) == [a]
        # The next rotation continues the Lamport clock instead of reusing a tag.
        reopened.rotate_keys_if_due(NOW + 24 * 3600)
        tags = [k.tag for k in reopened.keys.keys]
        assert len(set(tags)) == len(tags)
        assert min(tags) > lamport - 2 * KEYRING_SIZE
        assert max(tags) == lamport + len(SUBSYSTEMS)


# -------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12h", 43200.0),
        ("90m", 5400.0),
        ("2s", 2.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2160h", 90 * 86400.0),
        ("1d", 86400.0),
        ("1h1m1s", 3661.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", " ", "5", "1x", "-1s", "h", "1h 30m", "1h30", "s1", "1..5s", "1s-", "+1s", "1H"]
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="duration"):
        parse_duration(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h", "d"])),
        min_size=1,
        max_size=5,
    )
)
def test_parse_duration_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert parse_duration(text) == pytest.approx(sum(n * units[u] for n, u in parts))

"""The swarm's state machine on the manager: identity, nodes, tokens, keys.  Sans-IO.

Everything here reads and writes the :class:`~vxnet.manager.store.Store` and takes ``now`` (wall
clock seconds) and a ``random.Random`` as arguments, so a test drives twelve hours of key
rotations and heartbeats in milliseconds.  Networks and services live in their own modules and
work on the same :class:`Cluster`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from vxnet.dataplane.tables import DEFAULT_UNDERLAY_MTU, MAX_UNDERLAY_MTU, MIN_UNDERLAY_MTU
from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.esp.sa import DEFAULT_ICV_LEN, DOCKER_ICV_LEN
from vxnet.manager import pki, tokens
from vxnet.manager.keys import DEFAULT_ROTATION, KeyManager
from vxnet.manager.store import Store

HEARTBEAT_PERIOD = 1.0  # seconds between a node's heartbeats (swarmkit: 5 s)
HEARTBEAT_GRACE = 3  # missed periods before a node is shown down
ROLE_CERT: dict[str, pki.Role] = {"worker": "swarm-worker", "manager": "swarm-manager"}

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``12h``, ``90m``, ``2s``, ``1h30m`` -> seconds (Go's duration syntax, the common part)."""
    total, rest = 0.0, text.strip()
    if not rest:
        raise UsageError("empty duration: use e.g. 12h, 30m, 2s")
    for part in re.findall(r"\d+(?:\.\d+)?(?:ms|s|m|h|d)", rest):
        m = _DURATION_RE.match(part)
        assert m is not None
        total += float(m.group(1)) * _UNITS[m.group(2)]
    if "".join(re.findall(r"\d+(?:\.\d+)?(?:ms|s|m|h|d)", rest)) != rest:
        raise UsageError(f"invalid duration {text!r}: use e.g. 12h, 30m, 2s, 1h30m")
    return total


def new_id(rng: random.Random, length: int = 25) -> str:
    """Swarmkit-style object id: lowercase base36."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(rng.choice(alphabet) for _ in range(length))


def _dt(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


@dataclass(frozen=True, slots=True)
class Issued:
    """What a node receives when it joins (or when the manager creates itself)."""

    node_id: str
    role: str
    cluster_id: str
    cert_pem: bytes
    ca_pem: bytes


class Cluster:
    """The manager's view of the swarm, over its persistent store."""

    def __init__(self, store: Store, rng: random.Random) -> None:
        self.store = store
        self.rng = rng
        info = store.get_value("cluster")
        if info is None:
            raise UsageError("this store holds no swarm: run `vxnet swarm init`")
        self.info: dict[str, Any] = info
        ca = store.get_value("ca")
        self.ca = pki.RootCA(ca["cert"].encode(), ca["key"].encode())
        self.keys = KeyManager.from_json(rng, store.get_value("keys"))

    # --------------------------------------------------------------------------- init

    @classmethod
    def initialize(
        cls,
        store: Store,
        rng: random.Random,
        now: float,
        *,
        hostname: str,
        advertise_addr: str,
        data_path_addr: str,
        data_port: int = 4789,
        pools: tuple[str, ...] = ("10.0.0.0/8",),
        mask_length: int = 24,
        rotation_interval: float = DEFAULT_ROTATION,
        esp_icv_length: int = DEFAULT_ICV_LEN,
        underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
    ) -> Cluster:
        """``swarm init``: a new cluster id, root CA, tokens and keyrings, all stored at once."""
        from vxnet.manager.ipam import AddressPools

        if store.get_value("cluster") is not None:
            raise Conflict("this node is already part of a swarm")
        AddressPools.from_text(pools, mask_length)  # validates
        if not (data_port == 4789 or 1024 <= data_port <= 49151):
            raise UsageError("--data-path-port must be 4789 or within 1024-49151")
        if esp_icv_length not in (DOCKER_ICV_LEN, DEFAULT_ICV_LEN):
            raise UsageError("--esp-icv-length must be 8 (as Docker) or 16 (vxnet's default)")
        if not MIN_UNDERLAY_MTU <= underlay_mtu <= MAX_UNDERLAY_MTU:
            raise UsageError(
                f"--underlay-mtu must be {MIN_UNDERLAY_MTU}-{MAX_UNDERLAY_MTU} (9000: jumbo frames)"
            )
        keys = KeyManager(rng, now, interval=rotation_interval)
        ca = pki.create_root_ca(_dt(now))
        info = {
            "id": new_id(rng),
            "created": now,
            "default_addr_pool": list(pools),
            "default_addr_pool_mask_length": mask_length,
            "data_path_port": data_port,
            "heartbeat_period": HEARTBEAT_PERIOD,
            # cluster-wide: Docker's SPI does not include the ICV length, so every SA between
            # two nodes must agree on it; fixed at init, like the data-path port
            "esp_icv_length": esp_icv_length,
            # what every node's underlay carries unfragmented: the ceiling of network MTUs
            "underlay_mtu": underlay_mtu,
        }
        with store.transaction():
            store.set_value("cluster", info)
            store.set_value(
                "ca", {"cert": ca.cert_pem.decode(), "key": (ca.key_pem or b"").decode()}
            )
            store.set_value("keys", keys.to_json())
            store.set_value(
                "tokens",
                {
                    role: tokens.make_token(ca.cert_pem, tokens.new_secret(rng))
                    for role in ROLE_CERT
                },
            )
        return cls(store, rng)

    @property
    def cluster_id(self) -> str:
        return str(self.info["id"])

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    @property
    def esp_icv_length(self) -> int:
        """The ICV length of every ESP SA in this swarm (16 unless `swarm init` said 8)."""
        return int(self.info.get("esp_icv_length", DEFAULT_ICV_LEN))

    @property
    def underlay_mtu(self) -> int:
        """The MTU of every node's underlay (1500 unless `swarm init --underlay-mtu` said)."""
        return int(self.info.get("underlay_mtu", DEFAULT_UNDERLAY_MTU))

    @property
    def cert_lifetime(self) -> timedelta:
        return timedelta(seconds=float(self.info.get("node_cert_lifetime", 90 * 86400)))

    @property
    def heartbeat_period(self) -> float:
        return float(self.info.get("heartbeat_period", HEARTBEAT_PERIOD))

    # --------------------------------------------------------------------------- tokens

    def token(self, role: str) -> str:
        if role not in ROLE_CERT:
            raise UsageError("role must be worker or manager")
        return str(self.store.get_value("tokens")[role])

    def rotate_token(self, role: str) -> str:
        current = dict(self.store.get_value("tokens"))
        self.token(role)
        current[role] = tokens.make_token(self.ca_pem, tokens.new_secret(self.rng))
        self.store.set_value("tokens", current)
        return str(current[role])

    def role_for_token(self, presented: str) -> str:
        """The role a join token grants; TokenRefused for anything else (constant time)."""
        tokens.parse_token(presented)  # a malformed token gets a precise UsageError
        presented = presented.strip()  # as parse_token reads it
        matched = None
        for role, expected in self.store.get_value("tokens").items():
            if tokens.token_matches(presented, expected):
                matched = role
        if matched is None:
            raise tokens.TokenRefused(
                "invalid join token: it does not match this swarm's current worker or manager "
                "token (was it rotated?); get one with `vxnet swarm join-token worker`"
            )
        return str(matched)

    # ---------------------------------------------------------------------------- nodes

    def issue(
        self,
        role: str,
        csr_pem: bytes,
        hostname: str,
        advertise_addr: str,
        data_path_addr: str,
        now: float,
    ) -> Issued:
        """Register a node and sign its certificate (CN node id, OU role, O cluster id)."""
        node_id = new_id(self.rng)
        cert = pki.sign_node_cert(
            self.ca,
            csr_pem,
            node_id,
            ROLE_CERT[role],
            self.cluster_id,
            _dt(now),
            self.cert_lifetime,
            san_ips=[advertise_addr],
        )
        node = {
            "id": node_id,
            "hostname": hostname,
            "role": role,
            "availability": "active",
            "status": "unknown",
            "addr": advertise_addr,
            "data_path_addr": data_path_addr,
            "manager_status": "Leader" if role == "manager" and not self.managers() else "",
            "last_seen": now,
            "created": now,
        }
        if node["role"] == "manager" and node["manager_status"] != "Leader":
            node["manager_status"] = "Reachable (no Raft: see docs/manager.md)"
        self.store.put("node", node_id, node_id, node)
        return Issued(node_id, role, self.cluster_id, cert, self.ca_pem)

    def join(
        self,
        token: str,
        csr_pem: bytes,
        hostname: str,
        advertise_addr: str,
        data_path_addr: str,
        now: float,
        data_path_mtu: int | None = None,
    ) -> Issued:
        """Admit a node: its token first, then (if it said) what its data path carries.

        A node whose underlay carries less than the swarm's would drop the networks' big
        frames on its first hop, so it is refused before it is registered.
        """
        role = self.role_for_token(token)
        if data_path_mtu is not None and data_path_mtu < self.underlay_mtu:
            raise Conflict(
                f"this node's data path ({data_path_addr}) carries {data_path_mtu} bytes, less "
                f"than the swarm's underlay MTU {self.underlay_mtu} (swarm init --underlay-mtu)"
            )
        return self.issue(role, csr_pem, hostname, advertise_addr, data_path_addr, now)

    def renew(self, node_id: str, csr_pem: bytes, now: float) -> bytes:
        node = self.node(node_id)
        return pki.sign_node_cert(
            self.ca,
            csr_pem,
            node_id,
            ROLE_CERT[node["role"]],
            self.cluster_id,
            _dt(now),
            self.cert_lifetime,
            san_ips=[node["addr"]],
        )

    def managers(self) -> list[dict[str, Any]]:
        return [n for n in self.store.list("node") if n["role"] == "manager"]

    def node(self, node_id: str) -> dict[str, Any]:
        node = self.store.get("node", node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        return node

    def find_node(self, ref: str) -> dict[str, Any]:
        """A node by id, id prefix or hostname, as `docker node` takes it."""
        nodes = self.store.list("node")
        exact = [n for n in nodes if ref in (n["id"], n["hostname"])]
        found = exact or [n for n in nodes if n["id"].startswith(ref)]
        if len(found) != 1:
            raise NotFound(f"node {ref} not found" if not found else f"node {ref} is ambiguous")
        return found[0]

    def nodes(self) -> list[dict[str, Any]]:
        return sorted(self.store.list("node"), key=lambda n: (n["hostname"], n["id"]))

    def hello(self, node_id: str, now: float, addrs: dict[str, str]) -> dict[str, Any]:
        node = self.node(node_id)
        node.update(status="ready", last_seen=now, **addrs)
        self.store.put("node", node_id, node_id, node)
        return node

    def heartbeat(self, node_id: str, now: float) -> bool:
        """Record a heartbeat; True if the node was down and is ready again."""
        node = self.node(node_id)
        revived = bool(node["status"] != "ready")
        node["last_seen"] = now
        node["status"] = "ready"
        self.store.put("node", node_id, node_id, node)
        return revived

    def expire_heartbeats(self, now: float) -> list[str]:
        """Mark nodes down whose heartbeats stopped; return their ids (their tasks move)."""
        limit = self.heartbeat_period * HEARTBEAT_GRACE
        gone = []
        for node in self.store.list("node"):
            if node["status"] == "ready" and now - node["last_seen"] > limit:
                node["status"] = "down"
                self.store.put("node", node["id"], node["id"], node)
                gone.append(node["id"])
        return gone

    def mark_down(self, node_id: str) -> None:
        node = self.node(node_id)
        node["status"] = "down"
        self.store.put("node", node_id, node_id, node)

    def remove_node(self, ref: str, force: bool = False) -> str:
        node = self.find_node(ref)
        if node["status"] == "ready" and not force:
            raise Conflict(
                f"node {node['hostname']} is not down and can't be removed: "
                "run `vxnet swarm leave` on it first, or use --force"
            )
        if node["manager_status"] == "Leader":
            raise Conflict(
                "the manager cannot remove itself: use `vxnet swarm leave --force` on it"
            )
        self.store.delete("node", node["id"])
        return str(node["id"])

    # ----------------------------------------------------------------------------- keys

    def save_keys(self) -> None:
        self.store.set_value("keys", self.keys.to_json())

    def rotate_keys_if_due(self, now: float) -> bool:
        if self.keys.handle_timer(now):
            self.save_keys()
            return True
        return False

    def set_rotation_interval(self, seconds: float, now: float) -> None:
        self.keys.set_interval(seconds, now)
        self.save_keys()

    def keys_json(self) -> list[dict[str, Any]]:
        return [dict(k.to_json()) for k in self.keys.keys]

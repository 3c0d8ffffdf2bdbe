"""memberlist's tunables (``config.go``), with the derived quantities that depend on cluster size.

The defaults are ``DefaultLANConfig()``, which Docker swarm uses unchanged.  Durations are in
seconds (floats), as everywhere in vxnet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vxnet.errors import UsageError

#: Above this many nodes the push/pull interval grows with log2(n) (``pushPullScaleThreshold``).
PUSH_PULL_SCALE_THRESHOLD = 32
#: Bytes reserved for a compound header, and per message in it (``net.go``).
COMPOUND_HEADER_OVERHEAD = 2
COMPOUND_OVERHEAD = 2
#: The ``[8]`` type byte in front of a user broadcast.
USER_MSG_OVERHEAD = 1
#: ``[vsn][nonce 12][tag 16]``: what AES-GCM adds to a UDP packet (encryption version 1).
ENCRYPTION_OVERHEAD = 29


@dataclass(frozen=True, slots=True)
class Config:
    """``DefaultLANConfig``; :meth:`wan` and :meth:`local` give the other two presets."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    push_pull_interval: float = 30.0
    retransmit_mult: int = 4
    awareness_max_multiplier: int = 8
    tcp_timeout: float = 10.0
    udp_buffer_size: int = 1400
    protocol_version: int = 2
    encryption_overhead: int = 0  # ENCRYPTION_OVERHEAD when a keyring is set
    dead_node_reclaim_time: float = 0.0
    disable_tcp_pings: bool = False
    #: Not a memberlist option (memberlist always does it): when True, a ping to a suspect no
    #: longer carries the accusation (Lifeguard's "buddy system").  For measuring plain SWIM.
    disable_buddy_system: bool = False

    def __post_init__(self) -> None:
        if self.probe_interval <= 0 or self.probe_timeout <= 0:
            raise UsageError("probe_interval and probe_timeout must be positive")
        if self.awareness_max_multiplier < 1:
            raise UsageError("awareness_max_multiplier must be at least 1 (1 turns Lifeguard off)")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise UsageError("suspicion_mult and suspicion_max_timeout_mult must be at least 1")
        if not 1 <= self.protocol_version <= 5:
            raise UsageError("protocol_version must be between 1 and 5")
        if self.udp_buffer_size < 64:
            raise UsageError("udp_buffer_size is too small for any gossip")

    @classmethod
    def lan(cls) -> Config:
        return cls()

    @classmethod
    def wan(cls) -> Config:
        """``DefaultWANConfig``."""
        return cls(
            tcp_timeout=30.0,
            suspicion_mult=6,
            push_pull_interval=60.0,
            probe_timeout=3.0,
            probe_interval=5.0,
            gossip_nodes=4,
            gossip_interval=0.5,
            gossip_to_the_dead_time=60.0,
        )

    @classmethod
    def local(cls) -> Config:
        """``DefaultLocalConfig``: for loopback clusters."""
        return cls(
            tcp_timeout=1.0,
            indirect_checks=1,
            retransmit_mult=2,
            suspicion_mult=3,
            push_pull_interval=15.0,
            probe_timeout=0.2,
            probe_interval=1.0,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
        )

    def with_keyring(self) -> Config:
        """The same configuration for an encrypted cluster (smaller piggyback budget)."""
        return dataclasses.replace(self, encryption_overhead=ENCRYPTION_OVERHEAD)


def push_pull_scale(interval: float, n: int) -> float:
    """``pushPullScale``: the push/pull period for a cluster of ``n`` nodes."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1.0
    return multiplier * interval

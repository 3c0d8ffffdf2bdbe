"""The Security Association Database of one node: which SA protects traffic to and from each
VTEP peer, under which key.  Sans-IO and single-threaded: the dataplane asks :meth:`SADB.tx` and
:meth:`SADB.rx` per packet (one dict lookup each) and tells it about keys and peers between packets.

Docker's rules (moby ``libnetwork/drivers/overlay/encryption.go``, ``agent.go``):

* Per peer and per key there is a receive SA ``derive_spi(peer, local, tag)``; per peer there is
  one send SA ``derive_spi(local, peer, primary)``.  Each SA's salt is its own SPI.
* Keys are sorted by tag (Lamport time) and the **second** one, ``keys[1]`` -- the middle of
  three -- is primary: the newest key is installed for receive one full rotation before anybody
  sends with it, so a node that learns of a rotation late still decrypts everything, and a node
  that learns early still sends with a key everyone has.
* A rotation in Docker is "-rSA0, +rSA3, +fSA2, +fSP2/-fSP1, -fSA1": drop the pruned key's receive
  SA, add the new key's, add the send SA of the new primary, point the policy at it, delete the old
  send SA.  :meth:`SADB.set_keys` does the whole change in one call between two packets, adding
  before removing (new receive SAs, then the send switch, then the pruned receive SAs go), so no
  packet meets a half-applied change and there is never a moment with fewer receive SAs.
* SAs that already exist are never rebuilt: their counters and replay windows carry on.

vxnet additions, each documented where it acts:

* Every SA gets a fresh random ``iv_mask`` (from ``rng``): re-creating an SA under the same key
  (a peer removed and re-added, a daemon restart) restarts its counter at 1, and without the mask
  the same IV would repeat under the same key and salt.  Docker gets this from the kernel's seqiv.
* A peer whose sender restarted begins again at sequence number 1, which a receiver's replay
  window would drop until the key rotates away.  Docker has no window (0); vxnet does, so the
  dataplane calls :meth:`SADB.reset_peer` when it learns a peer restarted (it rejoined gossip).
* Two receive SAs with the same SPI (an FNV-1a collision: about 1 in 2**32 per pair) cannot both
  be installed, as in the kernel (EEXIST): the first stays and the clash is counted in
  :attr:`SADB.collisions`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from vxnet.errors import UsageError
from vxnet.esp.sa import (
    DEFAULT_ESN,
    DEFAULT_ICV_LEN,
    DEFAULT_REPLAY_WINDOW,
    KEY_LENS,
    SecurityAssociation,
    esp_overhead,
)
from vxnet.esp.spi import IPAddress, derive_spi, salt_for_spi

#: Docker's VXLAN encapsulation figure: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
VXLAN_ENCAP = 50
DEFAULT_UNDERLAY_MTU = 1500

Direction = Literal["in", "out"]


def encrypted_mtu(underlay_mtu: int = DEFAULT_UNDERLAY_MTU, icv_len: int = DEFAULT_ICV_LEN) -> int:
    """Docker's ``maxMTU`` for an encrypted overlay: underlay - 50 - ESP overhead, rounded down to
    a multiple of 4 (so no padding is needed).  1424 with ICV 8 (Docker), 1416 with ICV 16."""
    mtu = underlay_mtu - VXLAN_ENCAP - esp_overhead(icv_len)
    return mtu - mtu % 4


@dataclass(frozen=True, slots=True)
class SaInfo:
    """One SA as ``vxnet ... esp sa`` shows it (no key material)."""

    spi: int
    direction: Direction
    peer: IPAddress
    tag: int
    seq: int  # out: last sequence number sent; in: highest accepted
    primary: bool

    @property
    def spi_hex(self) -> str:
        return f"0x{self.spi:08x}"

    def to_json(self) -> dict[str, object]:
        return {
            "spi": self.spi_hex,
            "direction": self.direction,
            "peer": str(self.peer),
            "tag": self.tag,
            "seq": self.seq,
            "primary": self.primary,
        }


@dataclass(frozen=True, slots=True)
class KeyChange:
    """What one :meth:`SADB.set_keys` call did, in the order it did it."""

    added: tuple[int, ...]
    primary: int
    previous_primary: int | None
    removed: tuple[int, ...]


class SADB:
    """The SAs of the node whose data-path address is ``local``."""

    __slots__ = (
        "_keys",
        "_peers",
        "_primary",
        "_rng",
        "_rx",
        "_rx_by_peer",
        "_tx",
        "_tx_tag",
        "collisions",
        "esn",
        "icv_len",
        "local",
        "replay_window",
    )

    def __init__(
        self,
        local: IPAddress,
        *,
        icv_len: int = DEFAULT_ICV_LEN,
        esn: bool = DEFAULT_ESN,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        rng: random.Random | None = None,
    ) -> None:
        esp_overhead(icv_len)  # validates
        self.local = local
        self.icv_len = icv_len
        self.esn = esn
        self.replay_window = replay_window
        #: Source of the per-SA IV masks; pass a seeded ``random.Random`` in tests.
        self._rng = rng if rng is not None else random.SystemRandom()
        self._keys: dict[int, bytes] = {}
        self._primary: int | None = None
        self._peers: set[IPAddress] = set()
        self._tx: dict[IPAddress, SecurityAssociation] = {}
        self._tx_tag: dict[IPAddress, int] = {}
        self._rx: dict[int, SecurityAssociation] = {}
        self._rx_by_peer: dict[tuple[IPAddress, int], SecurityAssociation] = {}
        #: Receive SAs not installed because another SA already had their SPI.
        self.collisions = 0

    # -- the per-packet interface ------------------------------------------------------------

    def tx(self, peer: IPAddress) -> SecurityAssociation:
        """The SA to send to ``peer`` with (the peer is added on first use)."""
        sa = self._tx.get(peer)
        if sa is None:
            self.add_peer(peer)
            sa = self._tx[peer]
        return sa

    def rx(self, spi: int) -> SecurityAssociation | None:
        """The receive SA for an arriving SPI, or None (drop, count ``esp_unknown_spi``)."""
        return self._rx.get(spi)

    # -- keys and peers ----------------------------------------------------------------------

    @property
    def overhead(self) -> int:
        """ESP bytes added per packet with this ICV (26 for 8 as Docker, 34 for 16), no padding."""
        return esp_overhead(self.icv_len)

    @property
    def primary_tag(self) -> int | None:
        return self._primary

    @property
    def tags(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    @property
    def peers(self) -> frozenset[IPAddress]:
        return frozenset(self._peers)

    def set_keys(self, keys: Sequence[tuple[int, bytes]]) -> KeyChange:
        """Install the ``networking:ipsec`` keyring: ``(tag, key)`` pairs, usually three.

        New receive SAs first, then the switch of every peer's send SA to the primary (the second
        key by tag), then the removal of the pruned keys' receive SAs."""
        new = _check_keys(keys)
        primary = self.choose_primary(sorted(new))
        for tag, key in new.items():
            if tag in self._keys and self._keys[tag] != key:
                raise UsageError(f"key tag {tag} already names another key; tags are unique")
        added = tuple(t for t in sorted(new) if t not in self._keys)
        removed = tuple(t for t in sorted(self._keys) if t not in new)
        previous = self._primary
        self._keys = new
        for peer in self._peers:
            for tag in added:
                self._install_rx(peer, tag)
        self._primary = primary
        if primary != previous:
            for peer in self._peers:
                self._install_tx(peer)
        for peer in self._peers:
            for tag in removed:
                self._remove_rx(peer, tag)
        return KeyChange(added, primary, previous, removed)

    @staticmethod
    def choose_primary(tags: Sequence[int]) -> int:
        """Docker's rule (``getPrimaryKeyTag``): sorted by tag, the second key -- the middle of
        three.  With one key, that key."""
        return tags[1] if len(tags) > 1 else tags[0]

    def add_peer(self, peer: IPAddress) -> None:
        """Program the SAs for a VTEP peer (idempotent: existing SAs keep their state)."""
        if peer == self.local:
            raise UsageError(f"{peer} is this node's own data-path address, not a peer")
        if not self._keys:
            raise UsageError("no networking:ipsec keys yet: encryption key is not present")
        if peer in self._peers:
            return
        self._peers.add(peer)
        for tag in sorted(self._keys):
            self._install_rx(peer, tag)
        self._install_tx(peer)

    def remove_peer(self, peer: IPAddress) -> None:
        """Forget a peer's SAs (idempotent)."""
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        for tag in list(self._keys):
            self._remove_rx(peer, tag)
        del self._tx[peer]
        del self._tx_tag[peer]

    def reset_peer(self, peer: IPAddress) -> None:
        """Fresh SAs for a peer that restarted (its counters began again at 1)."""
        self.remove_peer(peer)
        self.add_peer(peer)

    def set_peers(self, peers: Iterable[IPAddress]) -> None:
        """Make the peer set exactly ``peers`` (what the FDB's VTEPs are)."""
        wanted = set(peers)
        for peer in self._peers - wanted:
            self.remove_peer(peer)
        for peer in wanted - self._peers:
            self.add_peer(peer)

    # -- teaching ----------------------------------------------------------------------------

    def describe(self) -> list[SaInfo]:
        """Every SA, per peer: the send SA first, then the receive SAs by tag."""
        out: list[SaInfo] = []
        for peer in sorted(self._peers, key=lambda p: (p.version, p)):
            tx_tag = self._tx_tag[peer]
            sa = self._tx[peer]
            out.append(SaInfo(sa.spi, "out", peer, tx_tag, sa.seq, True))
            for tag in sorted(self._keys):
                rx = self._rx_by_peer.get((peer, tag))
                if rx is not None:
                    out.append(SaInfo(rx.spi, "in", peer, tag, rx.highest_seq, tag == tx_tag))
        return out

    def wireshark_esp_sa(self) -> list[str]:
        """Wireshark ``esp_sa`` UAT records for every SA (key material included: for labs).

        Use as ``tshark -o esp.enable_encryption_decode:TRUE -o 'uat:esp_sa:<record>'`` or one
        record per line in the ``esp_sa`` file.  Wireshark's SA table cannot say ESN, so with
        ``esn`` it decrypts and dissects but reports the ICV as incorrect if asked to check it.
        """
        algo = f"AES-GCM with {self.icv_len} octet ICV [RFC4106]"
        records = []
        for peer in sorted(self._peers, key=lambda p: (p.version, p)):
            family = "IPv4" if peer.version == 4 else "IPv6"
            pairs = [(self.local, peer, self._tx_tag[peer])]
            pairs += [(peer, self.local, tag) for tag in sorted(self._keys)]
            for src, dst, tag in pairs:
                spi = derive_spi(src, dst, tag)
                key = self._keys[tag] + salt_for_spi(spi)
                records.append(
                    f'"{family}","{src}","{dst}","0x{spi:08x}","{algo}","0x{key.hex()}","NULL",""'
                )
        return records

    # -- internals ---------------------------------------------------------------------------

    def _new_sa(self, src: IPAddress, dst: IPAddress, tag: int) -> SecurityAssociation:
        spi = derive_spi(src, dst, tag)
        return SecurityAssociation(
            spi,
            self._keys[tag],
            salt_for_spi(spi),
            icv_len=self.icv_len,
            replay_window=self.replay_window,
            esn=self.esn,
            iv_mask=self._rng.getrandbits(64),
        )

    def _install_rx(self, peer: IPAddress, tag: int) -> None:
        if (peer, tag) in self._rx_by_peer:
            return
        sa = self._new_sa(peer, self.local, tag)
        if sa.spi in self._rx:
            self.collisions += 1
            return
        self._rx[sa.spi] = sa
        self._rx_by_peer[peer, tag] = sa

    def _remove_rx(self, peer: IPAddress, tag: int) -> None:
        sa = self._rx_by_peer.pop((peer, tag), None)
        if sa is not None and self._rx.get(sa.spi) is sa:
            del self._rx[sa.spi]

    def _install_tx(self, peer: IPAddress) -> None:
        assert self._primary is not None
        if self._tx_tag.get(peer) == self._primary:
            return
        sa = self._new_sa(self.local, peer, self._primary)
        self._tx[peer] = sa  # the switch: the old send SA is dropped with this assignment
        self._tx_tag[peer] = self._primary


def _check_keys(keys: Sequence[tuple[int, bytes]]) -> dict[int, bytes]:
    if not keys:
        raise UsageError("an encrypted overlay needs at least one networking:ipsec key")
    out: dict[int, bytes] = {}
    low: set[int] = set()
    for tag, key in keys:
        if not 0 <= tag < 1 << 64:
            raise UsageError(f"key tag {tag!r} is not a uint64 (a Lamport time)")
        if len(key) not in KEY_LENS:
            raise UsageError(f"an AES-GCM key is 16, 24 or 32 bytes, got {len(key)}")
        if tag in out or tag & 0xFFFFFFFF in low:
            raise UsageError(f"key tag {tag} appears twice (Docker uses the low 32 bits)")
        out[tag] = bytes(key)
        low.add(tag & 0xFFFFFFFF)
    return out

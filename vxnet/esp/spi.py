"""SPI and salt derivation, exactly as Docker's overlay driver does it.  No negotiation: both ends
compute the same numbers from what they already share (addresses and the key's tag).

From moby ``libnetwork/drivers/overlay/encryption.go`` (``buildSPI``, ``buildAeadAlgo``)::

    func buildSPI(src, dst netip.Addr, st uint32) int {
        h := fnv.New32a()
        v := src.As16(); h.Write(v[:])               // 16-byte form: IPv4 as ::ffff:a.b.c.d
        binary.Write(h, binary.BigEndian, st)         // the key tag, uint32 big-endian
        v = dst.As16(); h.Write(v[:])
        return int(h.Sum32())
    }

    salt := make([]byte, 4)
    binary.BigEndian.PutUint32(salt, uint32(spi))      // the SA's own SPI is its salt
    XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: append(key, salt...), ICVLen: 64}

* The SPI of the SA from ``src`` to ``dst`` under the key tagged ``tag`` is FNV-1a-32 over
  ``src(16) | tag(uint32 BE) | dst(16)``.  Older moby hashed ``net.ParseIP`` results, which are the
  16-byte form too; moby's ``TestBuildSPI`` checks the two agree.  A node sends with
  ``derive_spi(local, peer, tag)`` and receives with ``derive_spi(peer, local, tag)``.
* The tag is the key's Lamport time, a uint64 in swarmkit; libnetwork stores it as
  ``uint32(tag)``, so only the low 32 bits reach the hash.  :func:`derive_spi` does the same.
* The 4-byte RFC 4106 salt is the SPI in big-endian (the kernel takes ``key | salt`` as the
  ``rfc4106(gcm(aes))`` key: 16 + 4 = 20 bytes).  scapy's ``crypt_key`` and Wireshark's ESP SA
  "Encryption Key" take the same 20 bytes.
* Docker does **not** avoid the SPIs RFC 4303 reserves (0 must never be sent; 1-255 are reserved
  by IANA): the hash is used as is, with odds of 256 in 2**32 per SA.  vxnet keeps Docker's value
  so both compute the same SPI; :func:`is_reserved_spi` lets a caller count such an SA.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias

from vxnet.errors import UsageError

IPAddress: TypeAlias = IPv4Address | IPv6Address

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193
SALT_LEN = 4
#: RFC 4303 2.1: SPI 0 is reserved for local use and 1-255 are reserved by IANA.
RESERVED_SPI_MAX = 255
_UINT32 = 0xFFFFFFFF
_UINT64 = (1 << 64) - 1


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits (Go's ``hash/fnv.New32a``)."""
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & _UINT32
    return h


def addr16(addr: IPAddress) -> bytes:
    """The 16-byte form Go's ``As16`` gives: IPv4 as the IPv4-mapped ``::ffff:a.b.c.d``."""
    if isinstance(addr, IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def derive_spi(src: IPAddress, dst: IPAddress, tag: int) -> int:
    """Docker's SPI of the SA carrying ESP from ``src`` to ``dst`` under the key tagged ``tag``."""
    if not 0 <= tag <= _UINT64:
        raise UsageError(f"key tag {tag!r} is not a uint64 (a Lamport time)")
    return fnv1a_32(addr16(src) + (tag & _UINT32).to_bytes(4, "big") + addr16(dst))


def salt_for_spi(spi: int) -> bytes:
    """Docker's RFC 4106 salt for an SA: its SPI, 4 bytes big-endian."""
    if not 0 <= spi <= _UINT32:
        raise UsageError(f"SPI {spi!r} is not a uint32")
    return spi.to_bytes(SALT_LEN, "big")


def is_reserved_spi(spi: int) -> bool:
    """True for the SPIs RFC 4303 reserves (0-255); Docker uses them anyway when FNV says so."""
    return 0 <= spi <= RESERVED_SPI_MAX

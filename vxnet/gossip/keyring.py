"""memberlist's keyring and the AES-GCM envelope of its packets and streams (sans-IO).

``[vsn][nonce 12][AES-GCM ciphertext + tag 16]`` with the label (or, on streams, the stream
header and label) as additional data, as memberlist's ``security.go``: version 1 as memberlist
sends today, version 0 (PKCS#7-padded) still decoded.  The primary key encrypts; every
installed key is tried on receive, so a rotation (add the new key, make it primary, remove
the old) never drops a packet.  :mod:`vxnet.gossip.packet` puts this envelope in its place
among the other framings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vxnet.errors import BadPacket, UsageError

KEY_SIZES = (16, 24, 32)
NONCE_SIZE = 12
TAG_SIZE = 16


class Keyring:
    """memberlist's keyring: the primary key encrypts, every installed key may decrypt."""

    __slots__ = ("_aeads", "_keys")

    def __init__(self, keys: Sequence[bytes] = (), primary: bytes | None = None) -> None:
        self._keys: list[bytes] = []
        self._aeads: dict[bytes, AESGCM] = {}
        for key in keys:
            self.add(key)
        if primary is not None:
            self.add(primary)
            self.use(primary)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Installed keys, primary first."""
        return tuple(self._keys)

    @property
    def primary(self) -> bytes | None:
        return self._keys[0] if self._keys else None

    def add(self, key: bytes) -> None:
        """Install ``key`` (a no-op if it is installed); the first key becomes primary."""
        key = bytes(key)
        if len(key) not in KEY_SIZES:
            raise UsageError(f"a gossip key is 16, 24 or 32 bytes, not {len(key)}")
        if key not in self._aeads:
            self._aeads[key] = AESGCM(key)
            self._keys.append(key)

    def use(self, key: bytes) -> None:
        """Make an installed key the primary one."""
        key = bytes(key)
        if key not in self._aeads:
            raise UsageError("that key is not installed: add() it before use()")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Uninstall ``key`` (a no-op if it is not installed); never the primary key."""
        key = bytes(key)
        if key == self.primary:
            raise UsageError("cannot remove the primary key: use() another key first")
        if key in self._aeads:
            del self._aeads[key]
            self._keys.remove(key)

    def aeads(self) -> list[AESGCM]:
        """One cached cipher per key, primary first."""
        return [self._aeads[k] for k in self._keys]

    def __repr__(self) -> str:
        return f"Keyring({len(self._keys)} keys)"


# ------------------------------------------------------------------------------- encryption


def encrypted_length(version: int, plaintext_len: int) -> int:
    """Bytes of ``[vsn][nonce][ciphertext + tag]`` for a plaintext of that length."""
    if version >= 1:
        return 1 + NONCE_SIZE + plaintext_len + TAG_SIZE
    return 1 + NONCE_SIZE + plaintext_len + (16 - plaintext_len % 16) + TAG_SIZE


def encrypt_payload(
    keyring: Keyring,
    plaintext: bytes,
    aad: bytes,
    rng_nonce: bytes | None = None,
    version: int = 1,
) -> bytes:
    """``[vsn][nonce][AES-GCM(primary key)]``; version 0 pads with PKCS#7 first (security.go)."""
    if keyring.primary is None:
        raise UsageError("the keyring is empty: add a key before encrypting")
    if version not in (0, 1):
        raise UsageError(f"encryption version is 0 or 1, not {version}")
    nonce = os.urandom(NONCE_SIZE) if rng_nonce is None else bytes(rng_nonce)
    if len(nonce) != NONCE_SIZE:
        raise UsageError(f"a nonce is {NONCE_SIZE} bytes")
    data = bytes(plaintext)
    if version == 0:
        pad = 16 - len(data) % 16
        data += bytes([pad]) * pad
    sealed = keyring.aeads()[0].encrypt(nonce, data, bytes(aad))
    return bytes([version]) + nonce + sealed


def decrypt_payload_untrusted(keyring: Keyring, data: bytes, aad: bytes) -> bytes:
    """The plaintext of ``[vsn][nonce][ciphertext + tag]``, trying every installed key."""
    if not data:
        raise BadPacket("encrypt_truncated", "empty payload")
    version = data[0]
    if version > 1:
        raise BadPacket("encrypt_bad_version", str(version))
    if len(data) < encrypted_length(version, 0):
        raise BadPacket("encrypt_truncated", f"{len(data)} bytes")
    nonce, sealed, extra = (
        bytes(data[1 : 1 + NONCE_SIZE]),
        bytes(data[1 + NONCE_SIZE :]),
        bytes(aad),
    )
    for aead in keyring.aeads():
        try:
            plain = aead.decrypt(nonce, sealed, extra)
        except InvalidTag:
            continue
        return _unpad(plain) if version == 0 else plain
    raise BadPacket("no_installed_key_decrypts")


def _unpad(plain: bytes) -> bytes:
    # memberlist trusts the authenticated pad byte; we only refuse one that cannot be right.
    pad = plain[-1] if plain else 0
    if not 1 <= pad <= min(16, len(plain)):
        raise BadPacket("encrypt_bad_padding")
    return plain[:-pad]

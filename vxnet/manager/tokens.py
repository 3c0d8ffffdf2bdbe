"""Docker's swarm join token: ``SWMTKN-1-<CA digest>-<secret>``.

Both parts are base 36 (``0-9a-z``) and zero-padded, exactly as swarmkit's ``GenerateJoinToken``
(``ca/config.go``) prints them with Go's ``big.Int.Text(36)``:

* the SHA-256 of the root CA certificate's PEM bytes, padded to 50 characters
  (``ceil(log36(2**256))``);
* 16 random bytes, padded to 25 characters (``ceil(log36(2**128))``).

A joining node fetches the root CA without verifying it and then checks it against the digest in
the token (:func:`verify_ca`); the manager compares the whole presented token with the worker or
manager token in constant time (:func:`token_matches`).  Worker and manager tokens share the
digest and differ only in the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from dataclasses import dataclass, field

from vxnet.errors import UsageError, VxnetError

TOKEN_PREFIX = "SWMTKN"
TOKEN_VERSION = 1
SECRET_BYTES = 16
DIGEST_BYTES = 32
DIGEST_CHARS = 50
SECRET_CHARS = 25
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_ALPHABET_SET = frozenset(_ALPHABET)


class TokenRefused(VxnetError):
    """A well-formed join token that does not fit this cluster (wrong CA digest or secret)."""


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """The parts of a join token.  The secret stays out of ``repr`` so logs do not leak it."""

    version: int
    ca_digest: bytes
    secret: bytes = field(repr=False)


def base36(value: int, width: int) -> str:
    """``value`` in lowercase base 36, zero-padded on the left to ``width`` characters."""
    if value < 0:
        raise UsageError(f"base36 needs a non-negative integer, got {value}")
    digits: list[str] = []
    while value:
        value, digit = divmod(value, 36)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits)).rjust(width, "0")


def new_secret(rng: random.Random) -> bytes:
    """16 fresh secret bytes.  Pass ``random.SystemRandom()`` outside tests."""
    return rng.randbytes(SECRET_BYTES)


def make_token(ca_cert_pem: bytes, secret: bytes) -> str:
    """The join token for the root CA ``ca_cert_pem`` (PEM bytes as served) and ``secret``."""
    if len(secret) != SECRET_BYTES:
        raise UsageError(f"a join token secret is {SECRET_BYTES} bytes, got {len(secret)}")
    digest = int.from_bytes(hashlib.sha256(ca_cert_pem).digest(), "big")
    secret_int = int.from_bytes(secret, "big")
    return "-".join(
        (
            TOKEN_PREFIX,
            str(TOKEN_VERSION),
            base36(digest, DIGEST_CHARS),
            base36(secret_int, SECRET_CHARS),
        )
    )


def parse_token(token: str) -> ParsedToken:
    """Split and check a join token; :class:`UsageError` says what is wrong with a bad one."""
    parts = token.strip().split("-")
    if len(parts) != 4:
        raise _invalid(
            f"expected 4 parts separated by '-' (SWMTKN-1-<digest>-<secret>), got {len(parts)}"
        )
    prefix, version, digest_text, secret_text = parts
    if prefix != TOKEN_PREFIX:
        raise _invalid(f"it must start with {TOKEN_PREFIX!r}, not {prefix!r}")
    if version != str(TOKEN_VERSION):
        raise _invalid(f"version {version!r} is not supported (only {TOKEN_VERSION})")
    digest = _decode_part("CA digest", digest_text, DIGEST_CHARS, DIGEST_BYTES)
    secret = _decode_part("secret", secret_text, SECRET_CHARS, SECRET_BYTES)
    return ParsedToken(TOKEN_VERSION, digest, secret)


def token_matches(presented: str, expected: str) -> bool:
    """Whether ``presented`` is ``expected``, compared in constant time over the whole token."""
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def verify_ca(ca_pem: bytes, token: str) -> None:
    """Raise :class:`TokenRefused` unless the SHA-256 of ``ca_pem`` is the token's CA digest."""
    expected = parse_token(token).ca_digest
    actual = hashlib.sha256(ca_pem).digest()
    if not hmac.compare_digest(actual, expected):
        raise TokenRefused(
            "the manager's root CA does not match the join token's digest "
            f"(token sha256:{expected.hex()}, manager sha256:{actual.hex()}); "
            "check that the token belongs to this swarm and that nothing intercepts port 2377"
        )


def _decode_part(name: str, text: str, width: int, size: int) -> bytes:
    if len(text) != width:
        raise _invalid(f"the {name} must be {width} base-36 characters, got {len(text)}")
    bad = sorted(set(text) - _ALPHABET_SET)
    if bad:
        raise _invalid(f"the {name} has characters outside 0-9a-z: {''.join(bad)!r}")
    value = int(text, 36)
    if value >= 1 << (8 * size):
        raise _invalid(f"the {name} is larger than {size} bytes")
    return value.to_bytes(size, "big")


def _invalid(reason: str) -> UsageError:
    return UsageError(f"invalid join token: {reason}; copy the whole token again from a manager")

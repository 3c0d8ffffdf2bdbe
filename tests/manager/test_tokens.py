from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.manager.tokens import (
    DIGEST_CHARS,
    SECRET_CHARS,
    ParsedToken,
    TokenRefused,
    base36,
    make_token,
    new_secret,
    parse_token,
    token_matches,
    verify_ca,
)

CA = b"-----BEGIN CERTIFICATE-----\nnot really a certificate\n-----END CERTIFICATE-----\n"
# The example token in Docker's documentation (docs.docker.com, "docker swarm join").
DOCS_TOKEN = "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx"
ALPHABET = set("0123456789abcdefghijklmnopqrstuvwxyz")


def test_base36_matches_go_big_int_text() -> None:
    assert base36(0, 3) == "000"
    assert base36(35, 1) == "z"
    assert base36(36, 1) == "10"
    # ceil(log36(2**256)) = 50 and ceil(log36(2**128)) = 25: the maxima fill the width exactly.
    assert len(base36(2**256 - 1, 0)) == DIGEST_CHARS == 50
    assert len(base36(2**128 - 1, 0)) == SECRET_CHARS == 25
    assert base36(2**128 - 1, 25) == "f5lxx1zz5pnorynqglhzmsp33"
    assert int("f5lxx1zz5pnorynqglhzmsp33", 36) == 2**128 - 1
    with pytest.raises(UsageError):
        base36(-1, 1)


def test_make_token_layout() -> None:
    token = make_token(CA, bytes(16))
    prefix, version, digest, secret = token.split("-")
    assert (prefix, version) == ("SWMTKN", "1")
    assert len(digest) == 50 and len(secret) == 25
    assert secret == "0" * 25
    assert set(digest) <= ALPHABET
    assert int(digest, 36) == int.from_bytes(hashlib.sha256(CA).digest(), "big")


def test_small_values_are_zero_padded() -> None:
    token = make_token(CA, (1).to_bytes(16, "big"))
    assert token.endswith("-" + "0" * 24 + "1")


def test_secret_must_be_16_bytes() -> None:
    with pytest.raises(UsageError, match="16 bytes"):
        make_token(CA, bytes(15))


def test_new_secret_is_16_bytes_from_the_given_rng() -> None:
    assert new_secret(random.Random(7)) == new_secret(random.Random(7))
    assert len(new_secret(random.Random(7))) == 16
    assert new_secret(random.Random(7)) != new_secret(random.Random(8))


def test_parse_docs_token() -> None:
    parsed = parse_token(DOCS_TOKEN)
    assert parsed.version == 1
    assert len(parsed.ca_digest) == 32 and len(parsed.secret) == 16
    digest_text, secret_text = DOCS_TOKEN.split("-")[2:]
    assert base36(int.from_bytes(parsed.ca_digest, "big"), 50) == digest_text
    assert base36(int.from_bytes(parsed.secret, "big"), 25) == secret_text


def test_parsed_token_hides_secret_in_repr() -> None:
    parsed = parse_token(make_token(CA, b"\xab" * 16))
    assert "secret" not in repr(parsed)
    assert (b"\xab" * 16).hex() not in repr(parsed)


@given(st.binary(max_size=300), st.binary(min_size=16, max_size=16))
def test_round_trip(ca: bytes, secret: bytes) -> None:
    token = make_token(ca, secret)
    assert parse_token(token) == ParsedToken(1, hashlib.sha256(ca).digest(), secret)
    assert parse_token(f"  {token}\n") == parse_token(token)  # pasted with whitespace
    verify_ca(ca, token)


GOOD = make_token(CA, bytes(range(16)))
_, _, GOOD_DIGEST, GOOD_SECRET = GOOD.split("-")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "expected 4 parts"),
        ("SWMTKN-1-abc", "expected 4 parts"),
        (GOOD + "-x", "expected 4 parts"),
        (GOOD.replace("SWMTKN", "SWMTKM"), "must start with 'SWMTKN'"),
        (GOOD.replace("SWMTKN-1", "SWMTKN-2"), "version '2'"),
        (f"SWMTKN-1-{GOOD_DIGEST[1:]}-{GOOD_SECRET}", "CA digest must be 50"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{GOOD_SECRET}0", "secret must be 25"),
        (f"SWMTKN-1-{GOOD_DIGEST.upper()}-{GOOD_SECRET}", "outside 0-9a-z"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{GOOD_SECRET[:-1]}_", "outside 0-9a-z"),
        (f"SWMTKN-1-{'z' * 50}-{GOOD_SECRET}", "CA digest is larger than 32 bytes"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{'z' * 25}", "secret is larger than 16 bytes"),
    ],
)
def test_parse_rejects_malformed(token: str, reason: str) -> None:
    with pytest.raises(UsageError, match="invalid join token") as info:
        parse_token(token)
    assert reason in str(info.value)


@given(st.text(max_size=120))
def test_parse_arbitrary_text_returns_or_raises_usage_error(text: str) -> None:
    try:
        parsed = parse_token(text)
    except UsageError:
        return
    assert len(parsed.ca_digest) == 32 and len(parsed.secret) == 16


def test_token_matches_whole_token() -> None:
    other = make_token(CA, bytes(range(1, 17)))
    assert token_matches(GOOD, GOOD)
    assert not token_matches(other, GOOD)
    assert not token_matches(GOOD[:-1], GOOD)
    assert not token_matches(GOOD + "0", GOOD)
    assert not token_matches("", GOOD)
    assert not token_matches("SWMTKN-1-é", GOOD)  # non-ASCII is compared as UTF-8


def test_verify_ca() -> None:
    verify_ca(CA, GOOD)
    with pytest.raises(TokenRefused, match="does not match the join token's digest"):
        verify_ca(CA + b"\n", GOOD)
    with pytest.raises(UsageError, match="invalid join token"):
        verify_ca(CA, "SWMTKN-1-nope")

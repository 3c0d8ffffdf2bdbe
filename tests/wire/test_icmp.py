from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.packet import Packet, Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.checksum import transport_checksum
from vxnet.wire.ethernet import mac_from_str, mac_to_str
from vxnet.wire.icmp import (
    ECHO6_REPLY,
    ECHO6_REQUEST,
    ECHO_REPLY,
    ECHO_REQUEST,
    IcmpEcho,
    Icmpv6Echo,
    NeighborAdvert,
    NeighborSolicit,
    decode_icmp_echo_untrusted,
    decode_icmpv6_untrusted,
    echo_reply_for,
    neighbor_advert_for,
)

from .strategies import SCAPY, ipv6s, macs, payloads, uint

echoes = st.builds(
    IcmpEcho, st.sampled_from([ECHO_REQUEST, ECHO_REPLY]), uint(8), uint(16), uint(16), payloads
)
echoes6 = st.builds(
    Icmpv6Echo, st.sampled_from([ECHO6_REQUEST, ECHO6_REPLY]), uint(8), uint(16), uint(16), payloads
)
solicits = st.builds(NeighborSolicit, ipv6s, st.none() | macs)
adverts = st.builds(
    NeighborAdvert, ipv6s, st.none() | macs, st.booleans(), st.booleans(), st.booleans()
)
messages6 = st.one_of(echoes6, solicits, adverts)

PING = bytes.fromhex("0800 3337 0001 0001 61626364")  # words sum to ccc8
SRC, DST = IPv6Address("fe80::1"), IPv6Address("ff02::1:ff00:2")
MAC = mac_from_str("02:42:0a:00:00:02")


def fix_checksum(raw: bytes, src: IPv6Address = SRC, dst: IPv6Address = DST) -> bytes:
    zeroed = raw[:2] + b"\x00\x00" + raw[4:]
    return raw[:2] + transport_checksum(src, dst, 58, zeroed).to_bytes(2, "big") + raw[4:]


def test_known_ping() -> None:
    ping = decode_icmp_echo_untrusted(PING)
    assert ping == IcmpEcho(ECHO_REQUEST, 0, 1, 1, b"abcd")
    assert ping.encode() == PING
    assert echo_reply_for(ping) == IcmpEcho(ECHO_REPLY, 0, 1, 1, b"abcd")
    with pytest.raises(UsageError):
        echo_reply_for(echo_reply_for(ping))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (PING[:7], "icmp_truncated"),
        (PING[:-1] + b"\x65", "icmp_bad_checksum"),
        (bytes.fromhex("0300 fcff 0000 0000"), "icmp_unsupported_type"),
    ],
)
def test_icmp_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_icmp_echo_untrusted(raw)
    assert info.value.reason == reason


def test_known_solicit_layout() -> None:
    target = IPv6Address("2001:db8::2")
    raw = NeighborSolicit(target, MAC).encode(SRC, DST)
    assert raw[:2] + raw[4:] == bytes.fromhex("8700 00000000") + target.packed + b"\x01\x01" + MAC
    assert raw == fix_checksum(raw)
    assert decode_icmpv6_untrusted(raw, SRC, DST) == NeighborSolicit(target, MAC)


def test_advert_for_solicit() -> None:
    solicit = NeighborSolicit(IPv6Address("2001:db8::2"), mac_from_str("02:42:0a:00:00:09"))
    advert = neighbor_advert_for(solicit, MAC, router=True)
    assert advert == NeighborAdvert(solicit.target, MAC, router=True, solicited=True, override=True)
    raw = advert.encode(solicit.target, SRC)
    assert raw[:2] + raw[4:8] == bytes.fromhex("8800 e0000000")
    assert raw[24:] == b"\x02\x01" + MAC
    with pytest.raises(UsageError):
        neighbor_advert_for(solicit, b"\x00")


def test_nd_options_unknown_skipped_first_wins() -> None:
    target = IPv6Address("2001:db8::2")
    other = mac_from_str("02:00:00:00:00:01")
    options = bytes.fromhex("0e02") + bytes(14) + b"\x01\x01" + MAC + b"\x01\x01" + other
    raw = fix_checksum(bytes.fromhex("8700 0000 00000000") + target.packed + options)
    assert decode_icmpv6_untrusted(raw, SRC, DST) == NeighborSolicit(target, MAC)
    raw = fix_checksum(bytes.fromhex("8800 0000 40000000") + target.packed + b"\x01\x01" + MAC)
    assert decode_icmpv6_untrusted(raw, SRC, DST) == NeighborAdvert(
        target, None, False, True, False
    )


ND_HEAD = bytes.fromhex("8700 0000 00000000") + bytes(16)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (fix_checksum(bytes.fromhex("8000 0000 0000")), "icmpv6_truncated"),
        (bytes.fromhex("8000 0000 0000 0000"), "icmpv6_bad_checksum"),
        (fix_checksum(bytes.fromhex("0100 0000 0000 0000")), "icmpv6_unsupported_type"),
        (fix_checksum(ND_HEAD[:23]), "icmpv6_truncated"),
        (fix_checksum(b"\x87\x01" + ND_HEAD[2:]), "nd_bad_code"),
        (fix_checksum(ND_HEAD + b"\x01\x00" + bytes(6)), "nd_option_zero_length"),
        (fix_checksum(ND_HEAD + b"\x01"), "nd_option_truncated"),
        (fix_checksum(ND_HEAD + b"\x01\x02" + bytes(6)), "nd_option_truncated"),
    ],
)
def test_icmpv6_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_icmpv6_untrusted(raw, SRC, DST)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "call",
    [
        lambda: IcmpEcho(256, 0, 0, 0, b"").encode(),
        lambda: Icmpv6Echo(128, 0, 1 << 16, 0, b"").encode(SRC, DST),
        lambda: NeighborSolicit(SRC, b"\x00").encode(SRC, DST),
        lambda: NeighborAdvert("::1").encode(SRC, DST),  # type: ignore[arg-type]
        lambda: NeighborAdvert(SRC).encode(SRC, "::1"),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_bad_fields(call: object) -> None:
    with pytest.raises(UsageError):
        call()  # type: ignore[operator]


@given(echoes)
def test_icmp_round_trip(echo: IcmpEcho) -> None:
    assert decode_icmp_echo_untrusted(echo.encode()) == echo


@given(messages6, ipv6s, ipv6s)
def test_icmpv6_round_trip(
    message: Icmpv6Echo | NeighborSolicit | NeighborAdvert, src: IPv6Address, dst: IPv6Address
) -> None:
    assert decode_icmpv6_untrusted(message.encode(src, dst), src, dst) == message


@SCAPY
@given(echoes)
def test_icmp_matches_scapy(echo: IcmpEcho) -> None:
    built = bytes(
        ICMP(type=echo.type, code=echo.code, id=echo.ident, seq=echo.seq) / Raw(echo.payload)
    )
    assert echo.encode() == built
    assert decode_icmp_echo_untrusted(built) == echo


def to_scapy(message: Icmpv6Echo | NeighborSolicit | NeighborAdvert) -> Packet:
    if isinstance(message, Icmpv6Echo):
        layer = ICMPv6EchoRequest if message.type == ECHO6_REQUEST else ICMPv6EchoReply
        return layer(code=message.code, id=message.ident, seq=message.seq, data=message.payload)
    if isinstance(message, NeighborSolicit):
        packet: Packet = ICMPv6ND_NS(tgt=str(message.target))
        mac, option = message.source_mac, ICMPv6NDOptSrcLLAddr
    else:
        packet = ICMPv6ND_NA(
            tgt=str(message.target), R=message.router, S=message.solicited, O=message.override
        )
        mac, option = message.target_mac, ICMPv6NDOptDstLLAddr
    return packet if mac is None else packet / option(lladdr=mac_to_str(mac))


@SCAPY
@given(messages6, ipv6s, ipv6s)
def test_icmpv6_matches_scapy(
    message: Icmpv6Echo | NeighborSolicit | NeighborAdvert, src: IPv6Address, dst: IPv6Address
) -> None:
    built = bytes(IPv6(src=str(src), dst=str(dst)) / to_scapy(message))[40:]
    assert message.encode(src, dst) == built
    assert decode_icmpv6_untrusted(built, src, dst) == message

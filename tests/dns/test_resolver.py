"""The sans-IO resolver: every rule, with dnspython-built queries, and fuzzed."""

from __future__ import annotations

import random
import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.dns.records import Directory, EndpointRecord
from vxnet.dns.resolver import TTL, Answer, Drop, Forward, Resolver

UPSTREAMS = (("192.0.2.53", 53), ("192.0.2.54", 53))
NETS = ("front",)


def make_resolver(tasks: int = 3) -> Resolver:
    d = Directory()
    for i in range(tasks):
        ip = f"10.0.1.{10 + i}"
        d.put("front", f"w{i}", EndpointRecord(f"web.{i}", "web", "s1", "10.0.1.2", ip))
        d.put("front", f"c{i}", EndpointRecord(f"cache.{i}", "cache", "s2", "", f"10.0.1.{50 + i}"))
    d.put("back", "db", EndpointRecord("db", "", "", "", "10.0.2.3", task_aliases=("pg",)))
    return Resolver(d, random.Random(7))


def ask(
    r: Resolver, name: str, rdtype: str = "A", *, networks: tuple[str, ...] = NETS,
    tcp: bool = False, rd: bool = True, upstreams: tuple[tuple[str, int], ...] = UPSTREAMS,
) -> Answer | Forward | Drop:  # fmt: skip
    q = dns.message.make_query(name, rdtype)
    if not rd:
        q.flags &= ~dns.flags.RD
    return r.handle_untrusted(q.to_wire(), networks, 100.0, tcp=tcp, upstreams=upstreams)


def reply(result: Answer | Forward | Drop) -> dns.message.Message:
    assert isinstance(result, Answer)
    return dns.message.from_wire(result.response)


def addresses(m: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in m.answer for rd in rrset]


def test_a_for_a_vip_service() -> None:
    m = reply(ask(make_resolver(), "web"))
    assert m.rcode() == dns.rcode.NOERROR
    assert addresses(m) == ["10.0.1.2"]
    assert m.answer[0].ttl == TTL
    assert m.flags & dns.flags.QR and m.flags & dns.flags.AA and m.flags & dns.flags.RA
    assert m.flags & dns.flags.RD


def test_tasks_and_dnsrr_return_every_task() -> None:
    r = make_resolver()
    assert sorted(addresses(reply(ask(r, "tasks.web")))) == ["10.0.1.10", "10.0.1.11", "10.0.1.12"]
    assert sorted(addresses(reply(ask(r, "cache")))) == ["10.0.1.50", "10.0.1.51", "10.0.1.52"]


def test_answers_are_shuffled_by_the_injected_rng() -> None:
    r = make_resolver(tasks=8)
    orders = {tuple(addresses(reply(ask(r, "tasks.web")))) for _ in range(20)}
    assert len(orders) > 1


def test_same_seed_same_order() -> None:
    a, b = make_resolver(tasks=8), make_resolver(tasks=8)
    for _ in range(5):
        assert addresses(reply(ask(a, "tasks.web"))) == addresses(reply(ask(b, "tasks.web")))


def test_other_types_for_our_names_are_empty_noerror() -> None:
    r = make_resolver()
    for rdtype in ("AAAA", "MX", "TXT", "SRV"):
        m = reply(ask(r, "web", rdtype))
        assert m.rcode() == dns.rcode.NOERROR
        assert m.answer == []
        assert m.flags & dns.flags.AA


def test_any_returns_the_addresses() -> None:
    assert addresses(reply(ask(make_resolver(), "web", "ANY"))) == ["10.0.1.2"]


def test_ptr_answers_name_dot_network() -> None:
    r = make_resolver()
    m = reply(ask(r, dns.reversename.from_address("10.0.1.10").to_text(), "PTR"))
    assert m.rcode() == dns.rcode.NOERROR
    assert addresses(m) == ["web.0.front."]
    m = reply(ask(r, "2.1.0.10.in-addr.arpa.", "PTR"))
    assert addresses(m) == ["web.front."]


def test_ptr_for_an_unknown_address_is_forwarded() -> None:
    r = make_resolver()
    assert isinstance(ask(r, "3.2.0.10.in-addr.arpa.", "PTR"), Forward)  # db: not on front
    assert isinstance(ask(r, "1.0.10.in-addr.arpa.", "PTR"), Forward)  # 3 labels


def test_scoping_unknown_single_label_is_nxdomain() -> None:
    r = make_resolver()
    m = reply(ask(r, "db"))  # db is on back, the asker on front
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert m.flags & dns.flags.AA
    assert addresses(reply(ask(r, "db", networks=("front", "back")))) == ["10.0.2.3"]
    assert addresses(reply(ask(r, "PG", networks=("back",)))) == ["10.0.2.3"]
    assert r.counters["nxdomain"] == 1


def test_case_insensitive_and_question_case_kept() -> None:
    m = reply(ask(make_resolver(), "WeB"))
    assert addresses(m) == ["10.0.1.2"]
    assert m.answer[0].name.to_text() == "WeB."


def test_dotted_unknown_names_are_forwarded() -> None:
    r = make_resolver()
    q = dns.message.make_query("example.com", "A", use_edns=0)
    result = r.handle_untrusted(q.to_wire(), NETS, 100.0, upstreams=UPSTREAMS)
    assert isinstance(result, Forward)
    assert result.upstreams == UPSTREAMS
    assert result.timeout == 2.0
    assert result.deadline == 104.0
    assert not result.tcp
    assert result.query[2:] == q.to_wire()[2:]
    assert struct.unpack("!H", result.query[:2])[0] == result.upstream_id
    assert r.counters["forwarded"] == 1


def test_at_most_three_upstreams_and_never_ourselves() -> None:
    ups = (("127.0.0.11", 53), ("1.1.1.1", 53), ("1.0.0.1", 53), ("8.8.8.8", 53), ("9.9.9.9", 53))
    result = ask(make_resolver(), "example.com", upstreams=ups)
    assert isinstance(result, Forward)
    assert result.upstreams == ups[1:4]


def test_no_upstream_is_an_immediate_servfail() -> None:
    r = make_resolver()
    m = reply(ask(r, "example.com", upstreams=()))
    assert m.rcode() == dns.rcode.SERVFAIL
    assert m.question[0].name.to_text() == "example.com."
    assert r.counters["servfail"] == 1


def test_rd_clear_is_refused_for_foreign_names_only() -> None:
    r = make_resolver()
    assert reply(ask(r, "example.com", rd=False)).rcode() == dns.rcode.REFUSED
    m = reply(ask(r, "web", rd=False))
    assert addresses(m) == ["10.0.1.2"]
    assert not m.flags & dns.flags.RD


def test_forward_relays_the_upstream_reply_with_the_client_id() -> None:
    r = make_resolver()
    q = dns.message.make_query("example.com", "A")
    fwd = r.handle_untrusted(q.to_wire(), NETS, 0.0, upstreams=UPSTREAMS)
    assert isinstance(fwd, Forward)
    # a fake upstream: answers the query it was sent
    upstream_q = dns.message.from_wire(fwd.query)
    upstream_r = dns.message.make_response(upstream_q)
    upstream_r.answer.append(dns.rrset.from_text("example.com.", 300, "IN", "A", "93.184.216.34"))
    answer = r.upstream_reply_untrusted(fwd, upstream_r.to_wire())
    assert answer is not None
    m = dns.message.from_wire(answer.response)
    assert m.id == q.id
    assert addresses(m) == ["93.184.216.34"]
    assert r.counters["forward_answered"] == 1


def test_forward_ignores_replies_that_do_not_match() -> None:
    r = make_resolver()
    fwd = ask(r, "example.com")
    assert isinstance(fwd, Forward)
    upstream_q = dns.message.from_wire(fwd.query)
    wrong_id = dns.message.make_response(upstream_q)
    wrong_id.id = (fwd.upstream_id + 1) & 0xFFFF
    other = dns.message.make_query("example.org", "A")
    other.id = fwd.upstream_id
    wrong_question = dns.message.make_response(other)
    for bad in (b"", b"\x00" * 5, wrong_id.to_wire(), wrong_question.to_wire(), fwd.query,
                fwd.query[:2] + b"\x80" + b"\xff" * 30):  # fmt: skip
        assert r.upstream_reply_untrusted(fwd, bad) is None
    failed = r.upstream_failed(fwd)
    m = dns.message.from_wire(failed.response)
    assert m.rcode() == dns.rcode.SERVFAIL
    assert m.id == fwd.client_id


def test_large_udp_answers_are_truncated_not_over_tcp() -> None:
    r = make_resolver(tasks=60)
    m = reply(ask(r, "tasks.web"))
    assert m.flags & dns.flags.TC
    assert m.answer == []
    assert r.counters["truncated"] == 1
    m = reply(ask(r, "tasks.web", tcp=True))
    assert len(addresses(m)) == 60


def test_edns_buffer_size_is_honoured() -> None:
    r = make_resolver(tasks=60)
    q = dns.message.make_query("tasks.web", "A", use_edns=0, payload=4096)
    m = reply(r.handle_untrusted(q.to_wire(), NETS, 0.0))
    assert not m.flags & dns.flags.TC
    assert len(addresses(m)) == 60


# ----------------------------------------------------------------------------- malformed


def test_short_and_response_messages_are_dropped() -> None:
    r = make_resolver()
    assert isinstance(r.handle_untrusted(b"\x12\x34", NETS, 0.0), Drop)
    response = dns.message.make_response(dns.message.make_query("web", "A")).to_wire()
    assert isinstance(r.handle_untrusted(response, NETS, 0.0), Drop)
    assert r.counters["malformed"] == 2


def test_bad_body_is_formerr() -> None:
    r = make_resolver()
    wire = dns.message.make_query("web", "A").to_wire()
    for bad in (wire[:-3], wire + b"junk", wire[:4] + b"\x00\x02" + wire[6:]):
        result = r.handle_untrusted(bad, NETS, 0.0)
        assert isinstance(result, Answer)
        assert result.rcode == dns.rcode.FORMERR
        m = dns.message.from_wire(result.response)
        assert m.id == struct.unpack("!H", wire[:2])[0]
        assert m.flags & dns.flags.QR
    assert r.counters["malformed"] == 3


def test_other_opcodes_are_notimp() -> None:
    q = dns.message.make_query("web", "A")
    q.set_opcode(dns.opcode.STATUS)
    result = make_resolver().handle_untrusted(q.to_wire(), NETS, 0.0)
    assert isinstance(result, Answer)
    assert result.rcode == dns.rcode.NOTIMP


@settings(max_examples=400)
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_never_raises(data: bytes, tcp: bool) -> None:
    result = make_resolver().handle_untrusted(data, NETS, 0.0, tcp=tcp, upstreams=UPSTREAMS)
    assert isinstance(result, Answer | Forward | Drop)


_QUERY = dns.message.make_query("tasks.web", "A", use_edns=0).to_wire()


@settings(max_examples=400)
@given(st.binary(min_size=1, max_size=40), st.integers(0, len(_QUERY) - 1))
def test_fuzz_mutated_queries(noise: bytes, at: int) -> None:
    data = bytearray(_QUERY)
    data[at : at + len(noise)] = noise
    r = make_resolver()
    result = r.handle_untrusted(bytes(data), NETS, 0.0, upstreams=UPSTREAMS)
    assert isinstance(result, Answer | Forward | Drop)
    if isinstance(result, Forward):  # our own query is not a reply to it
        assert r.upstream_reply_untrusted(result, bytes(data)) is None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzz_upstream_replies(data: bytes) -> None:
    r = make_resolver()
    fwd = ask(r, "example.com")
    assert isinstance(fwd, Forward)
    answer = r.upstream_reply_untrusted(fwd, fwd.query[:2] + data)
    assert answer is None or isinstance(answer, Answer)


@pytest.mark.parametrize("name", ["", ".", "a" * 63 + ".com"])
def test_odd_names(name: str) -> None:
    assert isinstance(ask(make_resolver(), name or "."), Answer | Forward)

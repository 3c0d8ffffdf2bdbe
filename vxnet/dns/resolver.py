"""The embedded DNS resolver (Docker's 127.0.0.11), sans-IO.

:meth:`Resolver.handle_untrusted` takes one query message and the asking container's networks
and returns what to do, never raising:

* :class:`Answer` -- send these bytes back (our own names, and every error we answer);
* :class:`Forward` -- not our name: send ``Forward.query`` to the upstreams, one after the
  other, each for ``Forward.timeout`` seconds.  Feed every reply to
  :meth:`Resolver.upstream_reply_untrusted` (an :class:`Answer` to relay, or None: not the
  reply, keep waiting); when every upstream failed, send :meth:`Resolver.upstream_failed`'s
  SERVFAIL;
* :class:`Drop` -- send nothing (fewer than 12 bytes, or a response rather than a query).

The rules, in order:

1. not a query (QR set) or shorter than a header -> dropped, counted ``malformed``;
2. opcode other than QUERY -> NOTIMP; QDCOUNT != 1, or a body that does not parse -> FORMERR
   (header-only replies, counted ``malformed``);
3. IN-class A/ANY for a name of the asker's networks -> NOERROR, authoritative, the addresses
   shuffled (``rng``), TTL 600; any other type for such a name -> NOERROR with no answer;
4. PTR for an ``in-addr.arpa`` address of the asker's networks -> ``<name>.<network>.`` (what
   Docker's ``Network.ResolveIP`` answers: the task/container name, or the service name for a VIP);
5. not ours, RD clear -> REFUSED (we are nobody's authority, and have no cache);
6. not ours, one label -> NXDOMAIN (authoritative: bare names are the cluster's);
7. anything else -> forwarded to at most 3 upstreams; none configured -> SERVFAIL at once.

UDP answers larger than the client's buffer (512, or its EDNS size, at most 4096) are sent
empty with TC set, so the client retries over TCP.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from vxnet.dns.records import Directory
from vxnet.errors import BadPacket

TTL = 600
FORWARD_TIMEOUT = 2.0
MAX_UPSTREAMS = 3
RESOLVER_IP = "127.0.0.11"
DNS_PORT = 53
UDP_MIN = 512
UDP_MAX = 4096
TCP_MAX = 65535

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_RD = 0x0100
_RA = 0x0080
_OPCODE_SHIFT = 11
_IN_ADDR_ARPA = dns.name.from_text("in-addr.arpa.")
_COUNTED_TYPES = frozenset({"A", "AAAA", "PTR", "SRV", "MX", "TXT", "CNAME", "NS", "SOA", "ANY"})

Upstream = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``response`` to the client."""

    response: bytes
    rcode: int


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay ``query`` (the client's, with a fresh id) to ``upstreams``, in order."""

    query: bytes
    upstreams: tuple[Upstream, ...]
    timeout: float  # per upstream
    deadline: float  # ``now`` + every upstream's timeout
    tcp: bool  # the client asked over TCP: forward over TCP too
    upstream_id: int
    client_id: int
    question: tuple[dns.name.Name, int, int]  # (qname, qtype, qclass) the reply must echo
    servfail: bytes  # the answer when every upstream failed


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing."""

    reason: str


Result = Answer | Forward | Drop


class Resolver:
    """Answers from a :class:`Directory`, forwards the rest.  One may serve many containers."""

    def __init__(
        self,
        directory: Directory,
        rng: random.Random,
        *,
        ttl: int = TTL,
        forward_timeout: float = FORWARD_TIMEOUT,
    ) -> None:
        self.directory = directory
        self.rng = rng
        self.ttl = ttl
        self.forward_timeout = forward_timeout
        self.counters: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # ------------------------------------------------------------------ queries

    def handle_untrusted(
        self,
        query: bytes,
        networks: Sequence[str],
        now: float,
        *,
        tcp: bool = False,
        upstreams: Sequence[Upstream] = (),
    ) -> Result:
        """Decide what to do with one query message from a container on ``networks``."""
        self.count("queries")
        if len(query) < _HEADER.size:
            return self._drop("short")
        qid, flags, qdcount = _HEADER.unpack_from(query)[:3]
        if flags & _QR:
            return self._drop("not_a_query")
        if (flags >> _OPCODE_SHIFT) & 0xF != dns.opcode.QUERY:
            return self._header_only(qid, flags, dns.rcode.NOTIMP, "notimp")
        if qdcount != 1:
            return self._header_only(qid, flags, dns.rcode.FORMERR, "formerr", "qdcount")
        try:
            message = _parse_query_untrusted(query)
        except BadPacket as exc:
            return self._header_only(qid, flags, dns.rcode.FORMERR, "formerr", exc.reason)
        question = message.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.count(f"qtype:{qtype if qtype in _COUNTED_TYPES else 'other'}")
        local = self._answer_local(message, question, networks, tcp)
        if local is not None:
            return local
        if not message.flags & dns.flags.RD:
            return self._reply(message, dns.rcode.REFUSED, tcp, "refused")
        if len(question.name.labels) == 2:  # one label and the root
            return self._reply(message, dns.rcode.NXDOMAIN, tcp, "nxdomain", authoritative=True)
        return self._forward(message, question, query, now, tcp, upstreams)

    def _answer_local(
        self, message: dns.message.Message, question: dns.rrset.RRset, networks: Sequence[str],
        tcp: bool,
    ) -> Answer | None:  # fmt: skip
        if question.rdclass != dns.rdataclass.IN:
            return None
        name = question.name
        if question.rdtype == dns.rdatatype.PTR and name.is_subdomain(_IN_ADDR_ARPA):
            address = _ptr_address(name)
            targets = None if address is None else self.directory.lookup_ptr(networks, address)
            if not targets:
                return None
            records = [t + "." for t in targets]
            return self._reply(message, dns.rcode.NOERROR, tcp, "answered", True, records)
        addresses = self.directory.lookup_a(networks, name.to_text(omit_final_dot=True))
        if addresses is None:
            return None
        if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.ANY):
            return self._reply(message, dns.rcode.NOERROR, tcp, "answered", authoritative=True)
        shuffled = [str(a) for a in addresses]
        self.rng.shuffle(shuffled)
        return self._reply(message, dns.rcode.NOERROR, tcp, "answered", True, shuffled)

    def _forward(
        self, message: dns.message.Message, question: dns.rrset.RRset, query: bytes, now: float,
        tcp: bool, upstreams: Sequence[Upstream],
    ) -> Answer | Forward:  # fmt: skip
        usable = tuple(u for u in upstreams if u != (RESOLVER_IP, DNS_PORT))[:MAX_UPSTREAMS]
        servfail = self._reply(message, dns.rcode.SERVFAIL, tcp, "")
        if not usable:
            self.count("servfail")
            self.count("servfail:no_upstream")
            return servfail
        self.count("forwarded")
        upstream_id = self.rng.randrange(0x10000)
        return Forward(
            query=struct.pack("!H", upstream_id) + query[2:],
            upstreams=usable,
            timeout=self.forward_timeout,
            deadline=now + self.forward_timeout * len(usable),
            tcp=tcp,
            upstream_id=upstream_id,
            client_id=message.id,
            question=(question.name, question.rdtype, question.rdclass),
            servfail=servfail.response,
        )

    # ---------------------------------------------------------------- forwarding

    def upstream_reply_untrusted(self, forward: Forward, reply: bytes) -> Answer | None:
        """The client's answer from an upstream's ``reply``, or None if it is not the reply."""
        if len(reply) < _HEADER.size:
            self.count("upstream_bad_reply")
            return None
        reply_id, flags = struct.unpack_from("!HH", reply)
        if reply_id != forward.upstream_id or not flags & _QR:
            self.count("upstream_mismatch")
            return None
        try:
            parsed = _parse_untrusted(reply, question_only=True)
        except BadPacket:
            self.count("upstream_bad_reply")
            return None
        if len(parsed.question) != 1 or _question(parsed.question[0]) != forward.question:
            self.count("upstream_mismatch")
            return None
        self.count("forward_answered")
        return Answer(struct.pack("!H", forward.client_id) + reply[2:], flags & 0xF)

    def upstream_failed(self, forward: Forward) -> Answer:
        """Every upstream timed out, refused or sent garbage: SERVFAIL to the client."""
        self.count("servfail")
        self.count("servfail:upstream")
        return Answer(forward.servfail, dns.rcode.SERVFAIL)

    # ---------------------------------------------------------------- replies

    def _drop(self, reason: str) -> Drop:
        self.count("malformed")
        self.count(f"malformed:{reason}")
        return Drop(reason)

    def _header_only(
        self, qid: int, flags: int, rcode: int, counter: str, reason: str = ""
    ) -> Answer:
        self.count(counter)
        if reason:
            self.count("malformed")
            self.count(f"malformed:{reason}")
        out_flags = _QR | _RA | (flags & (0xF << _OPCODE_SHIFT)) | (flags & _RD) | rcode
        return Answer(_HEADER.pack(qid, out_flags, 0, 0, 0, 0), rcode)

    def _reply(
        self,
        query: dns.message.Message,
        rcode: dns.rcode.Rcode,
        tcp: bool,
        counter: str,
        authoritative: bool = False,
        answers: Sequence[str] = (),
    ) -> Answer:
        if counter:
            self.count(counter)
        response = dns.message.make_response(query, recursion_available=True, our_payload=UDP_MAX)
        response.set_rcode(rcode)
        if authoritative:
            response.flags |= dns.flags.AA
        if answers:
            q = query.question[0]
            rdtype = dns.rdatatype.PTR if q.rdtype == dns.rdatatype.PTR else dns.rdatatype.A
            rrset = dns.rrset.from_text_list(q.name, self.ttl, dns.rdataclass.IN, rdtype, answers)
            response.answer.append(rrset)
        limit = TCP_MAX if tcp else min(max(UDP_MIN, query.payload), UDP_MAX)
        wire = response.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)
        if _HEADER.unpack_from(wire)[1] & dns.flags.TC:
            self.count("truncated")
        return Answer(wire, rcode)


# ----------------------------------------------------------------------------- parsing


def _parse_query_untrusted(data: bytes) -> dns.message.Message:
    message = _parse_untrusted(data)
    if len(message.question) != 1:
        raise BadPacket("dns_bad_question")
    return message


def _parse_untrusted(data: bytes, question_only: bool = False) -> dns.message.Message:
    """dnspython's parse, its many exceptions folded into :class:`BadPacket`."""
    try:
        return dns.message.from_wire(data, question_only=question_only)
    except dns.exception.DNSException as exc:
        raise BadPacket("dns_" + type(exc).__name__.lower()) from None
    except (ValueError, UnicodeError, IndexError, struct.error) as exc:
        raise BadPacket("dns_unparsable", type(exc).__name__) from None


def _question(rrset: dns.rrset.RRset) -> tuple[dns.name.Name, int, int]:
    return (rrset.name, rrset.rdtype, rrset.rdclass)


def _ptr_address(name: dns.name.Name) -> IPv4Address | None:
    """The address of ``d.c.b.a.in-addr.arpa.``, None for anything else under in-addr.arpa."""
    labels = name.relativize(_IN_ADDR_ARPA).labels
    if len(labels) != 4:
        return None
    try:
        return IPv4Address(b".".join(reversed(labels)).decode("ascii"))
    except (AddressValueError, UnicodeDecodeError):
        return None

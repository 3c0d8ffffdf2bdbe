"""Exercises that check themselves: the ``[[check]]`` tables of a lab file, parsed and graded.

A lab file may end with checks that a teacher runs on a learner's finished lab
(``vxnet lab validate FILE``: exit 0 all passed, 1 one failed, 2 a check could not run)::

    [[check]]
    kind = "ping"                    # what to look at (the table KINDS below lists them)
    name = "client reaches web"      # optional: the line in the report
    from = "client"                  # the kind's own keys
    to = "web"
    message = "Is web's address in h2's FDB? `vxnet -H h2 fdb show`"  # shown when it fails
    hint = "Proxy ARP answers from the neighbour table: no entry, no ARP reply."
    wait = 5                         # optional: retry for up to 5 s before failing

Values may name lab objects in braces: ``{h2}`` is host h2's underlay address, ``{web}`` the
overlay address of container web, ``{svc}`` the (first) VIP of service svc.

This module is the pure half: :func:`parse_checks` turns the raw tables into frozen records or
raises :class:`UsageError` with a reason, and :func:`render_table` / :func:`report_json` print
results.  Running them against a live lab is :mod:`vxnet.lab.probes`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from vxnet.errors import UsageError

Status = Literal["pass", "fail", "error"]
MAX_WAIT = 300.0
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_COUNTER = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)?$")
COMMON_KEYS = frozenset({"kind", "name", "message", "hint", "wait"})


# ------------------------------------------------------------------------- the probes


@dataclass(frozen=True, slots=True)
class Source:
    """Where a request starts: a container, a host's namespace, or a client outside the swarm."""

    where: Literal["container", "host", "outside"]
    name: str = ""  # container or host name; "" outside

    def __str__(self) -> str:
        return {"container": self.name, "host": f"host {self.name}", "outside": "outside"}[
            self.where
        ]


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping`` from container ``source`` to ``target``: reachable or not."""

    source: str
    target: str
    expect: Literal["reachable", "unreachable"] = "reachable"
    count: int = 2
    size: int | None = None  # ICMP payload bytes (ping -s); +28 is the IP packet
    dont_fragment: bool = False  # ping -M do


@dataclass(frozen=True, slots=True)
class Http:
    """``curl URL``: the status, a piece of the body, answers from several backends."""

    source: Source
    url: str
    status: int = 200
    body: str | None = None
    backends: int = 0  # >0: repeat until this many different whoami `Hostname:`s answered


@dataclass(frozen=True, slots=True)
class Dns:
    """``dig @127.0.0.11 QUERY`` in a container: answers, how many, which, or NXDOMAIN."""

    source: str
    query: str
    rtype: str = "A"
    expect: Literal["answer", "nxdomain"] = "answer"
    count: int | None = None
    answers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Wire:
    """While ``source`` pings ``target``, what the fabric carries: ESP only, or VXLAN."""

    source: str
    target: str
    network: str | None = None  # default: the source container's network
    expect: Literal["esp", "vxlan"] = "esp"


@dataclass(frozen=True, slots=True)
class Rotation:
    """The ESP SPIs on the wire between ``source`` and ``target`` change within ``within`` s."""

    source: str
    target: str
    within: float = 20.0


@dataclass(frozen=True, slots=True)
class Member:
    """Gossip: every host of ``viewers`` (default: all others) sees ``member`` in ``state``."""

    member: str
    state: Literal["alive", "suspect", "dead", "left"] = "alive"
    viewers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    """A swarm service: its running tasks, endpoint mode and published port."""

    service: str
    running: int | None = None  # default: as many as desired
    endpoint_mode: Literal["vip", "dnsrr"] | None = None
    published: int | None = None


@dataclass(frozen=True, slots=True)
class Fdb:
    """Host ``host`` has (or has not) an FDB entry for a container or an address."""

    host: str
    container: str | None = None
    ip: str | None = None
    network: str | None = None
    vtep: str | None = None  # a host name or an address; default the container's host
    expect: Literal["present", "absent"] = "present"


@dataclass(frozen=True, slots=True)
class Counter:
    """A dataplane counter of ``host`` (per network, or global) is within ``[min, max]``."""

    host: str
    counter: str  # e.g. "rx_frames", "esp_tx", "drops.too_big"
    network: str | None = None
    min: int = 1
    max: int | None = None


Probe = Ping | Http | Dns | Wire | Rotation | Member | Service | Fdb | Counter


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    kind: str
    probe: Probe
    message: str
    hint: str = ""
    wait: float = 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt of a probe: did it see what the check expects, and what it saw."""

    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    check: Check
    status: Status
    detail: str
    seconds: float


# ------------------------------------------------------------------------------ fields


class _Row:
    """One ``[[check]]`` table, read key by key with the reason of any bad value."""

    def __init__(self, table: dict[str, Any], where: str, allowed: frozenset[str]) -> None:
        unknown = sorted(set(table) - allowed - COMMON_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown keys {unknown} (this kind takes {sorted(allowed)})")
        self.t = table
        self.where = where

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.t.get(key, default)
        if value is None:
            if required:
                raise UsageError(f"{self.where}: missing {key!r}")
            return None
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{self.where}: {key!r} must be a non-empty string")
        _check_placeholders(value, f"{self.where}: {key!r}")
        return value

    def need(self, key: str) -> str:
        value = self.text(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self.t.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise UsageError(f"{self.where}: {key!r} must be a whole number {lo}-{hi}")
        return value

    def number(self, key: str, lo: float, hi: float, default: float) -> float:
        value = self.t.get(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise UsageError(f"{self.where}: {key!r} must be a number of seconds {lo:g}-{hi:g}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.t.get(key, default)
        if not isinstance(value, bool):
            raise UsageError(f"{self.where}: {key!r} must be true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> Any:
        value = self.t.get(key, default)
        if value is None:
            return None
        if value not in choices:
            raise UsageError(f"{self.where}: {key!r} must be one of {', '.join(choices)}")
        return value

    def texts(self, key: str) -> tuple[str, ...] | None:
        value = self.t.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UsageError(f"{self.where}: {key!r} must be a list of strings")
        for v in value:
            _check_placeholders(v, f"{self.where}: {key!r}")
        return tuple(value)


def _check_placeholders(text: str, where: str) -> None:
    if _PLACEHOLDER.sub("", text).count("{") or _PLACEHOLDER.sub("", text).count("}"):
        raise UsageError(f"{where}: unbalanced braces in {text!r} (use {{name}})")
    for name in _PLACEHOLDER.findall(text):
        if not _PLACEHOLDER_NAME.match(name):
            raise UsageError(f"{where}: {{{name}}} must name a host, container or service")


def placeholders(text: str) -> list[str]:
    """The names in braces: ``placeholders("http://{h2}:8080/") == ["h2"]``."""
    return _PLACEHOLDER.findall(text)


def substitute(text: str, resolve: Callable[[str], str]) -> str:
    """``text`` with every ``{name}`` replaced by ``resolve(name)``."""
    return _PLACEHOLDER.sub(lambda m: resolve(m.group(1)), text)


# ------------------------------------------------------------------------ the parsers


def _ping(r: _Row) -> Ping:
    return Ping(
        r.need("from"),
        r.need("to"),
        r.choice("expect", ("reachable", "unreachable"), "reachable"),
        r.integer("count", 1, 20, 2) or 2,
        r.integer("size", 0, 65507),
        r.flag("dont_fragment", False),
    )


def _source(r: _Row) -> Source:
    given = [k for k in ("from", "from_host", "from_outside") if k in r.t]
    if len(given) != 1:
        raise UsageError(
            f"{r.where}: say where the request starts: from, from_host or from_outside"
        )
    if given == ["from_outside"]:
        if r.flag("from_outside", True) is not True:
            raise UsageError(f"{r.where}: from_outside must be true (or left out)")
        return Source("outside")
    return Source("container" if given == ["from"] else "host", r.need(given[0]))


def _http(r: _Row) -> Http:
    url = r.need("url")
    if not url.startswith("http://"):
        raise UsageError(f"{r.where}: url must start with http://")
    return Http(
        _source(r),
        url,
        r.integer("status", 100, 599, 200) or 200,
        r.text("body"),
        r.integer("backends", 0, 64, 0) or 0,
    )


def _dns(r: _Row) -> Dns:
    query = r.need("query")
    if placeholders(query):
        raise UsageError(f"{r.where}: query is a DNS name, not a {{placeholder}}")
    probe = Dns(
        r.need("from"),
        query,
        r.choice("type", ("A", "AAAA", "PTR", "SRV"), "A"),
        r.choice("expect", ("answer", "nxdomain"), "answer"),
        r.integer("count", 0, 1000),
        r.texts("answers"),
    )
    if probe.expect == "nxdomain" and (probe.count or probe.answers):
        raise UsageError(f"{r.where}: expect = 'nxdomain' takes no count or answers")
    return probe


def _wire(r: _Row) -> Wire:
    return Wire(r.need("from"), r.need("to"), r.text("network"),
                r.choice("expect", ("esp", "vxlan"), "esp"))  # fmt: skip


def _rotation(r: _Row) -> Rotation:
    return Rotation(r.need("from"), r.need("to"), r.number("within", 1, MAX_WAIT, 20.0))


def _member(r: _Row) -> Member:
    if "host" in r.t and "hosts" in r.t:
        raise UsageError(f"{r.where}: give host or hosts, not both")
    viewers = (r.need("host"),) if "host" in r.t else r.texts("hosts") or ()
    state = r.choice("state", ("alive", "suspect", "dead", "left"), "alive")
    return Member(r.need("member"), state, viewers)


def _service(r: _Row) -> Service:
    return Service(
        r.need("service"),
        r.integer("running", 0, 10000),
        r.choice("endpoint_mode", ("vip", "dnsrr"), None),
        r.integer("published", 1, 65535),
    )


def _fdb(r: _Row) -> Fdb:
    probe = Fdb(
        r.need("host"),
        r.text("container"),
        r.text("ip"),
        r.text("network"),
        r.text("vtep"),
        r.choice("expect", ("present", "absent"), "present"),
    )
    if (probe.container is None) == (probe.ip is None):
        raise UsageError(f"{r.where}: name either a container or an ip")
    return probe


def _counter(r: _Row) -> Counter:
    name = r.need("counter")
    if not _COUNTER.match(name):
        raise UsageError(f"{r.where}: counter is a name like 'rx_frames' or 'drops.too_big'")
    top = r.integer("max", 0, 2**63)
    low = r.integer("min", 0, 2**63, 1 if top is None else 0) or 0  # by default: at least one
    probe = Counter(r.need("host"), name, r.text("network"), low, top)
    if probe.max is not None and probe.max < probe.min:
        raise UsageError(f"{r.where}: max is smaller than min")
    return probe


@dataclass(frozen=True, slots=True)
class Kind:
    keys: frozenset[str]
    parse: Callable[[_Row], Probe]
    title: Callable[[Any], str]  # the default name of a check of this kind
    message: str  # the default message when it fails


def _keys(*names: str) -> frozenset[str]:
    return frozenset(names)


KINDS: dict[str, Kind] = {
    "ping": Kind(
        _keys("from", "to", "expect", "count", "size", "dont_fragment"), _ping,
        lambda p: f"ping {p.source} -> {p.target}"
        + (f" ({p.size} B{', DF' if p.dont_fragment else ''})" if p.size is not None else "")
        + (" is refused" if p.expect == "unreachable" else ""),
        "Follow the frame: the sender's FDB (`vxnet -H HOST fdb show`), then the counters "
        "of both hosts (`vxnet -H HOST dataplane stats`).",
    ),
    "http": Kind(
        _keys("from", "from_host", "from_outside", "url", "status", "body", "backends"), _http,
        lambda p: f"curl {p.url} from {p.source}",
        "Is the service running (`vxnet service ps`), and its port published where you curl?",
    ),
    "dns": Kind(
        _keys("from", "query", "type", "expect", "count", "answers"), _dns,
        lambda p: f"dig {p.query} from {p.source}",
        "The resolver at 127.0.0.11 answers from gossip's endpoint_table: "
        "`vxnet gossip tables --network NET`.",
    ),
    "encrypted": Kind(
        _keys("from", "to", "network", "expect"), _wire,
        lambda p: f"{'ESP only' if p.expect == 'esp' else 'VXLAN'} on the wire, "
        f"{p.source} -> {p.target}",
        "Was the network created with --opt encrypted? `vxnet network inspect NET`.",
    ),
    "rotation": Kind(
        _keys("from", "to", "within"), _rotation,
        lambda p: f"ESP SPIs change ({p.source} -> {p.target}, within {p.within:g}s)",
        "Keys rotate every key_rotation_interval: `vxnet swarm inspect`, `vxnet swarm keys`.",
    ),
    "member": Kind(
        _keys("member", "state", "host", "hosts"), _member,
        lambda p: f"gossip: {p.member} is {p.state}"
        + (f" for {', '.join(p.viewers)}" if p.viewers else ""),
        "Each host's own view: `vxnet -H HOST gossip members`.",
    ),
    "service": Kind(
        _keys("service", "running", "endpoint_mode", "published"), _service,
        lambda p: f"service {p.service}" + (f": {p.running} running" if p.running else ""),
        "`vxnet service ps NAME` shows where its tasks run and why one is not running.",
    ),
    "fdb": Kind(
        _keys("host", "container", "ip", "network", "vtep", "expect"), _fdb,
        lambda p: f"{p.host}'s FDB {'has' if p.expect == 'present' else 'lacks'} "
        f"{p.container or p.ip}",
        "`vxnet -H HOST fdb show`: entries come from gossip (overlay_peer_table) or fdb add.",
    ),
    "counter": Kind(
        _keys("host", "counter", "network", "min", "max"), _counter,
        lambda p: f"{p.host} {p.network or 'global'} {p.counter}"
        + (f" >= {p.min}" if p.min or p.max is None else "")
        + (f" <= {p.max}" if p.max is not None else ""),
        "`vxnet -H HOST dataplane stats` shows every counter, drops by reason.",
    ),
}  # fmt: skip


def parse_checks(rows: object, source: str = "lab file") -> tuple[Check, ...]:
    """The ``check`` array of a lab file as :class:`Check` records; anything else: UsageError."""
    if rows is None:
        return ()
    if not isinstance(rows, list):
        raise UsageError(f"{source}: [[check]] must be an array of tables")
    checks = tuple(_parse_one(row, f"{source} check #{i}") for i, row in enumerate(rows, 1))
    seen: set[str] = set()
    for c in checks:
        if c.name in seen:
            raise UsageError(f"{source}: two checks are named {c.name!r}")
        seen.add(c.name)
    return checks


def _parse_one(table: object, where: str) -> Check:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: must be a table")
    kind_name = table.get("kind")
    if not isinstance(kind_name, str) or kind_name not in KINDS:
        raise UsageError(f"{where}: kind must be one of {', '.join(KINDS)}")
    kind = KINDS[kind_name]
    row = _Row(table, f"{where} ({kind_name})", kind.keys)
    probe = kind.parse(row)
    return Check(
        row.text("name") or kind.title(probe),
        kind_name,
        probe,
        row.text("message") or kind.message,
        row.text("hint") or "",
        row.number("wait", 0, MAX_WAIT, 0.0),
    )


# ----------------------------------------------------------------------------- reports

MARK = {"pass": "✓", "fail": "✗", "error": "!"}


def overall(results: list[CheckResult]) -> Status:
    statuses = {r.status for r in results}
    return "error" if "error" in statuses else "fail" if "fail" in statuses else "pass"


def exit_code(results: list[CheckResult]) -> int:
    """0 every check passed, 1 one failed, 2 one could not be run (a teacher's grading rule)."""
    return {"pass": 0, "fail": 1, "error": 2}[overall(results)]


def render_table(lab: str, results: list[CheckResult]) -> list[str]:
    """The report a learner reads: a mark per check, what was seen, and help where it failed."""
    width = max([len(r.check.name) for r in results] + [5])
    lines = [f"lab {lab}: {len(results)} checks"]
    for r in results:
        lines.append(f"  {MARK[r.status]} {r.check.name.ljust(width)}  {r.detail}".rstrip())
        if r.status != "pass":
            lines.append(f"      -> {r.check.message}")
            if r.check.hint:
                lines.append(f"      hint: {r.check.hint}")
    count = {s: sum(1 for r in results if r.status == s) for s in ("pass", "fail", "error")}
    lines.append(f"{count['pass']} passed, {count['fail']} failed, {count['error']} errors")
    return lines


def report_json(lab: str, results: list[CheckResult]) -> dict[str, Any]:
    return {
        "lab": lab,
        "status": overall(results),
        "exit_code": exit_code(results),
        "checks": [
            {"name": r.check.name, "kind": r.check.kind, "status": r.status, "detail": r.detail,
             "message": r.check.message, "hint": r.check.hint, "seconds": round(r.seconds, 2)}
            for r in results
        ],
    }  # fmt: skip

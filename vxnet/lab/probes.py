"""Running a lab file's checks against a live lab: the I/O half of :mod:`vxnet.lab.validate`.

Every probe looks through the same windows a learner has: ``vxnet exec`` (ping, curl, dig in a
container's namespace), the daemons' HTTP API (FDB, gossip members, counters, services) and a
capture on the fabric.  Nothing waits without a bound: API calls time out after
:data:`API_TIMEOUT` seconds, every command has a timeout, and a check's ``wait`` caps its retries.

A probe that sees the wrong thing returns ``Outcome(ok=False)`` or raises :class:`Failed` (or
:class:`~vxnet.errors.NotFound`: the container the check names is not there).  Anything else
vxnet raises means the check could not run at all: status ``error``.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vxnet import netns
from vxnet.capture import finish_capture, start_capture
from vxnet.client import DaemonClient
from vxnet.errors import BadPacket, NotFound, VxnetError
from vxnet.lab import Lab, builder
from vxnet.lab.validate import (
    Check,
    CheckResult,
    Counter,
    Dns,
    Fdb,
    Http,
    Member,
    Outcome,
    Ping,
    Probe,
    Rotation,
    Service,
    Source,
    Wire,
    substitute,
)
from vxnet.wire import (
    ETH_P_IP,
    IPPROTO_UDP,
    decode_ethernet_untrusted,
    decode_ipv4_untrusted,
    decode_udp_untrusted,
    decode_vxlan_untrusted,
)

API_TIMEOUT = 5.0
IPPROTO_ESP = 50
OUTSIDE_SUFFIX = "check"  # the outside client's namespace: vx-<lab>-xcheck
WIRE_SECONDS = 2.0  # how long a capture listens while its ping runs
RETRY_PAUSE = 0.5


class Failed(VxnetError):
    """The probe ran and saw something else than the check expects (the message says what)."""


# --------------------------------------------------------------------------- the wire


@dataclass(frozen=True, slots=True)
class Underlay:
    """What one fabric frame is: ESP (``ident`` = SPI) or VXLAN (``ident`` = VNI)."""

    kind: str  # "esp" or "vxlan"
    src: str
    dst: str
    ident: int


def classify_untrusted(frame: bytes, data_port: int) -> Underlay | None:
    """ESP or VXLAN (to ``data_port``) in an underlay frame; None for anything else.

    Raises only :class:`BadPacket`, like every decoder of wire bytes.
    """
    eth = decode_ethernet_untrusted(frame)
    if eth.ethertype != ETH_P_IP:
        return None
    ip = decode_ipv4_untrusted(eth.payload)
    if ip.proto == IPPROTO_ESP:
        if len(ip.payload) < 8:
            raise BadPacket("esp_truncated", f"{len(ip.payload)} bytes")
        return Underlay("esp", str(ip.src), str(ip.dst), int.from_bytes(ip.payload[:4], "big"))
    if ip.proto != IPPROTO_UDP:
        return None
    udp = decode_udp_untrusted(ip.payload)
    if udp.dport != data_port:
        return None
    vx = decode_vxlan_untrusted(udp.payload)
    return Underlay("vxlan", str(ip.src), str(ip.dst), vx.vni)


@dataclass(slots=True)
class Tally:
    """Frames between two VTEPs: ESP packets with their SPIs, VXLAN frames of one VNI."""

    esp: int = 0
    spis: set[int] = field(default_factory=set)
    vxlan: int = 0
    undecodable: int = 0


def tally(frames: Iterable[bytes], data_port: int, vni: int, vteps: set[str]) -> Tally:
    out = Tally()
    for frame in frames:
        try:
            seen = classify_untrusted(frame, data_port)
        except BadPacket:
            out.undecodable += 1
            continue
        if seen is None or {seen.src, seen.dst} != vteps:
            continue
        if seen.kind == "esp":
            out.esp += 1
            out.spis.add(seen.ident)
        elif seen.ident == vni:
            out.vxlan += 1
    return out


# ------------------------------------------------------------------------ the live lab


class LiveLab:
    """The views of a running lab the probes need, each bounded in time."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def client(self, host: str) -> DaemonClient:
        if host not in self.lab.state["hosts"]:
            raise VxnetError(f"lab {self.lab.name} has no host {host!r} (the check names it)")
        return self.lab.client(host, timeout=API_TIMEOUT)

    def manager(self) -> DaemonClient:
        if not self.lab.swarm:
            raise VxnetError(f"lab {self.lab.name} runs no swarm: this check needs a manager")
        return self.client(self.lab.state["swarm"]["manager"])

    def containers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for host in self.lab.hosts:
            for c in self.client(host).get("/containers"):
                out[c["name"]] = dict(c, host=host)
        return out

    def container(self, name: str) -> dict[str, Any]:
        c = self.containers().get(name)
        if c is None:
            raise NotFound(f"no container {name!r} in lab {self.lab.name}")
        return c

    def resolve(self, name: str) -> str:
        """A host's underlay address, a container's overlay address, or a service's VIP."""
        if name in self.lab.state["hosts"]:
            return self.lab.host_address(name)
        c = self.containers().get(name)
        if c is not None:
            return str(c["ip"])
        if self.lab.swarm:
            svc = next((s for s in self.manager().get("/services") if s["name"] == name), None)
            if svc is not None and svc["vips"]:
                ingress = {n["id"] for n in self.manager().get("/swarm/networks") if n["ingress"]}
                # its own network's VIP (what `dig NAME` answers), ingress's only if it has no other
                vips = sorted(svc["vips"].items(), key=lambda kv: kv[0] in ingress)
                return str(vips[0][1])
        raise NotFound(f"no host, container or service (with a VIP) named {name!r} in the lab")

    def address(self, text: str) -> str:
        """A literal IPv4 address, ``{placeholders}`` filled in, or a name to resolve."""
        text = substitute(text, self.resolve)
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            return self.resolve(text)

    def namespace(self, source: Source) -> str:
        if source.where == "container":
            return str(self.container(source.name)["netns"])
        if source.where == "host":
            self.client(source.name)  # checks the name
            return self.lab.host_netns(source.name)
        return self.outside()

    def outside(self) -> str:
        """A client on the fabric, outside the swarm (made once, removed by ``lab down``)."""
        ns = f"{builder.prefix(self.lab.name)}x{OUTSIDE_SUFFIX}"
        if netns.exists(ns):
            return ns
        return self.lab.add_fabric_namespace(OUTSIDE_SUFFIX, outside_address(self.lab.state))

    def run(
        self, source: Source, argv: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns.exec_argv(self.namespace(source), argv),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip


def outside_address(state: dict[str, Any]) -> str:
    """The highest underlay address no host uses (a /24 gives .254)."""
    subnet = ipaddress.IPv4Network(state["underlay"]["subnet"])
    used = {h["address"] for h in state["hosts"].values()}
    for offset in range(2, subnet.num_addresses - 1):
        candidate = str(subnet.broadcast_address - offset + 1)
        if candidate not in used:
            return candidate
    raise VxnetError(f"no free address left in the underlay {subnet} for an outside client")


# ------------------------------------------------------------------------------ probes

_RECEIVED = re.compile(r"(\d+) (?:packets )?received")


def probe_ping(live: LiveLab, p: Ping) -> Outcome:
    ip = live.address(p.target)
    argv = ["ping", "-n", "-c", str(p.count), "-i", "0.2", "-W", "2"]
    argv += ["-M", "do"] if p.dont_fragment else []
    argv += ["-s", str(p.size)] if p.size is not None else []
    r = live.run(Source("container", p.source), [*argv, ip], timeout=p.count * 2.5 + 5)
    m = _RECEIVED.search(r.stdout)
    received = int(m.group(1)) if m else 0
    why = r.stderr.strip().splitlines()[:1]
    detail = f"{received}/{p.count} replies from {ip}" + (f" ({why[0]})" if why else "")
    return Outcome(received > 0 if p.expect == "reachable" else received == 0, detail)


def probe_http(live: LiveLab, p: Http) -> Outcome:
    url = substitute(p.url, live.resolve)
    argv = ["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url]
    hostnames: set[str] = set()
    status = 0
    for _ in range(max(1, 4 * p.backends)):
        r = live.run(p.source, argv, timeout=10)
        if r.returncode != 0:
            raise Failed(
                f"{url} from {p.source}: {r.stderr.strip() or f'curl exit {r.returncode}'}"
            )
        body, _, code = r.stdout.rpartition("\n")
        status = int(code) if code.isdigit() else 0
        if status != p.status:
            return Outcome(False, f"{url}: HTTP {status}, expected {p.status}")
        if p.body is not None and p.body not in body:
            return Outcome(False, f"{url}: HTTP {status}, the body has no {p.body!r}")
        hostnames |= {ln[10:] for ln in body.splitlines() if ln.startswith("Hostname: ")}
        if len(hostnames) >= p.backends:
            break
    who = f", answered by {', '.join(sorted(hostnames))}" if hostnames else ""
    if len(hostnames) < p.backends:
        return Outcome(False, f"HTTP {status}{who}: {p.backends} different backends expected")
    return Outcome(True, f"HTTP {status}{who}")


def parse_dig(text: str, rtype: str) -> tuple[str | None, list[str]]:
    """The status (NOERROR, NXDOMAIN, ...) and the ``rtype`` answers of dig's output."""
    m = re.search(r"status: ([A-Z]+)", text)
    answers: list[str] = []
    in_answer = False
    for line in text.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            in_answer = True
        elif in_answer and not line.strip():
            in_answer = False
        elif in_answer:
            fields = line.split()
            if len(fields) >= 5 and fields[3] == rtype:
                answers.append(" ".join(fields[4:]))
    return (m.group(1) if m else None), answers


def probe_dns(live: LiveLab, p: Dns) -> Outcome:
    argv = ["dig", "@127.0.0.11", "+time=2", "+tries=1", p.query, p.rtype]
    r = live.run(Source("container", p.source), argv, timeout=8)
    status, answers = parse_dig(r.stdout, p.rtype)
    if status is None:
        last = (r.stdout.strip().splitlines() or [r.stderr.strip()])[-1]
        return Outcome(False, f"{p.query}: no answer from 127.0.0.11 ({last})")
    detail = f"{p.query}: {status}" + (f" {' '.join(sorted(answers))}" if answers else "")
    if p.expect == "nxdomain":
        return Outcome(status == "NXDOMAIN", detail)
    ok = status == "NOERROR" and (len(answers) == p.count if p.count is not None else bool(answers))
    if p.count is not None and len(answers) != p.count:
        detail += f" ({len(answers)} answers, {p.count} expected)"
    if p.answers is not None:
        want = {substitute(a, live.resolve) for a in p.answers}
        ok = ok and set(answers) == want
        detail += "" if set(answers) == want else f" (expected {' '.join(sorted(want))})"
    return Outcome(ok, detail)


def watch_wire(live: LiveLab, source: str, target: str, network: str | None) -> tuple[Tally, str]:
    """Ping ``target`` from ``source`` while listening on the source host's fabric port."""
    src, dst = live.container(source), live.container(target)
    if src["host"] == dst["host"]:
        raise Failed(f"{source} and {target} both run on {src['host']}: nothing crosses the wire")
    net = network or src["network"]
    vnis = {n["name"]: n["vni"] for n in live.client(src["host"]).get("/networks")}
    if net not in vnis:
        raise Failed(f"{src['host']} has no network {net!r}")
    dst_ip = next((e["ip"] for e in dst["endpoints"] if e["network"] == net), None)
    if dst_ip is None:
        raise Failed(f"{target} is not on network {net}")
    h = live.lab.state["hosts"][src["host"]]
    port = h.get("data_port") or h["fabric_port"]  # the host's veth on the data bridge, if any
    proc = start_capture(
        live.lab.fabric_netns, port, count=500, timeout=WIRE_SECONDS, udp_port=None
    )
    try:
        argv = ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", dst_ip]
        ping = live.run(Source("container", source), argv, timeout=10)
    finally:
        frames = finish_capture(proc, WIRE_SECONDS)
    m = _RECEIVED.search(ping.stdout)
    vteps = {live.lab.data_address(src["host"]), live.lab.data_address(dst["host"])}
    seen = tally(frames, int(live.lab.state["data_port"]), vnis[net], vteps)
    where = f"{src['host']} <-> {dst['host']}, {net} VNI {vnis[net]}"
    return seen, f"{where}, ping {m.group(1) if m else 0}/3"


def _spis(spis: set[int]) -> str:
    return ", ".join(f"0x{s:08x}" for s in sorted(spis)) or "none"


def probe_wire(live: LiveLab, p: Wire) -> Outcome:
    seen, where = watch_wire(live, p.source, p.target, p.network)
    if p.expect == "esp":
        detail = f"{seen.esp} ESP (SPI {_spis(seen.spis)}), {seen.vxlan} VXLAN in the clear"
        return Outcome(seen.esp > 0 and seen.vxlan == 0, f"{detail}; {where}")
    return Outcome(seen.vxlan > 0, f"{seen.vxlan} VXLAN frames, {seen.esp} ESP; {where}")


def probe_rotation(live: LiveLab, p: Rotation) -> Outcome:
    first, where = watch_wire(live, p.source, p.target, None)
    if not first.spis:
        raise Failed(f"no ESP on the wire ({where}): is the network encrypted?")
    t0 = time.monotonic()
    while time.monotonic() - t0 < p.within:
        now, _ = watch_wire(live, p.source, p.target, None)
        if now.spis - first.spis:
            took = time.monotonic() - t0
            return Outcome(True, f"SPIs {_spis(first.spis)} -> {_spis(now.spis)} in {took:.1f}s")
    return Outcome(False, f"SPIs still {_spis(first.spis)} after {p.within:g}s")


def probe_member(live: LiveLab, p: Member) -> Outcome:
    live.client(p.member)  # a host of this lab?
    addr = live.lab.host_address(p.member)
    viewers = p.viewers or tuple(h for h in live.lab.hosts if h != p.member)
    views = {}
    for host in viewers:
        states = {m["state"] for m in live.client(host).get("/gossip")["members"]
                  if m["addr"] == addr}  # fmt: skip
        views[host] = "/".join(sorted(states)) or "not a member"
    detail = ", ".join(f"{h} sees {p.member} {s}" for h, s in views.items())
    return Outcome(all(s == p.state for s in views.values()), detail)


def probe_service(live: LiveLab, p: Service) -> Outcome:
    svc = next((s for s in live.manager().get("/services") if s["name"] == p.service), None)
    if svc is None:
        raise Failed(f"no service {p.service!r} (`vxnet service ls`)")
    want = svc["desired"] if p.running is None else p.running
    ok = svc["running"] == want
    parts = [f"{svc['running']} of {svc['desired']} tasks running"]
    if p.endpoint_mode is not None:
        ok &= svc["endpoint_mode"] == p.endpoint_mode
        parts.append(f"endpoint mode {svc['endpoint_mode']}")
    if p.published is not None:
        ports = [pt["published"] for pt in svc["ports"]]
        ok &= p.published in ports
        parts.append(f"published {', '.join(map(str, ports)) or 'nothing'}")
    return Outcome(ok, ", ".join(parts))


def probe_fdb(live: LiveLab, p: Fdb) -> Outcome:
    rows = live.client(p.host).get("/fdb")
    vtep = None if p.vtep is None else _vtep(live, p.vtep)
    if p.container is not None:
        c = live.container(p.container)
        eps = {
            (e["network"], e["mac"]) for e in c["endpoints"] if p.network in (None, e["network"])
        }
        if c["host"] == p.host:
            raise Failed(f"{p.container} runs on {p.host}: a local container has a port, no entry")
        match = [r for r in rows if (r["network"], r["mac"]) in eps]
        vtep = vtep or live.lab.data_address(c["host"])
    else:
        assert p.ip is not None
        ip = live.address(p.ip)
        match = [r for r in rows if r["ip"] == ip and p.network in (None, r["network"])]
    good = [r for r in match if vtep in (None, r["vtep"])]
    seen = "; ".join(f"{r['mac']} {r['ip']} -> {r['vtep']} on {r['network']} ({r['origin']})"
                     for r in match) or "no entry"  # fmt: skip
    if p.expect == "absent":
        return Outcome(not match, seen)
    return Outcome(bool(good), seen + ("" if good or not match else f", expected -> {vtep}"))


def _vtep(live: LiveLab, text: str) -> str:
    if text in live.lab.state["hosts"]:
        return live.lab.data_address(text)
    return substitute(text, live.resolve)


def probe_counter(live: LiveLab, p: Counter) -> Outcome:
    stats = live.client(p.host).get("/dataplane/stats")
    table = stats["global"] if p.network is None else stats["networks"].get(p.network)
    if table is None:
        raise Failed(f"{p.host} has no network {p.network} (a host joins with its first endpoint)")
    group, _, leaf = p.counter.rpartition(".")
    if group:
        value = table.get(group, {}).get(leaf, 0)  # drops.* list only the reasons seen
    elif p.counter in table:
        value = table[p.counter]
    else:
        known = ", ".join(k for k, v in table.items() if isinstance(v, int))
        raise VxnetError(f"no counter {p.counter!r}: known are {known} and drops.REASON")
    ok = p.min <= value and (p.max is None or value <= p.max)
    return Outcome(ok, f"{p.host} {p.network or 'global'} {p.counter} = {value}")


PROBES: dict[type, Callable[[LiveLab, Any], Outcome]] = {
    Ping: probe_ping,
    Http: probe_http,
    Dns: probe_dns,
    Wire: probe_wire,
    Rotation: probe_rotation,
    Member: probe_member,
    Service: probe_service,
    Fdb: probe_fdb,
    Counter: probe_counter,
}


# ---------------------------------------------------------------------------- running


def attempt(live: LiveLab, probe: Probe) -> Outcome:
    """One try; a check that cannot run at all raises (VxnetError, OSError)."""
    try:
        return PROBES[type(probe)](live, probe)
    except (NotFound, Failed) as exc:
        return Outcome(False, str(exc))
    except subprocess.TimeoutExpired as exc:
        return Outcome(
            False, f"`{' '.join(map(str, exc.cmd[4:]))}` gave no result in {exc.timeout:g}s"
        )


def run_check(live: LiveLab, check: Check) -> CheckResult:
    """Try until it passes or ``check.wait`` runs out; status error if it cannot run."""
    t0 = time.monotonic()
    while True:
        try:
            outcome = attempt(live, check.probe)
        except (VxnetError, OSError) as exc:
            return CheckResult(check, "error", str(exc), time.monotonic() - t0)
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"unexpected answer from a daemon: {exc!r}"
            return CheckResult(check, "error", detail, time.monotonic() - t0)
        took = time.monotonic() - t0
        if outcome.ok:
            return CheckResult(check, "pass", outcome.detail, took)
        if took >= check.wait:
            return CheckResult(check, "fail", outcome.detail, took)
        time.sleep(min(RETRY_PAUSE, check.wait - took))


def run_checks(lab: Lab, checks: Sequence[Check]) -> list[CheckResult]:
    """Every check, in the file's order (a check may rely on the traffic of those before)."""
    live = LiveLab(lab)
    return [run_check(live, c) for c in checks]

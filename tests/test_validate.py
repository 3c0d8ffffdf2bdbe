"""Lab-file checks: parsed or refused with a reason, reported, and graded on a live lab."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tests.conftest import unique_lab_name
from vxnet import netns
from vxnet.errors import BadPacket, UsageError
from vxnet.lab import Lab, builder
from vxnet.lab.probes import classify_untrusted, outside_address, parse_dig, tally
from vxnet.lab.topology import load_spec, parse_spec
from vxnet.lab.validate import (
    KINDS,
    Check,
    CheckResult,
    Counter,
    Dns,
    Fdb,
    Http,
    Member,
    Ping,
    Source,
    exit_code,
    parse_checks,
    render_table,
    report_json,
    substitute,
)

ROOT = Path(__file__).parent.parent


# ------------------------------------------------------------------------------ parsing


def one(**row: Any) -> Check:
    (check,) = parse_checks([row])
    return check


def test_every_kind_parses_with_its_defaults() -> None:
    assert one(kind="ping", **{"from": "c", "to": "web"}).probe == Ping("c", "web")
    http = one(kind="http", from_outside=True, url="http://{h2}:8080/")
    assert http.probe == Http(Source("outside"), "http://{h2}:8080/")
    dns = one(kind="dns", **{"from": "c"}, query="tasks.web", count=3)
    assert dns.probe == Dns("c", "tasks.web", count=3)
    member = one(kind="member", member="h3", state="dead", host="h1")
    assert member.probe == Member("h3", "dead", ("h1",))
    assert one(kind="fdb", host="h1", ip="10.0.1.200").probe == Fdb("h1", ip="10.0.1.200")
    counter = one(kind="counter", host="h2", counter="drops.too_big", max=0)
    assert counter.probe == Counter("h2", "drops.too_big", None, 0, 0)
    assert one(kind="counter", host="h2", counter="esp_tx").probe.min == 1  # type: ignore[union-attr]
    for kind in ("encrypted", "rotation"):
        assert one(kind=kind, **{"from": "a", "to": "b"}).kind == kind


def test_names_messages_and_hints() -> None:
    c = one(kind="ping", **{"from": "client", "to": "web"}, size=1400, dont_fragment=True,
            expect="unreachable", hint="look at eth0", wait=2.5)  # fmt: skip
    assert c.name == "ping client -> web (1400 B, DF) is refused"
    assert c.message == KINDS["ping"].message and c.hint == "look at eth0" and c.wait == 2.5
    named = one(kind="service", service="web", name="web is up", message="scale it")
    assert (named.name, named.message) == ("web is up", "scale it")


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"kind": "teleport"}, "kind must be one of"),
        ({"to": "x"}, "kind must be one of"),
        ({"kind": "ping", "to": "web"}, "missing 'from'"),
        ({"kind": "ping", "from": "c", "to": "w", "colour": 1}, "unknown keys"),
        ({"kind": "ping", "from": "c", "to": "w", "count": True}, "whole number"),
        ({"kind": "ping", "from": "c", "to": "w", "expect": "maybe"}, "must be one of"),
        ({"kind": "ping", "from": "c", "to": "w", "wait": float("nan")}, "seconds"),
        ({"kind": "ping", "from": "c", "to": "{web"}, "unbalanced braces"),
        ({"kind": "ping", "from": "c", "to": "{a b}"}, "must name a host"),
        ({"kind": "ping", "from": "", "to": "w"}, "non-empty string"),
        ({"kind": "http", "url": "http://x/"}, "from, from_host or from_outside"),
        ({"kind": "http", "from": "c", "from_host": "h1", "url": "http://x/"}, "from, from_host"),
        ({"kind": "http", "from_outside": False, "url": "http://x/"}, "must be true"),
        ({"kind": "http", "from": "c", "url": "ftp://x/"}, "http://"),
        ({"kind": "dns", "from": "c", "query": "{web}"}, "DNS name"),
        ({"kind": "dns", "from": "c", "query": "x", "expect": "nxdomain", "count": 1}, "takes no"),
        ({"kind": "dns", "from": "c", "query": "x", "answers": "10.0.0.1"}, "list of strings"),
        ({"kind": "member", "member": "h1", "host": "h2", "hosts": ["h3"]}, "not both"),
        ({"kind": "fdb", "host": "h1"}, "either a container or an ip"),
        ({"kind": "fdb", "host": "h1", "container": "c", "ip": "10.0.0.1"}, "either"),
        ({"kind": "counter", "host": "h1", "counter": "Drops!"}, "counter is a name"),
        ({"kind": "counter", "host": "h1", "counter": "x", "min": 5, "max": 1}, "smaller"),
        ({"kind": "rotation", "from": "a", "to": "b", "within": 0}, "seconds 1-300"),
    ],
)
def test_bad_checks_are_explained(row: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_checks([row], "lab.toml")


def test_the_array_itself_and_duplicate_names() -> None:
    assert parse_checks(None) == ()
    with pytest.raises(UsageError, match="array of tables"):
        parse_checks({"kind": "ping"})
    with pytest.raises(UsageError, match="check #1: must be a table"):
        parse_checks(["ping"])
    row = {"kind": "member", "member": "h1"}
    with pytest.raises(UsageError, match="two checks are named"):
        parse_checks([row, row])


def test_a_lab_file_carries_its_checks_through_topology() -> None:
    spec = parse_spec({"check": [{"kind": "member", "member": "h2"}]})
    assert parse_checks(spec.extra["check"])[0].kind == "member"
    assert parse_spec({}).extra == {}


def test_shipped_lab_files_have_valid_checks() -> None:
    for path in sorted((ROOT / "lab").glob("*.toml")):
        for check in parse_checks(load_spec(path).extra.get("check"), str(path)):
            assert check.message, f"{path}: {check.name} tells the learner nothing"


def test_placeholders_are_substituted() -> None:
    addresses = {"h2": "192.168.100.12", "web": "10.0.1.2"}
    assert substitute("http://{h2}:8080/{web}", addresses.__getitem__) == (
        "http://192.168.100.12:8080/10.0.1.2"
    )


check_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["h1", "web", "{h2}", "{x", "http://{h1}:8080/", "A", "esp", "nxdomain",
                       "reachable", "dead", "drops.too_big", "present", "vip"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                               max_size=2),
    max_leaves=6,
)  # fmt: skip
KEYS = sorted({k for kind in KINDS.values() for k in kind.keys} | {"name", "message", "hint",
                                                                    "wait", "colour"})  # fmt: skip
check_rows = st.fixed_dictionaries(
    {"kind": st.sampled_from([*KINDS, "nope"]) | check_values},
    optional={k: check_values for k in KEYS},
)


@settings(max_examples=200, deadline=None)
@given(st.lists(check_rows, max_size=3) | check_values)
def test_any_check_table_is_parsed_or_refused_with_a_usage_error(rows: Any) -> None:
    try:
        checks = parse_checks(rows)
    except UsageError as exc:
        assert str(exc)
        return
    for c in checks:
        assert c.name and c.message and c.kind in KINDS
        assert 0 <= c.wait <= 300


# ------------------------------------------------------------------------------ reports


def _result(status: str, detail: str = "seen") -> CheckResult:
    check = one(kind="member", member="h2", name=f"check {status}", hint="a hint")
    return CheckResult(check, status, detail, 0.123)  # type: ignore[arg-type]


def test_report_marks_and_exit_codes() -> None:
    results = [_result("pass"), _result("fail", "h1 sees h2 dead")]
    lines = render_table("lab1", results)
    assert lines[0] == "lab lab1: 2 checks"
    assert lines[1].startswith("  ✓ check pass") and lines[2].startswith("  ✗ check fail")
    assert lines[3].strip().startswith("-> ") and lines[4].strip() == "hint: a hint"
    assert lines[-1] == "1 passed, 1 failed, 0 errors"
    assert exit_code(results) == 1
    assert exit_code([_result("pass")]) == 0
    assert exit_code([*results, _result("error")]) == 2
    report = report_json("lab1", results)
    assert (report["status"], report["exit_code"]) == ("fail", 1)
    assert report["checks"][1]["detail"] == "h1 sees h2 dead"
    assert report["checks"][0]["seconds"] == 0.12


# ------------------------------------------------------------------------------ the wire


def _frame(inner: Any) -> bytes:
    return bytes(Ether() / IP(src="192.168.100.12", dst="192.168.100.11") / inner)


def test_classify_esp_vxlan_and_the_rest_against_scapy() -> None:
    esp = classify_untrusted(_frame(ESP(spi=0x1234ABCD, seq=1, data=b"x" * 40)), 4789)
    assert esp is not None and (esp.kind, esp.ident) == ("esp", 0x1234ABCD)
    vx = _frame(UDP(sport=40000, dport=4789) / VXLAN(vni=4242) / Ether() / IP() / b"hi")
    seen = classify_untrusted(vx, 4789)
    assert seen is not None and (seen.kind, seen.ident, seen.src) == (
        "vxlan",
        4242,
        "192.168.100.12",
    )
    assert classify_untrusted(vx, 4790) is None  # another data port: not VXLAN for this lab
    assert classify_untrusted(_frame(TCP(dport=2377)), 4789) is None
    with pytest.raises(BadPacket):
        classify_untrusted(_frame(b"")[:30], 4789)
    vteps = {"192.168.100.11", "192.168.100.12"}
    counted = tally([vx, vx, _frame(ESP(spi=7, seq=1, data=b"y" * 20)), b"\x00"], 4789, 4242, vteps)
    assert (counted.vxlan, counted.esp, counted.spis, counted.undecodable) == (2, 1, {7}, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_underlay_frames_decode_or_raise_bad_packet(data: bytes) -> None:
    for frame in (data, _frame(data)):
        try:
            classify_untrusted(frame, 4789)
        except BadPacket as exc:
            assert exc.reason


DIG = """
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 22132
;; flags: qr aa rd ra; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 1

;; ANSWER SECTION:
tasks.svc.\t\t600\tIN\tA\t10.0.1.8
tasks.svc.\t\t600\tIN\tA\t10.0.1.7

;; Query time: 0 msec
"""


def test_parse_dig() -> None:
    assert parse_dig(DIG, "A") == ("NOERROR", ["10.0.1.8", "10.0.1.7"])
    assert parse_dig(DIG.replace("NOERROR", "NXDOMAIN"), "AAAA") == ("NXDOMAIN", [])
    assert parse_dig(";; connection timed out; no servers could be reached", "A") == (None, [])


def test_outside_address_avoids_the_hosts() -> None:
    state = {"underlay": {"subnet": "192.168.100.0/24"},
             "hosts": {"h1": {"address": "192.168.100.254"}}}  # fmt: skip
    assert outside_address(state) == "192.168.100.253"


# ---------------------------------------------------------------------------- live lab

LAB = """
[[host]]
name = "h1"
[[host]]
name = "h2"
[[network]]
name = "front"
subnet = "10.60.0.0/24"
vni = 4600
[[container]]
name = "web"
host = "h1"
network = "front"
image = "whoami"
[[container]]
name = "client"
host = "h2"
network = "front"
image = "idle"
"""

PASSING = """
[[check]]
kind = "ping"
from = "client"
to = "web"
[[check]]
kind = "http"
from = "client"
url = "http://{web}/"
body = "Hostname: web"
[[check]]
kind = "dns"
from = "client"
query = "web"
answers = ["{web}"]
[[check]]
kind = "dns"
from = "client"
query = "nosuch"
expect = "nxdomain"
[[check]]
kind = "encrypted"
from = "client"
to = "web"
expect = "vxlan"
[[check]]
kind = "member"
member = "h1"
[[check]]
kind = "fdb"
host = "h2"
container = "web"
vtep = "h1"
[[check]]
kind = "fdb"
host = "h2"
ip = "10.60.0.250"
expect = "absent"
[[check]]
kind = "counter"
host = "h2"
network = "front"
counter = "drops.too_big"
max = 0
"""

FAILING = """
[[check]]
kind = "ping"
name = "the lost container"
from = "client"
to = "ghost"
message = "Start ghost first."
hint = "vxnet run"
[[check]]
kind = "encrypted"
name = "front is encrypted"
from = "client"
to = "web"
wait = 1
"""

ERROR = """
[[check]]
kind = "member"
member = "h9"
"""


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    name = unique_lab_name("v")
    d = tmp_path_factory.mktemp("validate")
    (d / "lab.toml").write_text(f'name = "{name}"\n' + LAB)
    for kind, checks in (("pass", PASSING), ("fail", FAILING), ("error", ERROR)):
        (d / f"{kind}.toml").write_text(f'name = "{name}"\n' + LAB + checks)
    lab = Lab(name=name, file=d / "lab.toml")
    try:
        yield lab, d
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vxnet", "lab", "validate", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.root
def test_a_correct_lab_passes(graded: tuple[Lab, Path]) -> None:
    _, d = graded
    r = validate(str(d / "pass.toml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("✓") == 9 and "9 passed, 0 failed, 0 errors" in r.stdout
    assert "VXLAN frames" in r.stdout and "h1 sees" not in r.stdout  # h2 sees h1: the others


@pytest.mark.root
def test_failures_say_what_to_look_at_and_errors_exit_2(graded: tuple[Lab, Path]) -> None:
    lab, d = graded
    r = validate("--format", "json", str(d / "fail.toml"))
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert (report["lab"], report["status"]) == (lab.name, "fail")
    lost, clear = report["checks"]
    assert lost["status"] == "fail" and "named 'ghost'" in lost["detail"]
    assert (lost["message"], lost["hint"]) == ("Start ghost first.", "vxnet run")
    assert clear["status"] == "fail" and "0 ESP" in clear["detail"] and clear["seconds"] >= 1
    table = validate(str(d / "fail.toml")).stdout
    assert "✗ the lost container" in table and "-> Start ghost first." in table
    err = validate(str(d / "error.toml"))
    assert err.returncode == 2 and "no host 'h9'" in err.stdout
    assert validate("--name", "nolabhere", str(d / "pass.toml")).returncode == 2
    assert validate(str(d / "lab.toml")).returncode == 2  # no checks: nothing to grade

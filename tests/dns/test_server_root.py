"""The real thing: the resolver bound to 127.0.0.11 in a namespace, asked by the real ``dig``."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import dns.message
import dns.rcode
import pytest
import trio

from tests.conftest import need
from vxnet import netns
from vxnet.dns.records import Directory, EndpointRecord
from vxnet.dns.resolver import Resolver
from vxnet.dns.server import (
    ETC_NETNS,
    read_message,
    remove_resolv_conf,
    send_message,
    serve_resolver,
    write_resolv_conf,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`"),
]

NETWORKS = ("front",)


@pytest.fixture
def ns() -> Iterator[str]:
    need("dig")
    name = "vxdns-" + secrets.token_hex(3)
    netns.create(name)
    try:
        yield name
    finally:
        remove_resolv_conf(name)
        netns.remove(name)
        assert not netns.exists(name)


def local_directory() -> Directory:
    d = Directory()
    for i in range(3):
        d.put(
            "front",
            f"w{i}",
            EndpointRecord(f"web.{i}", "web", "s1", "10.0.1.2", f"10.0.1.{10 + i}"),
        )
    d.put("front", "db", EndpointRecord("db", "", "", "", "10.0.1.3"))
    d.put("back", "secret", EndpointRecord("secret", "", "", "", "10.0.2.3"))
    return d


def upstream_directory() -> Directory:
    d = Directory()
    d.put("ext", "e1", EndpointRecord("www.example", "", "", "", "192.0.2.80"))
    return d


async def dig(ns: str, *args: str) -> str:
    argv = netns.exec_argv(ns, ["dig", "+time=3", "+tries=1", *args])
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return done.stdout.decode()


def run_with_resolvers(
    ns: str,
    body: Callable[[], Awaitable[None]],
    upstreams: tuple[tuple[str, int], ...] = (),
    counters: dict[str, dict[str, int]] | None = None,
) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                main_resolver = Resolver(local_directory(), random.Random(1))
                ext_resolver = Resolver(upstream_directory(), random.Random(2))
                await nursery.start(serve_resolver, ns, main_resolver, lambda: NETWORKS, upstreams)
                await nursery.start(
                    lambda task_status: serve_resolver(
                        ns, ext_resolver, lambda: ("ext",), address="127.0.0.12",
                        task_status=task_status,
                    )
                )  # fmt: skip
                await body()
                # the worker threads that visited the namespace came back
                here = await trio.to_thread.run_sync(os.readlink, "/proc/thread-self/ns/net")
                assert here == os.readlink("/proc/self/ns/net")
                nursery.cancel_scope.cancel()
                if counters is not None:
                    counters["main"] = main_resolver.counters
                    counters["ext"] = ext_resolver.counters

    trio.run(main)


def status(output: str) -> str:
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{output}")


def test_dig_against_127_0_0_11(ns: str) -> None:
    counters: dict[str, dict[str, int]] = {}

    async def body() -> None:
        out = await dig(ns, "@127.0.0.11", "web")
        assert status(out) == "NOERROR", out
        assert "flags: qr aa rd ra" in out, out
        assert "web.\t\t\t600\tIN\tA\t10.0.1.2" in out, out

        out = await dig(ns, "@127.0.0.11", "+short", "tasks.web")
        assert sorted(out.split()) == ["10.0.1.10", "10.0.1.11", "10.0.1.12"], out

        out = await dig(ns, "@127.0.0.11", "web", "AAAA")
        assert status(out) == "NOERROR", out
        assert "ANSWER: 0" in out, out

        out = await dig(ns, "@127.0.0.11", "secret")  # on a network the container is not on
        assert status(out) == "NXDOMAIN", out

        out = await dig(ns, "@127.0.0.11", "+tcp", "+short", "db")
        assert out.split() == ["10.0.1.3"], out

        out = await dig(ns, "@127.0.0.11", "+short", "-x", "10.0.1.11")
        assert out.split() == ["web.1.front."], out

        out = await dig(ns, "@127.0.0.11", "nothing.example")  # no upstream configured
        assert status(out) == "SERVFAIL", out

    run_with_resolvers(ns, body, counters=counters)
    main = counters["main"]
    assert main["answered"] == 5
    assert main["nxdomain"] == 1
    assert main["servfail"] == 1
    assert main.get("malformed", 0) == 0


def test_forwarding_to_an_upstream_in_the_namespace(ns: str) -> None:
    counters: dict[str, dict[str, int]] = {}

    async def body() -> None:
        out = await dig(ns, "@127.0.0.11", "www.example")
        assert status(out) == "NOERROR", out
        assert "192.0.2.80" in out, out
        out = await dig(ns, "@127.0.0.11", "+tcp", "+short", "www.example")
        assert out.split() == ["192.0.2.80"], out
        out = await dig(ns, "@127.0.0.11", "web.example")  # the upstream's own SERVFAIL, relayed
        assert status(out) == "SERVFAIL", out
        out = await dig(ns, "@127.0.0.11", "+short", "web")  # still ours, not forwarded
        assert out.split() == ["10.0.1.2"], out

    # the first upstream does not listen (port unreachable): the second one answers
    run_with_resolvers(ns, body, upstreams=(("127.0.0.13", 53), ("127.0.0.12", 53)),
                       counters=counters)  # fmt: skip
    assert counters["main"]["forwarded"] == 3
    assert counters["main"]["forward_answered"] == 3
    assert counters["main"]["upstream_error"] == 3
    assert counters["ext"]["answered"] == 2


def test_all_upstreams_failing_is_a_quick_servfail(ns: str) -> None:
    async def body() -> None:
        start = trio.current_time()
        out = await dig(ns, "@127.0.0.11", "www.example")
        assert status(out) == "SERVFAIL", out
        assert trio.current_time() - start < 2.0

    run_with_resolvers(ns, body, upstreams=(("127.0.0.13", 53), ("127.0.0.14", 53)))


def test_tcp_several_messages_then_malformed_closes(ns: str) -> None:
    async def body() -> None:
        raw = await trio.to_thread.run_sync(
            netns.call_in, ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        )
        with trio.socket.from_stdlib_socket(raw) as sock:
            await sock.connect(("127.0.0.11", 53))
            for name in ("web", "db", "tasks.web"):
                await send_message(sock, dns.message.make_query(name, "A").to_wire())
            for name in ("web.", "db.", "tasks.web."):
                wire = await read_message(sock)
                assert wire is not None
                assert dns.message.from_wire(wire).question[0].name.to_text() == name
            await send_message(sock, b"\x00\x01\x00\x00\x00\x01" + b"\xff" * 10)
            wire = await read_message(sock)
            assert wire is not None
            assert dns.message.from_wire(wire).rcode() == dns.rcode.FORMERR
            assert await read_message(sock) is None  # closed by the server

    run_with_resolvers(ns, body)


def test_resolv_conf_for_ip_netns_exec(ns: str) -> None:
    path = write_resolv_conf(ns)
    assert path == ETC_NETNS / ns / "resolv.conf"
    out = subprocess.run(
        netns.exec_argv(ns, ["cat", "/etc/resolv.conf"]), capture_output=True, text=True, check=True
    ).stdout
    assert out == "nameserver 127.0.0.11\noptions ndots:0\n"
    remove_resolv_conf(ns)
    remove_resolv_conf(ns)
    assert not (ETC_NETNS / ns).exists()

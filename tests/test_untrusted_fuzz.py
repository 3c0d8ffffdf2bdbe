"""Property tests for the decoders of untrusted input that had none (issue 8, "Bad input, offline").

Only the project's own errors may escape, with a reason.  The inventory, and where each decoder's
property test lives:

* wire codecs (VXLAN, Ethernet, ARP, IPv4/6, UDP, TCP, ICMP): ``tests/wire/``;
* a TAP's virtio_net_hdr (``dataplane/vnet.decode_untrusted``): ``tests/test_offload.py``;
* ESP (``SecurityAssociation.decrypt_untrusted``): ``tests/esp/test_sa.py``;
* memberlist datagrams, messages and LZW: ``tests/gossip/test_packet.py``, ``test_lzw.py``;
* memberlist TCP streams (``StreamReader.feed_untrusted``): **here**;
* networkdb messages: ``tests/gossip/test_networkdb.py``; overlay_peer_table values
  (``decode_peer_record_untrusted``): **here**;
* endpoint_table values (``decode_endpoint_record_untrusted``): ``tests/dns/test_records.py``;
* DNS queries and upstream replies (``Resolver.*_untrusted``): ``tests/dns/test_resolver.py``;
* 2377 frames (``FrameDecoder.feed_untrusted``): ``tests/manager/test_proto.py``; the messages in
  them (join conversation, session, requests; ``field_untrusted``): **here**;
* the daemon's HTTP API (``daemon/http._handle``: any bytes, any JSON body): **here**;
* lab files and check tables: ``tests/test_topology.py``, ``tests/test_validate.py``;
* ``--loss 10%`` and friends (``lab/impair.parse_percent``): **here**;
* CLI arguments, every command, through click's own parser: **here**;
* frames seen by ``vxnet trace`` and the lab's probes: ``tests/test_trace.py``,
  ``tests/test_validate.py``.

Not untrusted, so not fuzzed: the daemon's own state files (``containers.json``,
``local-networks.json``, ``node.json``, the manager's store, ``lab.json``, the relay's rules), all
written by vxnet into root-only directories, and the daemon's answers to the CLI.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import msgpack
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vxnet.cli import cli
from vxnet.daemon.http import Request, Router, _handle
from vxnet.errors import BadPacket, UsageError, VxnetError
from vxnet.gossip.messages import Ping, encode_message
from vxnet.gossip.networkdb import PeerRecord, decode_peer_record_untrusted
from vxnet.gossip.packet import Keyring, StreamReader, encode_stream
from vxnet.lab.impair import parse_percent
from vxnet.manager import pki
from vxnet.manager.cluster import Cluster
from vxnet.manager.proto import field_untrusted
from vxnet.manager.server import Manager, Session
from vxnet.manager.store import Store

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = bytes(range(16))
# anything msgpack can carry, as a peer could put it in a field
INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=5), INTS, max_size=2),
)


# ----------------------------------------------------------------------- gossip on 7946


def _stream(compress: bool, keyring: Keyring | None) -> bytes:
    message = encode_message(Ping(7, "n1", b"\x0a\x00\x00\x01", 7946, "n0"))
    return encode_stream(message, compress=compress, keyring=keyring)


@FUZZ
@given(
    st.booleans(),
    st.one_of(
        st.binary(max_size=600),
        st.builds(_stream, st.booleans(), st.just(None)),
        st.builds(_stream, st.booleans(), st.just(Keyring([KEY]))),
    ),
    st.data(),
)
def test_stream_reader_returns_a_message_or_raises_bad_packet(
    keyed: bool, stream: bytes, data: st.DataObject
) -> None:
    """Any bytes, in any chunks, possibly damaged, into a memberlist TCP stream reader."""
    if stream and data.draw(st.booleans()):
        buf = bytearray(stream)
        for i in data.draw(st.lists(st.integers(0, len(buf) - 1), max_size=4)):
            buf[i] ^= data.draw(st.integers(1, 255))
        stream = bytes(buf[: data.draw(st.integers(0, len(buf)))])
    reader = StreamReader(keyring=Keyring([KEY]) if keyed else None, require_encryption=keyed)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    try:
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            got = reader.feed_untrusted(stream[a:b])
            if got is not None:
                assert isinstance(got, bytes)
                break
    except BadPacket as exc:
        assert exc.reason


def _peer_record_bytes(fields: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(fields, use_bin_type=True)
    return out


PEER_FIELDS = st.sampled_from(["EndpointIP", "EndpointMAC", "TunnelEndpointIP", "x"])


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(_peer_record_bytes, st.dictionaries(PEER_FIELDS, VALUES, max_size=4)),
        st.builds(
            _peer_record_bytes,
            st.fixed_dictionaries(
                {
                    "EndpointIP": st.sampled_from(["10.0.1.2/24", "10.0.1.2", "x/99", ""]),
                    "EndpointMAC": st.sampled_from(["02:42:0a:00:01:02", "zz", "", "02:42"]),
                    "TunnelEndpointIP": st.sampled_from(["192.168.100.11", "::1", "a", ""]),
                }
            ),
        ),
    )
)
def test_peer_records_decode_or_raise_bad_packet(value: bytes) -> None:
    """overlay_peer_table values come from any node on the network."""
    try:
        record = decode_peer_record_untrusted(value)
    except BadPacket as exc:
        assert exc.reason
    else:
        assert isinstance(record, PeerRecord)


# ------------------------------------------------------------------- the manager on 2377


class FakeChannel:
    """The messages a peer sends, one by one, then the end of the stream."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self._messages = list(messages)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any] | None:
        return self._messages.pop(0) if self._messages else None

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


@cache
def _swarm() -> tuple[Path, str, bytes, bytes]:
    """A manager's store, made once: (store path, its own node id, cert, key)."""
    tmp = tempfile.mkdtemp(prefix="vxnet-fuzz-")
    atexit.register(shutil.rmtree, tmp, True)  # made once per run (cached): gone at its end
    path = Path(tmp) / "m.db"
    key = pki.new_node_key()
    with Store.open(path) as store:
        cluster = Cluster.initialize(
            store,
            random.Random(1),
            1.8e9,
            hostname="mgr",
            advertise_addr="192.168.50.1",
            data_path_addr="192.168.50.1",
        )
        issued = cluster.join(
            cluster.token("manager"),
            pki.make_csr(key),
            "mgr",
            "192.168.50.1",
            "192.168.50.1",
            1.8e9,
        )
        cluster.hello(issued.node_id, 1.8e9, {})
    return path, issued.node_id, issued.cert_pem, key


@cache
def _csr() -> bytes:
    return pki.make_csr(pki.new_node_key())


def _message(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "type": kind}


MESSAGE_FIELDS = st.sampled_from(
    [
        "token",
        "csr",
        "hostname",
        "advertise_addr",
        "data_path_addr",
        "id",
        "op",
        "container",
        "network",
        "ip",
        "task_id",
        "state",
        "message",
        "attachments",
    ]
)
MESSAGES = st.builds(
    _message,
    st.sampled_from(["ca", "join", "hello", "heartbeat", "task_status", "request", "leave", "?"]),
    st.dictionaries(
        MESSAGE_FIELDS,
        st.one_of(
            VALUES,
            st.sampled_from(["attach", "detach", "renew", "ingress", "10.0.0.9", "worker"]),
            st.just(b"csr"),
        ),
        max_size=6,
    ),
)


@FUZZ
@given(st.lists(MESSAGES, max_size=4), st.sampled_from(["join", "session", "request"]), st.data())
def test_manager_conversations_refuse_garbage_with_its_own_errors(
    messages: list[dict[str, Any]], stage: str, data: st.DataObject
) -> None:
    """What a peer may send after TLS: the join conversation (no certificate yet), a session's
    messages and its requests.  The manager answers or raises BadPacket/VxnetError (counted and
    answered with an error frame by ``Manager._connection``), nothing else."""
    path, node_id, cert, key = _swarm()
    if data.draw(st.booleans()) and messages:  # sometimes the real token, or a real CSR
        with Store.open(path) as store:
            token = Cluster(store, random.Random(2)).token("worker")
        messages[0] = {**messages[0], "token": token, "csr": _csr()}

    async def converse() -> None:
        with Store.open(path) as store:
            manager = Manager(Cluster(store, random.Random(3)), cert, key, clock=lambda: 1.8e9)
            channel = FakeChannel(messages)
            try:
                if stage == "join":
                    await manager._join_conversation(channel)  # type: ignore[arg-type]
                elif stage == "session":
                    session = Session(node_id, channel)  # type: ignore[arg-type]
                    await manager._session_reader(session)
                else:
                    for msg in messages:
                        reply = await manager._request(node_id, msg)
                        assert reply["type"] == "response"
            except BadPacket as exc:
                assert exc.reason
            except VxnetError as exc:
                assert str(exc)

    trio.run(converse)


@FUZZ
@given(st.dictionaries(st.text(max_size=5), VALUES, max_size=3), st.text(max_size=5), VALUES)
def test_field_untrusted_gives_the_kind_asked_or_bad_packet(
    message: dict[str, Any], key: str, default: Any
) -> None:
    for kind in (str, bytes, int, list):
        try:
            value = field_untrusted(message, key, kind)
        except BadPacket as exc:
            assert exc.reason in ("missing_field", "bad_field")
        else:
            assert isinstance(value, kind) and not (kind is int and isinstance(value, bool))


# ---------------------------------------------------------------------- the HTTP API


def _router() -> Router:
    """Routes shaped like the daemon's: one reads fields of the body, one raises each error."""
    router = Router()

    async def create(req: Request) -> Any:
        body = req.body
        if not isinstance(body, dict):
            raise UsageError("a JSON object, please")
        return {"name": body.get("name"), "n": len(body)}

    async def fail(req: Request) -> Any:
        raise {"usage": UsageError("no"), "bad": BadPacket("x")}.get(req.params["what"], KeyError())

    router.route("POST", "/things")(create)
    router.route("GET", "/fail/{what}")(fail)
    return router


def _http(method: str, target: str, body: bytes, chunked: bool) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
    if chunked:
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + (
            f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
        )
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


JSON_BODIES = st.recursive(
    st.none() | st.booleans() | INTS | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
).map(lambda v: __import__("json").dumps(v).encode())


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400),
        st.builds(
            _http,
            st.sampled_from(["GET", "POST", "DELETE", "PUT", "G\x00T"]),
            st.sampled_from(["/things", "/fail/usage", "/fail/bad", "/fail/bug", "/x", "/%", "*"]),
            st.one_of(
                JSON_BODIES,
                st.binary(max_size=100),
                st.integers(900, 4000).map(lambda n: b"[" * n),  # nested too deep for json
            ),
            st.booleans(),
        ),
    )
)
def test_the_http_api_answers_anything_with_a_status(request_bytes: bytes) -> None:
    """Whatever arrives on the daemon's socket, it answers with a status line and keeps serving
    (an exception escaping ``_handle`` would end ``serve_listeners`` and with it the API)."""

    async def handle(server: trio.SocketStream) -> None:
        async with server:  # trio.serve_listeners drops the stream: closed with it
            await _handle(_router(), server)

    async def serve() -> bytes:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client = trio.SocketStream(a)
        with trio.fail_after(15):  # READ_TIMEOUT is 10 s: nothing may wait for longer
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(handle, trio.SocketStream(b))
                with contextlib.suppress(trio.BrokenResourceError):  # answered before reading all
                    await client.send_all(request_bytes)
                    await client.send_eof()
                reply = b""
                while chunk := await client.receive_some(65536):
                    reply += chunk
        return reply

    reply = trio.run(serve)
    if reply == b"":  # only a client that said nothing (or blank lines) gets nothing
        assert not request_bytes.strip(b"\r\n"), request_bytes[:100]
        return
    assert reply.startswith(b"HTTP/1.1 "), reply[:100]
    status = int(reply[9:12])
    assert 200 <= status < 600
    if b"/fail/bug" not in request_bytes:  # a bug in a handler is a 500; garbage never is
        assert status < 500 or b"/fail/bad" in request_bytes, reply[:300]


# ---------------------------------------------------------------- lab and CLI arguments


@FUZZ
@given(st.text(max_size=12))
def test_parse_percent_gives_a_share_or_a_usage_error(text: str) -> None:
    try:
        share = parse_percent(text, "loss")
    except UsageError as exc:
        assert "--loss" in str(exc)
    else:
        assert 0.0 <= share <= 1.0


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = sorted(_commands(cli))


def _resolve(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def _words(command: click.Command) -> list[str]:
    """The option names of ``command``: the fuzz mixes them with random text."""
    return [opt for p in command.params for opt in (*p.opts, *p.secondary_opts)]


def test_every_command_is_fuzzed() -> None:
    assert len(COMMANDS) > 30 and ("network", "create") in COMMANDS and ("lab", "fault") in COMMANDS


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(COMMANDS), st.data())
def test_cli_arguments_are_parsed_or_refused_with_a_usage_error(
    path: tuple[str, ...], data: st.DataObject
) -> None:
    """Every command's arguments, parsed as click parses them before it runs the command (the
    command itself never runs: random arguments must not build labs on this machine).  Only
    click's usage errors, its ``--help`` exit, or vxnet's UsageError may come out."""
    command = _resolve(path)
    word = st.one_of(
        st.sampled_from(_words(command) or ["--x"]),
        # argv comes through execve: C strings, so never a NUL byte
        st.text(st.characters(blacklist_characters="\x00"), max_size=12),
        st.sampled_from(["10%", "-1", "1e999", "nan", "h1", "h1,h2/h3", "0", "", "--", "-"]),
    )
    args = data.draw(st.lists(word, max_size=6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click's own deprecation notices
        try:
            ctx = command.make_context(path[-1], args)
        except (click.exceptions.ClickException, click.exceptions.Exit, UsageError):
            return
    ctx.close()

"""One gossip node as a process: ``python -m vxnet.gossip.node --name N --bind IP --port P``.

The vxnet twin of ``gopeer node`` (tests/gossip/gopeer/main.go, a real hashicorp/memberlist
node), with the same command line and the same JSON lines on stdout, so that one test helper
drives both and mixed clusters can be checked from outside:

* ``ready`` (the local node, and ``joined``: how many seeds answered), ``join``/``leave``/
  ``update`` (``node``, ``addr``, ``port``, ``state``, ``incarnation``, ``meta``, ``vsn``),
  ``msg`` (a user message that is not networkdb's, hex), ``members`` (every
  ``--members-interval``, on SIGUSR1 and on the ``members`` command; vxnet adds its counters),
  ``sent``, ``keys``, ``error``, ``fatal``, ``shutdown``.
* Stdin commands, one JSON object a line: ``send`` {node, data, reliable}, ``members``,
  ``install_key``/``use_key``/``remove_key`` {key} and ``leave``.
* SIGTERM, SIGINT or ``leave``: leave gracefully (the leave is gossiped before we exit), exit 0.

Every field of :class:`~vxnet.gossip.config.Config` can be overridden (``--probe-interval 0.5``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, get_type_hints

import trio

from vxnet.errors import UsageError
from vxnet.gossip.config import Config
from vxnet.gossip.messages import NodeState
from vxnet.gossip.networkdb import NetworkDB
from vxnet.gossip.packet import Keyring
from vxnet.gossip.service import GossipService
from vxnet.gossip.swim import Member, MemberEvent

Emit = Callable[[dict[str, Any]], None]
LEAVE_GRACE = 0.1  # after the leave broadcast is done: let the last datagrams go out
_NOT_OVERRIDABLE = {"encryption_overhead"}  # follows from --key


def member_json(member: Member) -> dict[str, Any]:
    """A member as gopeer's ``nodeJSON`` prints it."""
    return {
        "node": member.name,
        "addr": member.addr,
        "port": member.port,
        "state": member.state.name.lower(),
        "incarnation": member.incarnation,
        "meta": member.meta.hex(),
        "vsn": list(member.vsn),
    }


def json_lines(out: TextIO) -> Emit:
    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    return emit


class _ReportingNetworkDB(NetworkDB):
    """networkdb that hands the user messages it does not own to ``on_foreign``."""

    def __init__(self, on_foreign: Callable[[bytes], None], service: GossipService) -> None:
        super().__init__(
            service.name, service._user_udp, service._user_tcp, service._broadcast, service.rng
        )
        self._on_foreign = on_foreign

    def handle_message(self, payload: bytes, now: float) -> bool:
        ours = super().handle_message(payload, now)
        if not ours:
            self._on_foreign(payload)
        return ours


class ReportingService(GossipService):
    """A :class:`GossipService` that reports member events and foreign user messages."""

    def __init__(
        self,
        emit: Emit,
        name: str,
        addr: str,
        port: int,
        *,
        keys: Sequence[bytes] = (),
        config: Config | None = None,
    ) -> None:
        super().__init__(name, addr, port, keys=keys, config=config)
        self.emit = emit
        self.db = _ReportingNetworkDB(self._foreign_message, self)

    def _member_event(self, event: MemberEvent, now: float) -> None:
        super()._member_event(event, now)
        self.emit({"event": event.kind, **member_json(event.member)})

    def _foreign_message(self, payload: bytes) -> None:
        self.emit({"event": "msg", "data": payload.hex()})

    def send(self, node: str, payload: bytes, *, reliable: bool) -> bool:
        """``SendReliable``/``SendBestEffort``: False if ``node`` is not a live member."""
        member = self.ml.member(node)
        if member is None or member.state not in (NodeState.ALIVE, NodeState.SUSPECT):
            return False
        if reliable:
            self._user_tcp(node, payload)
            return True
        queued = self.ml.send_user(node, payload)
        self._wake.set()  # send it now, not at the next gossip tick
        return queued

    def change_keys(self, op: str, key: bytes) -> list[str]:
        """``install_key``/``use_key``/``remove_key``; the installed keys, primary first."""
        if self.keyring is None:
            raise UsageError("this node has no keyring (start it with --key)")
        actions = {
            "install_key": self.keyring.add,
            "use_key": self.keyring.use,
            "remove_key": self.keyring.remove,
        }
        actions[op](key)
        return [k.hex() for k in self.keyring.keys]

    def members_event(self) -> dict[str, Any]:
        return {
            "event": "members",
            "members": [member_json(m) for m in self.ml.members()],
            "memberlist": dict(self.ml.counters),
            "service": dict(self.counters),
        }


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line asks for."""

    name: str
    bind: str
    port: int
    keys: tuple[bytes, ...]
    seeds: tuple[tuple[str, int], ...]
    config: Config
    members_interval: float
    leave_timeout: float


class Node:
    """The process: one :class:`ReportingService`, its stdin commands and its signals."""

    service: ReportingService  # made in run(): GossipService needs trio's clock

    def __init__(self, options: Options, emit: Emit) -> None:
        self.options = options
        self.emit = emit
        self.stop = trio.Event()

    async def run(self) -> int:
        """Serve until told to stop, then leave; the exit status."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            opts = self.options
            self.service = ReportingService(
                self.emit, opts.name, opts.bind, opts.port, keys=opts.keys, config=opts.config
            )
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(self.service.serve, opts.seeds)
                except OSError as exc:
                    self.emit({"event": "fatal", "error": f"listen: {exc}"})
                    return 2
                await self._started(nursery, signals)
                await self.stop.wait()
                await self._leave()
                self.emit({"event": "shutdown"})
                nursery.cancel_scope.cancel()
        return 0

    async def _started(self, nursery: trio.Nursery, signals: AsyncIterator[int]) -> None:
        emit, seeds = self.emit, self.options.seeds
        joined = await self._joined(len(seeds))
        if seeds and not joined:
            emit({"event": "error", "error": "join: no seed answered"})
        me = self.service.ml.member(self.service.name)
        assert me is not None
        emit({"event": "ready", "joined": joined, **member_json(me)})
        nursery.start_soon(self._signals, signals)
        nursery.start_soon(self._commands)
        if self.options.members_interval > 0:
            nursery.start_soon(self._members_every, self.options.members_interval)

    async def _joined(self, seeds: int) -> int:
        """Wait for the join push/pulls like memberlist's ``Join``; how many succeeded."""
        counters = self.service.ml.counters
        with trio.move_on_after(self.service.config.tcp_timeout + 1):
            while counters["joins_ok"] + counters["joins_failed"] < seeds:
                await trio.sleep(0.01)
        return counters["joins_ok"]

    async def _leave(self) -> None:
        self.service.leave()
        with trio.move_on_after(self.options.leave_timeout):
            while not self.service.ml.leave_broadcast_done:
                await trio.sleep(0.02)
        await trio.sleep(LEAVE_GRACE)

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                self.service.emit(self.service.members_event())
            else:
                self.stop.set()

    async def _members_every(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self.service.emit(self.service.members_event())

    async def _commands(self) -> None:
        try:
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        except (OSError, ValueError):
            return  # no stdin: signals only
        buffer = b""
        async with stdin:
            while data := await stdin.receive_some():
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    if line.strip():
                        self._command(line)

    def _command(self, line: bytes) -> None:
        service = self.service
        op = ""
        try:
            cmd = json.loads(line)
            op = str(cmd.get("op", ""))
            if op == "send":
                node = str(cmd["node"])
                if not service.send(node, bytes.fromhex(cmd["data"]), reliable=cmd["reliable"]):
                    raise UsageError(f"no live member {node!r}")
                service.emit({"event": "sent", "node": node})
            elif op == "members":
                service.emit(service.members_event())
            elif op in ("install_key", "use_key", "remove_key"):
                keys = service.change_keys(op, bytes.fromhex(cmd["key"]))
                service.emit({"event": "keys", "op": op, "keys": keys})
            elif op == "leave":
                self.stop.set()
            else:
                raise UsageError(f"unknown op {op!r}")
        except (UsageError, ValueError, KeyError, TypeError, AttributeError) as exc:
            service.emit({"event": "error", "op": op, "error": str(exc)})


# ---------------------------------------------------------------------- command line


def parse_seconds(text: str) -> float:
    """``1``, ``1.5s``, ``500ms`` (the Go duration forms gopeer's flags take)."""
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    return float(text.removesuffix("s"))


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vxnet.gossip.node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7946)
    parser.add_argument("--key", action="append", default=[], help="hex key; first is primary")
    parser.add_argument("--join", action="append", default=[], type=parse_addr)
    parser.add_argument("--members-interval", type=parse_seconds, default=1.0)
    parser.add_argument("--leave-timeout", type=parse_seconds, default=2.0)
    config = parser.add_argument_group("memberlist configuration (DefaultLANConfig)")
    hints = get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.name in _NOT_OVERRIDABLE:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if kind is bool:
            config.add_argument(flag, dest=field.name, action="store_true", default=None)
        else:
            config.add_argument(flag, dest=field.name, type=kind, default=None, metavar="N")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    emit = json_lines(out)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if f.name not in _NOT_OVERRIDABLE and getattr(args, f.name) is not None
    }
    try:
        keys = tuple(bytes.fromhex(k) for k in args.key)
        Keyring(keys)  # reject bad key sizes before we start
        options = Options(
            args.name,
            args.bind,
            args.port,
            keys,
            tuple(args.join),
            Config(**overrides),
            args.members_interval,
            args.leave_timeout,
        )
    except (UsageError, ValueError) as exc:
        emit({"event": "fatal", "error": str(exc)})
        return 2
    return trio.run(Node(options, emit).run)


if __name__ == "__main__":
    sys.exit(main())

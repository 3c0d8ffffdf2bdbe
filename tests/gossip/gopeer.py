"""Build and drive ``gopeer`` (tests/gossip/gopeer/main.go): a real hashicorp/memberlist peer.

``build_gopeer(cache_dir)`` compiles it against Debian's ``golang-github-hashicorp-memberlist-dev``
(GOPATH mode, no network) once per source hash and skips the calling test when Go or the
memberlist sources are missing.  :class:`GoWire` wraps ``gopeer wire`` (byte-level cross checks);
:class:`GoNode` wraps ``gopeer node`` (a live memberlist node).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).parent / "gopeer" / "main.go"
GOPATH = Path("/usr/share/gocode")
MEMBERLIST = GOPATH / "src/github.com/hashicorp/memberlist"
INSTALL_HINT = "apt-get install golang-go golang-github-hashicorp-memberlist-dev"


def build_gopeer(cache_dir: Path) -> Path:
    """The gopeer binary, built into ``cache_dir`` unless one for this source is there."""
    go = shutil.which("go") or (
        "/usr/lib/go/bin/go" if Path("/usr/lib/go/bin/go").exists() else None
    )
    if go is None:
        pytest.skip(f"needs the Go toolchain ({INSTALL_HINT})")
    if not (MEMBERLIST / "memberlist.go").exists():
        pytest.skip(f"needs memberlist's Go sources in {MEMBERLIST} ({INSTALL_HINT})")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache_dir / f"gopeer-{digest}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOPATH": str(GOPATH),
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOCACHE": os.environ.get("GOCACHE", str(cache_dir / "gocache")),
        "CGO_ENABLED": "0",
    }
    partial = cache_dir / f".gopeer-{digest}.{os.getpid()}"
    result = subprocess.run(
        [go, "build", "-o", str(partial), "."],
        cwd=SOURCE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"building gopeer failed:\n{result.stderr}")
    partial.replace(binary)  # atomic: concurrent sessions never see half a binary
    for stale in cache_dir.glob("gopeer-*"):
        if stale != binary:
            stale.unlink(missing_ok=True)
    return binary


def build_gopeer_for_session(
    config: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """For a session-scoped fixture: cached in pytest's cache dir (or a temp dir without it)."""
    cache = getattr(config, "cache", None)
    where = cache.mkdir("gopeer") if cache is not None else tmp_path_factory.mktemp("gopeer")
    return build_gopeer(Path(where))


def b64(data: bytes | None) -> str | None:
    """``[]byte`` in Go's encoding/json form (null for a nil slice)."""
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


class GoWireError(Exception):
    """gopeer answered a wire command with an error (Go refused the input)."""


class GoWire:
    """``gopeer wire``: one JSON command in, one JSON answer out (hex byte strings)."""

    def __init__(self, binary: Path) -> None:
        self._proc = subprocess.Popen(
            [str(binary), "wire"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> GoWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"gopeer wire exited (rc {self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise GoWireError(answer["error"])
        return answer

    def _data(self, op: str, **args: Any) -> bytes:
        return bytes.fromhex(self.call(op, **args)["data"])

    def lzw_compress(self, data: bytes) -> bytes:
        return self._data("lzw_compress", data=data.hex())

    def lzw_decompress(self, data: bytes) -> bytes:
        return self._data("lzw_decompress", data=data.hex())

    def encode(self, kind: str, fields: dict[str, Any]) -> bytes:
        """``[type][msgpack]`` as memberlist's ``encode`` writes it; ``[]byte`` fields in base64."""
        return self._data("encode", type=kind, fields=fields)

    def decode(self, data: bytes) -> tuple[int, dict[str, Any]]:
        answer = self.call("decode", data=data.hex())
        return answer["type"], answer["fields"]

    def encrypt(self, key: bytes, vsn: int, data: bytes, aad: bytes = b"") -> bytes:
        return self._data("encrypt", key=key.hex(), vsn=vsn, data=data.hex(), aad=aad.hex())

    def decrypt(self, keys: Sequence[bytes], data: bytes, aad: bytes = b"") -> bytes:
        return self._data("decrypt", keys=[k.hex() for k in keys], data=data.hex(), aad=aad.hex())

    def packet(
        self,
        msgs: Sequence[bytes],
        *,
        crc: bool,
        compress: bool,
        key: bytes | None = None,
        vsn: int = 1,
    ) -> bytes:
        return self._data(
            "packet",
            msgs=[m.hex() for m in msgs],
            crc=crc,
            compress=compress,
            key=key.hex() if key else "",
            vsn=vsn,
        )

    def unpacket(
        self, data: bytes, keys: Sequence[bytes] = (), verify: bool = True
    ) -> tuple[list[bytes], int]:
        answer = self.call("unpacket", data=data.hex(), keys=[k.hex() for k in keys], verify=verify)
        return [bytes.fromhex(m) for m in answer["msgs"] or ()], answer["truncated"]

    def stream(
        self, data: bytes, *, compress: bool, key: bytes | None = None, vsn: int = 1
    ) -> bytes:
        return self._data(
            "stream", data=data.hex(), compress=compress, key=key.hex() if key else "", vsn=vsn
        )

    def unstream(
        self, data: bytes, keys: Sequence[bytes] = (), verify: bool = True
    ) -> tuple[int, bytes]:
        answer = self.call("unstream", data=data.hex(), keys=[k.hex() for k in keys], verify=verify)
        return answer["type"], bytes.fromhex(answer["rest"])


class GoNode:
    """``gopeer node``: a live memberlist node; its JSON event lines are queued as dicts."""

    def __init__(
        self,
        binary: Path,
        name: str,
        bind: str,
        port: int,
        *,
        keys: Iterable[bytes] = (),
        join: Iterable[str] = (),
        label: str = "",
        members_interval: float = 1.0,
        extra: Sequence[str] = (),
    ) -> None:
        args = [str(binary), "node", "--name", name, "--bind", bind, "--port", str(port)]
        args += [f"--members-interval={members_interval}s"]
        for key in keys:
            args += ["--key", key.hex()]
        for seed in join:
            args += ["--join", seed]
        if label:
            args += ["--label", label]
        self.name = name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._proc = subprocess.Popen(
            [*args, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.events.put(json.loads(line))

    def command(self, op: str, **args: Any) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()

    def send(self, node: str, data: bytes, *, reliable: bool = False) -> None:
        self.command("send", node=node, data=data.hex(), reliable=reliable)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first queued event matching ``predicate`` (earlier ones are discarded)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            if event.get("event") == "fatal":
                raise RuntimeError(f"gopeer {self.name}: {event.get('error')}")
            if predicate(event):
                return event
        raise TimeoutError(f"gopeer {self.name}: no matching event in {timeout} s")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (Leave + Shutdown) and wait; kills it if it does not exit in time."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            rc = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            rc = self._proc.wait()
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        self._reader.join(timeout=2)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        return rc

    def __enter__(self) -> GoNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ mixed clusters (test_interop)

REPO = Path(__file__).resolve().parents[2]


class VxNode(GoNode):
    """``python -m vxnet.gossip.node``: a vxnet node with gopeer's command line and JSON lines,
    so a test drives Go and vxnet nodes alike (``wait_for``, ``command``, ``send``, ``stop``)."""

    def __init__(
        self,
        name: str,
        bind: str,
        port: int,
        *,
        keys: Iterable[bytes] = (),
        join: Iterable[str] = (),
        members_interval: float = 1.0,
        extra: Sequence[str] = (),
    ) -> None:
        args = [sys.executable, "-m", "vxnet.gossip.node", "--name", name, "--bind", bind]
        args += ["--port", str(port), f"--members-interval={members_interval}s"]
        for key in keys:
            args += ["--key", key.hex()]
        for seed in join:
            args += ["--join", seed]
        self.name = name
        self.events = queue.Queue()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self._proc = subprocess.Popen(
            [*args, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            cwd=REPO,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def kill(node: GoNode) -> None:
    """SIGKILL: a crash, nothing is gossiped.  ``stop()`` afterwards only cleans up."""
    if node._proc.poll() is None:
        node._proc.kill()
    node._proc.wait()


def running(node: GoNode) -> bool:
    return node._proc.poll() is None

"""A small synchronous client of a daemon's HTTP/JSON API (used by the CLI, the lab and tests)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from vxnet.errors import Conflict, NotFound, UsageError, VxnetError


class DaemonUnavailable(VxnetError):
    """The daemon's socket does not answer.  ``host`` names the daemon (when known)."""

    host: str | None = None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    def __init__(self, socket_path: str, host: str = "", timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.host = host or socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            err = DaemonUnavailable(
                f"the vxnet daemon of {self.host} does not answer on {self.socket_path} "
                f"({method} {path}: {exc}); "
                "is the lab up? (`vxnet lab ls`, `vxnet lab restart HOST`)"
            )
            err.host = self.host
            raise err from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise VxnetError(f"daemon of {self.host} sent a non-JSON answer") from None
        if resp.status >= 400:
            message = data.get("message", raw.decode()) if isinstance(data, dict) else str(data)
            exc_type: type[VxnetError] = {404: NotFound, 409: Conflict, 400: UsageError}.get(
                resp.status, VxnetError
            )
            raise exc_type(f"{self.host}: {message}")
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

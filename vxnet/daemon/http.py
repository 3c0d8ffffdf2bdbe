"""The daemon's local API: HTTP/1.1 + JSON on a unix socket, like Docker's Engine API.

Built on h11 (sans-IO HTTP) with trio streams around it, so ``curl --unix-socket`` works and
other tools can script the daemon.  One request per connection keeps it simple: the CLI makes a
handful of calls per command.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from vxnet.errors import Conflict, NotFound, UsageError, VxnetError

log = logging.getLogger("vxnet.http")
MAX_BODY = 1 << 20
READ_TIMEOUT = 10.0

Handler = Callable[["Request"], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: Any = field(default=None)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Router:
    """Routes like ``GET /containers/{name}`` to async handlers returning JSON-able values."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

        def register(handler: Handler) -> Handler:
            self._routes.append((method, regex, handler))
            return handler

        return register

    async def dispatch(self, request: Request) -> tuple[int, Any]:
        path_matched = False
        for method, regex, handler in self._routes:
            m = regex.match(request.path)
            if m is None:
                continue
            path_matched = True
            if method != request.method:
                continue
            req = Request(request.method, request.path, m.groupdict(), request.query, request.body)
            try:
                return 200, await handler(req)
            except NotFound as exc:
                return 404, {"message": str(exc)}
            except Conflict as exc:
                return 409, {"message": str(exc)}
            except UsageError as exc:
                return 400, {"message": str(exc)}
            except VxnetError as exc:
                return 500, {"message": str(exc)}
            except Exception as exc:  # a bug or a kernel refusal: keep serving, say what failed
                log.exception("%s %s failed", request.method, request.path)
                return 500, {"message": f"internal error: {type(exc).__name__}: {exc}"}
        if path_matched:
            return 405, {"message": f"method {request.method} not allowed on {request.path}"}
        return 404, {"message": f"no such endpoint: {request.path}"}


async def serve_http(router: Router, listener: trio.SocketListener) -> None:
    """Serve ``router`` on ``listener`` until cancelled."""

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(router, stream)

    await trio.serve_listeners(handler, [listener])


async def _handle(router: Router, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    try:
        with trio.fail_after(READ_TIMEOUT):
            request = await _read_request(conn, stream)
    except HttpError as exc:
        await _respond(conn, stream, exc.status, {"message": exc.message})
        return
    except (trio.TooSlowError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _respond(conn, stream, 400, {"message": f"bad request: {exc}"})
        return
    status, payload = await router.dispatch(request)
    await _respond(conn, stream, status, payload)


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> Request:
    head: h11.Request | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY:
                raise HttpError(413, "request body too large")
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client went away")
    assert head is not None
    target = head.target.decode("ascii", "replace")
    path, _, qs = target.partition("?")
    query = dict(p.partition("=")[::2] for p in qs.split("&") if p)
    body: Any = None
    if chunks:
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested too deep
            raise HttpError(400, f"request body is not JSON: {exc}") from None
    return Request(head.method.decode(), path, {}, query, body)


async def _respond(
    conn: h11.Connection, stream: trio.abc.Stream, status: int, payload: Any
) -> None:
    body = json.dumps(payload, indent=1).encode() + b"\n"
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    try:
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    finally:
        await stream.aclose()

"""Joining a swarm, the node's side: one request and its answer on a fresh TLS connection to
the manager on 2377, and the root CA fetched unverified (``swarm join`` checks it against the
digest in the join token before trusting anything signed by it).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

from vxnet.errors import BadPacket, VxnetError
from vxnet.manager import pki, tokens
from vxnet.manager.proto import field_untrusted
from vxnet.manager.server import Channel


async def converse(
    host: str, port: int, ctx: ssl.SSLContext, message: dict[str, Any]
) -> dict[str, Any]:
    """One request and its answer on a fresh TLS connection to the manager."""
    try:
        with trio.fail_after(15):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=host)
            channel = Channel(stream)
            try:
                await channel.send(message)
                reply = await channel.receive()
            finally:
                await trio.aclose_forcefully(stream)
    except (
        OSError,
        trio.BrokenResourceError,
        trio.TooSlowError,
        ssl.SSLError,
        socket.gaierror,
    ) as exc:
        raise VxnetError(f"cannot reach the manager at {host}:{port}: {exc}") from None
    except BadPacket as exc:
        raise VxnetError(f"the manager at {host}:{port} sent garbage: {exc}") from None
    if reply is None:
        raise VxnetError(f"the manager at {host}:{port} closed the connection")
    if reply.get("type") == "error":
        raise tokens.TokenRefused(f"the manager refused: {reply.get('message')}")
    return reply


async def fetch_ca(host: str, port: int) -> bytes:
    """The root CA, fetched *without* verification: the join token's digest vouches for it."""
    reply = await converse(host, port, pki.client_ssl_context(None), {"type": "ca"})
    if reply.get("type") != "ca":
        raise VxnetError("the manager did not send its root CA")
    return bytes(field_untrusted(reply, "ca", bytes))

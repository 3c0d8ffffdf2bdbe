"""``python -m vxnet.images NAME``: the entry point of the built-in images.

* ``whoami`` -- HTTP on :80 answering with the container's name, its IPs and the request line
  (like traefik/whoami, which Docker's own load-balancing tutorials use).
* ``echo``   -- TCP and UDP echo on :7.
* ``idle``   -- sleeps until killed.
(``iperf3`` runs the real ``iperf3 -s`` and is started directly by the daemon.)
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _addresses() -> list[str]:
    """The container's IPv4 addresses (``ip -o -4 addr``; the stdlib has no getifaddrs)."""
    try:
        text = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return []
    return [f.split()[3] for f in text.splitlines() if " lo " not in f]


class WhoamiHandler(BaseHTTPRequestHandler):
    server_version = "vxnet-whoami"

    def do_GET(self) -> None:
        lines = [f"Hostname: {os.environ.get('VXNET_CONTAINER', socket.gethostname())}"]
        lines += [f"IP: {a}" for a in _addresses()]
        lines.append(f"RemoteAddr: {self.client_address[0]}:{self.client_address[1]}")
        lines.append(self.requestline)
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.client_address[0]} {format % args}\n")
        sys.stdout.flush()


class _EchoTcp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


def _echo_udp(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, addr = sock.recvfrom(65536)
        sock.sendto(data, addr)


def main(argv: list[str]) -> int:
    image = argv[0] if argv else ""
    if image == "whoami":
        ThreadingHTTPServer(("0.0.0.0", 80), WhoamiHandler).serve_forever()
    elif image == "echo":
        threading.Thread(target=_echo_udp, args=(7,), daemon=True).start()
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer(("0.0.0.0", 7), _EchoTcp).serve_forever()
    elif image == "idle":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    else:
        print(f"unknown image {image!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

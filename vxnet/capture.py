"""Capture packets inside a lab namespace (AF_PACKET) and explain them layer by layer.

``capture()`` runs ``python -m vxnet.capture`` inside the namespace (so the raw socket is
opened there) and collects the frames it prints as hex.  ``explain()`` decodes a frame with
vxnet's own wire codecs: outer Ethernet/IPv4/UDP, VXLAN, then the inner frame.
"""

from __future__ import annotations

import argparse
import select
import socket
import subprocess
import sys
import time

from vxnet import netns
from vxnet.errors import BadPacket
from vxnet.wire import (
    ETH_P_ARP,
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    decode_arp_untrusted,
    decode_ethernet_untrusted,
    decode_icmp_echo_untrusted,
    decode_ipv4_untrusted,
    decode_udp_untrusted,
    decode_vxlan_untrusted,
    mac_to_str,
)

ETH_P_ALL = 0x0003


def capture(
    ns: str, iface: str, count: int = 1, timeout: float = 5.0, udp_port: int | None = 4789
) -> list[bytes]:
    """Frames seen on ``iface`` in namespace ``ns`` (UDP to ``udp_port`` only, if given).

    On the fabric, capture on a host's port (the veth named after the host), not on the bridge
    device: a Linux bridge's own interface does not see frames it forwards between ports.
    """
    proc = start_capture(ns, iface, count, timeout, udp_port)
    return finish_capture(proc, timeout)


def start_capture(
    ns: str, iface: str, count: int = 1, timeout: float = 5.0, udp_port: int | None = 4789
) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "vxnet.capture",
        iface,
        "--count",
        str(count),
        "--timeout",
        str(timeout),
    ]
    if udp_port is not None:
        argv += ["--udp-port", str(udp_port)]
    proc = subprocess.Popen(netns.exec_argv(ns, argv), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":  # the socket is bound: traffic may start
        proc.kill()
        proc.wait()
    return proc


def finish_capture(proc: subprocess.Popen[str], timeout: float) -> list[bytes]:
    try:
        out, _ = proc.communicate(timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return [bytes.fromhex(line) for line in out.split() if line]


def _is_udp_to(frame: bytes, port: int) -> bool:
    return (
        len(frame) >= 42
        and frame[12:14] == b"\x08\x00"
        and frame[23] == IPPROTO_UDP
        and int.from_bytes(frame[14 + (frame[14] & 0xF) * 4 + 2 :][:2], "big") == port
    )


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vxnet.capture")
    p.add_argument("iface")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--udp-port", type=int)
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((args.iface, 0))
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    seen = 0
    while seen < args.count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
        frame = sock.recv(65535)
        if args.udp_port is not None and not _is_udp_to(frame, args.udp_port):
            continue
        print(frame.hex(), flush=True)
        seen += 1
    return 0


# ------------------------------------------------------------------------------ explain


def explain(frame: bytes, indent: str = "  ") -> list[str]:
    """Human-readable layers of an underlay frame; stops with the reason at the first bad one."""
    lines: list[str] = []
    try:
        _explain_outer(frame, lines, indent)
    except BadPacket as exc:
        lines.append(f"{indent}(undecodable: {exc.reason})")
    return lines


def _explain_outer(frame: bytes, out: list[str], ind: str) -> None:
    eth = decode_ethernet_untrusted(frame)
    out.append(
        f"{ind}Ethernet  {mac_to_str(eth.src)} -> {mac_to_str(eth.dst)}  type 0x{eth.ethertype:04x}"
    )
    if eth.ethertype != ETH_P_IP:
        return
    ip = decode_ipv4_untrusted(eth.payload)
    out.append(f"{ind}IPv4      {ip.src} -> {ip.dst}  proto {ip.proto} ttl {ip.ttl}")
    if ip.proto != IPPROTO_UDP:
        return
    udp = decode_udp_untrusted(ip.payload)
    out.append(f"{ind}UDP       {udp.sport} -> {udp.dport}  length {len(udp.payload) + 8}")
    vx = decode_vxlan_untrusted(udp.payload)
    out.append(f"{ind}VXLAN     flags 0x{vx.flags:02x} (I={vx.flags >> 3 & 1})  VNI {vx.vni}")
    _explain_inner(vx.payload, out, ind + "  ")


def explain_vxlan(udp_datagram: bytes, indent: str = "  ") -> list[str]:
    """A UDP datagram (header included) carrying VXLAN, e.g. what ESP decrypted."""
    lines: list[str] = []
    try:
        udp = decode_udp_untrusted(udp_datagram)
        lines.append(f"{indent}UDP       {udp.sport} -> {udp.dport}  length {len(udp.payload) + 8}")
        vx = decode_vxlan_untrusted(udp.payload)
        lines.append(
            f"{indent}VXLAN     flags 0x{vx.flags:02x} (I={vx.flags >> 3 & 1})  VNI {vx.vni}"
        )
        _explain_inner(vx.payload, lines, indent + "  ")
    except BadPacket as exc:
        lines.append(f"{indent}(undecodable: {exc.reason})")
    return lines


def _explain_inner(frame: bytes, out: list[str], ind: str) -> None:
    eth = decode_ethernet_untrusted(frame)
    out.append(
        f"{ind}Ethernet  {mac_to_str(eth.src)} -> {mac_to_str(eth.dst)}  type 0x{eth.ethertype:04x}"
    )
    if eth.ethertype == ETH_P_ARP:
        arp = decode_arp_untrusted(eth.payload)
        out.append(f"{ind}ARP       op {arp.op}  {arp.sender_ip} asks/tells {arp.target_ip}")
        return
    if eth.ethertype != ETH_P_IP:
        return
    ip = decode_ipv4_untrusted(eth.payload)
    out.append(f"{ind}IPv4      {ip.src} -> {ip.dst}  proto {ip.proto} ttl {ip.ttl}")
    if ip.proto == IPPROTO_ICMP:
        icmp = decode_icmp_echo_untrusted(ip.payload)
        kind = {8: "echo request", 0: "echo reply"}.get(icmp.type, f"type {icmp.type}")
        out.append(f"{ind}ICMP      {kind}  id {icmp.ident} seq {icmp.seq}")
    elif ip.proto in (IPPROTO_TCP, IPPROTO_UDP):
        sport, dport = int.from_bytes(ip.payload[:2], "big"), int.from_bytes(ip.payload[2:4], "big")
        out.append(f"{ind}{'TCP' if ip.proto == IPPROTO_TCP else 'UDP'}       {sport} -> {dport}")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

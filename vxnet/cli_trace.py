"""``vxnet trace``: capture live in a lab and print every packet as layers a learner can read.

scapy is an optional extra: this module only imports :mod:`vxnet.trace.dissect` (and so scapy)
when the command runs, and without scapy it says so and exits 2.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import click

from vxnet.cli import Ctx, cli, pass_ctx
from vxnet.errors import NotFound, UsageError
from vxnet.trace.layers import PROTO_CHOICES

NO_SCAPY = (
    "vxnet trace dissects packets with scapy, which is not installed here.\n"
    "Install the extra: pip install 'vxnet[trace]'   (or: pip install scapy)"
)


@cli.command("trace")
@click.option(
    "--on",
    "on",
    default="fabric",
    show_default=True,
    help="Where to capture: fabric (every host's port), a host (its underlay) or a container.",
)
@click.option("--network", "networks", multiple=True, help="Only packets of this network.")
@click.option("--host", "hosts", multiple=True, help="Only packets to, from or about this host.")
@click.option("--container", "containers", multiple=True, help="Only packets of this container.")
@click.option(
    "--proto",
    "protos",
    multiple=True,
    type=click.Choice(sorted(PROTO_CHOICES)),
    help="Only packets with this layer (repeat for several).",
)
@click.option("--decrypt", is_flag=True, help="Decrypt ESP with the swarm's networking:ipsec keys.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N packets shown.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop after S s.")
@click.option(
    "--write", "write_path", type=click.Path(dir_okay=False), help="Also write FILE.pcap."
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_ctx
def trace(
    ctx: Ctx,
    on: str,
    networks: tuple[str, ...],
    hosts: tuple[str, ...],
    containers: tuple[str, ...],
    protos: tuple[str, ...],
    decrypt: bool,
    count: int | None,
    timeout: float | None,
    write_path: str | None,
    fmt: str,
) -> None:
    """Capture live and print each packet as layers: VXLAN (VNI -> network), inner frames
    (-> containers), ESP (SPI -> node pair and key), gossip, DNS, load-balancer rewrites.

    \b
    vxnet trace --count 10                       # the fabric: what travels between hosts
    vxnet trace --on c1 --proto dns              # a container's DNS at 127.0.0.11
    vxnet trace --network secret --decrypt       # ESP opened with the swarm's keys
    vxnet trace --proto gossip --count 5         # memberlist messages, with member names
    vxnet trace --write /tmp/lab.pcap            # and open it in Wireshark
    """
    try:
        from vxnet.trace.dissect import describe
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("scapy"):
            raise
        click.echo(f"Error: {NO_SCAPY}", err=True)
        sys.exit(2)
    from vxnet.trace.capture import LiveCapture, pcap_header, pcap_record
    from vxnet.trace.context import context_from_lab
    from vxnet.trace.layers import Packet, TraceFilter, render_json, render_text

    lab = ctx.lab()
    where, local_host = _where(lab, on)
    context = context_from_lab(lab, decrypt_esp=decrypt, local_host=local_host)
    _check_names(lab, context.networks.values(), networks, hosts, containers)
    if decrypt and not context.ipsec_keys:
        click.echo(
            "warning: no networking:ipsec keys (not a swarm?): ESP stays encrypted", err=True
        )
    filt = TraceFilter(
        frozenset(networks), frozenset(hosts), frozenset(containers), frozenset(protos)
    )
    pcap: IO[bytes] | None = open(write_path, "wb") if write_path else None  # noqa: SIM115
    shown = seen = 0
    try:
        if pcap is not None:
            pcap.write(pcap_header())
        with LiveCapture(where) as cap:
            click.echo(f"tracing on {_describe_where(where)}; Ctrl-C to stop", err=True)
            t0 = time.time()
            for frame in cap.frames(timeout):
                seen += 1
                layers = describe(frame.data, context)
                if not filt.matches(layers):
                    continue
                shown += 1
                direction = "" if where.ingress_only else frame.direction
                packet = Packet(
                    shown,
                    frame.time - t0,
                    frame.interface,
                    direction,
                    len(frame.data),
                    tuple(layers),
                )
                if fmt == "json":
                    click.echo(render_json(packet))
                else:
                    click.echo("\n".join(render_text(packet, _place(where, frame.interface))))
                if pcap is not None:
                    pcap.write(pcap_record(frame.time, frame.data))
                if count is not None and shown >= count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if pcap is not None:
            pcap.close()
    written = f", written to {write_path}" if write_path else ""
    click.echo(f"{shown} packet(s) shown of {seen} captured{written}", err=True)


def _where(lab: Any, on: str) -> tuple[Any, str]:
    """What ``--on`` names: the fabric, a host, or a container (and the host it is on)."""
    from vxnet.trace.capture import Where

    if on == "fabric":
        bridge = str(lab.state["fabric"].get("bridge", "fabric0"))
        return Where(lab.fabric_netns, "fabric", exclude=(bridge,), ingress_only=True), ""
    if on in lab.hosts:
        info = lab.state["hosts"][on]
        ifaces = tuple(str(info[k]) for k in ("underlay_if", "data_if") if info.get(k))
        return Where(lab.host_netns(on), on, interfaces=ifaces), on
    try:
        c = lab.find(on)
    except NotFound:
        raise UsageError(
            f"--on {on}: not 'fabric', a host ({', '.join(lab.hosts)}) or a container "
            "(see `vxnet ps -a`)"
        ) from None
    return Where(str(c["netns"]), on), str(c["host"])


def _check_names(
    lab: Any,
    nets: Any,
    networks: tuple[str, ...],
    hosts: tuple[str, ...],
    containers: tuple[str, ...],
) -> None:
    known = {n.name for n in nets}
    for name in networks:
        if name not in known:
            raise UsageError(
                f"--network {name}: no such network (known: {', '.join(sorted(known))})"
            )
    for name in hosts:
        if name not in lab.hosts:
            raise UsageError(f"--host {name}: no such host (known: {', '.join(lab.hosts)})")
    if containers:
        have = lab.containers()
        for name in containers:
            if name not in have:
                raise UsageError(f"--container {name}: no such container (see `vxnet ps -a`)")


def _describe_where(where: Any) -> str:
    if where.label == "fabric":
        return f"the fabric ({where.netns}: every host's port, each frame where it enters)"
    if where.interfaces:
        return f"{where.label}'s underlay ({', '.join(where.interfaces)} in {where.netns})"
    return f"container {where.label} (every interface of {where.netns})"


def _place(where: Any, interface: str) -> str:
    if where.label == "fabric":
        return f"fabric, from {interface}"
    return f"{where.label} {interface}"

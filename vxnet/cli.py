"""``vxnet``: the command line, shaped like Docker's (``docker`` -> ``vxnet``).

A thin client: lab commands call :mod:`vxnet.lab`, everything else is an HTTP call to the
daemon of the host named by ``-H`` (or ``VXNET_HOST``; default the lab's first host).
Errors are printed as one line with what to do, and exit status 1; bad usage exits 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from vxnet import __version__, netns
from vxnet.client import DaemonClient
from vxnet.dataplane.tables import DEFAULT_UNDERLAY_MTU, MAX_UNDERLAY_MTU, MIN_UNDERLAY_MTU
from vxnet.errors import UsageError, VxnetError
from vxnet.lab import Lab, builder
from vxnet.lab.topology import DEFAULT_LAB, check_lab_name


class Ctx:
    def __init__(self, host: str | None, lab: str | None) -> None:
        self.host_arg = host
        self.lab_arg = lab

    def lab_name(self) -> str:
        if self.lab_arg:
            return check_lab_name(self.lab_arg)
        labs = builder.list_labs()
        if len(labs) == 1:
            return labs[0]
        return DEFAULT_LAB

    def lab(self) -> Lab:
        return Lab.attach(self.lab_name())

    def host(self, lab: Lab) -> str:
        return self.host_arg or lab.hosts[0]

    def client(self) -> DaemonClient:
        if self.host_arg and "/" in self.host_arg:  # a daemon socket path, outside any lab
            return DaemonClient(self.host_arg)
        lab = self.lab()
        return lab.client(self.host(lab))


pass_ctx = click.make_pass_decorator(Ctx)


def fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


class VxnetGroup(click.Group):
    """Turns vxnet's own errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VxnetError as exc:
            fail(str(exc))
        except PermissionError as exc:
            fail(f"{exc}: vxnet labs need root (network namespaces, /dev/net/tun)")


def _emit(data: Any, fmt: str, table: list[list[str]] | None = None) -> None:
    if fmt == "json" or table is None:
        click.echo(json.dumps(data, indent=2))
        return
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("   ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")


@click.group(cls=VxnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-H", "--host", envvar="VXNET_HOST", help="Host whose daemon to address (h1, h2, ...)."
)
@click.option(
    "--lab", envvar="VXNET_LAB", help="Lab to use (default: the only one up, or 'vxnet')."
)
@click.version_option(__version__, prog_name="vxnet")
@click.pass_context
def cli(ctx: click.Context, host: str | None, lab: str | None) -> None:
    """vxnet: Docker swarm's overlay network, in userspace Python, in network namespaces."""
    ctx.obj = Ctx(host, lab)


# ----------------------------------------------------------------------------------- lab


@cli.group(cls=VxnetGroup)
def lab() -> None:
    """Build, inspect and tear down labs of hosts on this machine."""


# ----------------------------------------------------------------------------- daemon


@cli.command(hidden=True)
@click.option("--host", "host_name", required=True)
@click.option("--socket", "socket_path", required=True, type=click.Path())
@click.option("--state-dir", required=True, type=click.Path())
@click.option("--underlay-addr", required=True)
@click.option("--data-port", type=click.IntRange(1, 65535), default=4789)
@click.option("--netns", "ns", help="Network namespace to run in.")
@click.option("--container-prefix", default="vxc-")
@click.option(
    "--no-offload",
    is_flag=True,
    envvar="VXNET_NO_OFFLOAD",
    help="One datagram per inner packet, no TAP offloads (for comparison and captures).",
)
@click.option(
    "--gso",
    type=click.Choice(["auto", "segment"]),
    default="auto",
    envvar="VXNET_GSO",
    help="auto: UDP-tunnel GSO through an underlay TAP if the kernel has it; segment: cut "
    "super-frames in Python (the fallback, forced).",
)
def daemon(
    host_name: str,
    socket_path: str,
    state_dir: str,
    underlay_addr: str,
    data_port: int,
    ns: str | None,
    container_prefix: str,
    no_offload: bool,
    gso: str,
) -> None:
    """Run a host's daemon (the lab starts these)."""
    from vxnet.daemon.service import DaemonConfig, run_daemon

    run_daemon(
        DaemonConfig(
            host_name,
            Path(socket_path),
            Path(state_dir),
            underlay_addr,
            data_port,
            ns,
            container_prefix,
            offload=not no_offload,
            gso="segment" if gso == "segment" else "auto",
        )
    )


# -------------------------------------------------------------------------- containers


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the name.")
@click.option("--name", required=True, help="Container name.")
@click.option("--network", required=True, help="Network to attach eth0 to.")
@click.option("--ip", help="IPv4 address (default: the lowest free one).")
@click.option(
    "-p", "--publish", multiple=True, help="HOST:CONTAINER[/udp|/sctp] through docker_gwbridge."
)
@click.option("--network-alias", multiple=True, help="Another DNS name on the network.")
@click.option("--dns", multiple=True, help="Upstream DNS server for other names (up to 3).")
@click.argument("image")
@click.argument("cmd", nargs=-1)
@pass_ctx
def run(
    ctx: Ctx,
    detach: bool,
    name: str,
    network: str,
    ip: str | None,
    publish: tuple[str, ...],
    network_alias: tuple[str, ...],
    dns: tuple[str, ...],
    image: str,
    cmd: tuple[str, ...],
) -> None:
    """Run a container: images whoami, echo, iperf3, idle (or IMAGE CMD... to run CMD)."""
    lab_obj = ctx.lab()
    c = lab_obj.run(
        ctx.host(lab_obj), name, network, image, _strip_dashes(cmd), ip,
        publish=publish, aliases=network_alias, dns=dns,
    )  # fmt: skip
    if detach:
        click.echo(c["name"])
        return
    log_path = Path(lab_obj.state["hosts"][c["host"]]["state_dir"]) / "containers" / f"{name}.log"
    client = lab_obj.client(c["host"])
    offset = 0
    while True:
        info = client.get(f"/containers/{name}")
        offset = _copy_log(log_path, offset)
        if info["exit_code"] is not None:
            offset = _copy_log(log_path, offset)
            sys.exit(info["exit_code"])
        time.sleep(0.1)


def _strip_dashes(cmd: tuple[str, ...]) -> tuple[str, ...]:
    return cmd[1:] if cmd[:1] == ("--",) else cmd


def _copy_log(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return offset + len(data)


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("cmd", nargs=-1, required=True)
@pass_ctx
def exec_(ctx: Ctx, container: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside CONTAINER (its network namespace): vxnet exec c1 -- ping 10.0.1.3."""
    c = ctx.lab().find(container)
    argv = netns.exec_argv(c["netns"], _strip_dashes(cmd))
    os.execvp(argv[0], argv)


@cli.command()
@click.option("-a", "--all-hosts", is_flag=True, help="Containers of every host in the lab.")
@FORMAT
@pass_ctx
def ps(ctx: Ctx, all_hosts: bool, fmt: str) -> None:
    """List containers."""
    items = list(ctx.lab().containers().values()) if all_hosts else ctx.client().get("/containers")
    rows = [["NAME", "HOST", "NETWORK", "IP", "MAC", "IMAGE", "STATUS"]]
    for c in items:
        rows.append(
            [
                c["name"],
                c.get("host", ctx.host_arg or "-"),
                c["network"],
                c["ip"],
                c["mac"],
                c["image"],
                c["status"],
            ]
        )
    _emit(items, fmt, rows)


@cli.command()
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def rm(ctx: Ctx, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers (their processes and namespace)."""
    lab_obj = ctx.lab()
    for name in containers:
        lab_obj.rm(name, force=force)
        click.echo(name)


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def stop(ctx: Ctx, containers: tuple[str, ...]) -> None:
    """Stop containers (kill their processes; the namespace stays until rm)."""
    lab_obj = ctx.lab()
    for name in containers:
        c = lab_obj.find(name)
        lab_obj.client(c["host"]).post(f"/containers/{name}/stop")
        click.echo(name)


# ----------------------------------------------------------------------- network, fdb


@cli.group(cls=VxnetGroup)
def fdb() -> None:
    """The forwarding database: MAC -> VTEP entries (like `bridge fdb` for kernel VXLAN)."""


@fdb.command("add")
@click.option("--network", required=True)
@click.option("--mac", required=True, help="Remote endpoint MAC, aa:bb:cc:dd:ee:ff.")
@click.option("--ip", required=True, help="Remote endpoint IP (answered by proxy ARP/ND).")
@click.option("--vtep", required=True, help="Underlay address of the remote VTEP.")
@pass_ctx
def fdb_add(ctx: Ctx, network: str, mac: str, ip: str, vtep: str) -> None:
    """Add a permanent FDB and neighbour entry (peer a VTEP that speaks no gossip)."""
    row = ctx.client().post("/fdb", {"network": network, "mac": mac, "ip": ip, "vtep": vtep})
    click.echo(f"{row['mac']} {row['ip']} -> {row['vtep']} on {row['network']}")


@fdb.command("del")
@click.option("--network", required=True)
@click.option("--mac", required=True)
@pass_ctx
def fdb_del(ctx: Ctx, network: str, mac: str) -> None:
    """Remove an FDB entry."""
    ctx.client().delete(f"/fdb/{network}/{mac}")


@fdb.command("show")
@FORMAT
@pass_ctx
def fdb_show(ctx: Ctx, fmt: str) -> None:
    """List FDB entries of the addressed host."""
    rows_ = ctx.client().get("/fdb")
    rows = [["NETWORK", "VNI", "MAC", "IP", "VTEP", "ORIGIN"]]
    rows += [
        [r["network"], str(r["vni"]), r["mac"], r["ip"], r["vtep"], r["origin"]] for r in rows_
    ]
    _emit(rows_, fmt, rows)


@cli.group(cls=VxnetGroup)
def dataplane() -> None:
    """The per-host dataplane."""


@dataplane.command("stats")
@FORMAT
@pass_ctx
def dataplane_stats(ctx: Ctx, fmt: str) -> None:
    """Counters per network (rx/tx frames and bytes, drops by reason)."""
    st = ctx.client().get("/dataplane/stats")
    rows = [
        [
            "NETWORK",
            "VNI",
            "RX FRAMES",
            "RX BYTES",
            "TX FRAMES",
            "TX BYTES",
            "LOCAL",
            "ARP",
            "DROPS",
        ]
    ]
    for name, n in st["networks"].items():
        rows.append(
            [
                name,
                str(n["vni"]),
                str(n["rx_frames"]),
                str(n["rx_bytes"]),
                str(n["tx_frames"]),
                str(n["tx_bytes"]),
                str(n["local_frames"]),
                str(n["arp_replies"]),
                _drops(n["drops"]),
            ]
        )
    rows.append(["(no network)", "-", "-", "-", "-", "-", "-", "-", _drops(st["global"]["drops"])])
    _emit(st, fmt, rows)


@dataplane.command("lb")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=SECONDS",
    help="Change a timeout (e.g. tcp_established_idle=900) or max_connections on this host.",
)
@FORMAT
@pass_ctx
def dataplane_lb(ctx: Ctx, settings: tuple[str, ...], fmt: str) -> None:
    """The load balancer: VIPs with their backends, the connection table and its timeouts."""
    client = ctx.client()
    if settings:
        body: dict[str, float] = {}
        for item in settings:
            key, sep, value = item.partition("=")
            try:
                body[key] = float(value)
            except ValueError:
                raise UsageError(f"--set {item!r}: use KEY=NUMBER") from None
            if not sep:
                raise UsageError(f"--set {item!r}: use KEY=NUMBER")
        client.post("/dataplane/lb/settings", body)
    info = client.get("/dataplane/lb")
    if fmt == "json":
        _emit(info, fmt)
        return
    services = [["NETWORK", "VIP", "LB ADDRESS", "PORTS", "BACKENDS ip(weight/active)"]]
    for s in info["services"]:
        ports = " ".join(f"{p['published']}->{p['target']}/{p['protocol']}" for p in s["ports"])
        backends = " ".join(f"{b['ip']}({b['weight']}/{b['active']})" for b in s["backends"])
        services.append([s["network"], s["vip"], s["lb_ip"], ports or "any", backends])
    conns = [["NETWORK", "PROTO", "CLIENT -> VIP", "SNAT -> BACKEND", "STATE", "EXPIRES"]]
    conns += [
        [c["network"], c["proto"], f"{c['client']} -> {c['vip']}",
         f"{c['snat']} -> {c['backend']}", c["state"], f"{c['expires_in']:.0f}s"]
        for c in info["connections"]
    ]  # fmt: skip
    _emit(info, fmt, services)
    click.echo()
    _emit(info, fmt, conns)
    click.echo("\ntimeouts (s): " + ", ".join(f"{k}={v:g}" for k, v in info["settings"].items()))


def _drops(drops: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "0"


# ------------------------------------------------------------------------------ bench


@cli.command()
@click.option("--duration", type=click.IntRange(1, 600), default=10, help="Seconds per iperf3 run.")
@click.option("--repeats", type=click.IntRange(1, 20), default=3, help="Rounds of every test.")
@click.option("--streams", type=click.IntRange(2, 64), default=4, help="Parallel TCP streams.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="A PNG of the ratios.")
@click.option(
    "--encrypted", is_flag=True, help="Also an encrypted overlay, and the AES-GCM ceiling."
)
@click.option("--no-offload-row", "skip_no_offload", is_flag=True, help="Skip --no-offload.")
@click.option(
    "--hops",
    is_flag=True,
    help="Also time each hop of a ping (captures at the client, the fabric, the server).",
)
@click.option(
    "--underlay-mtu",
    type=click.IntRange(MIN_UNDERLAY_MTU, MAX_UNDERLAY_MTU),
    default=DEFAULT_UNDERLAY_MTU,
    show_default=True,
    help="Both topologies' underlay MTU (9000: jumbo frames); networks take the largest MTU "
    "it carries.",
)
@click.option(
    "--scale",
    is_flag=True,
    help="Instead: a swarm of --hosts hosts x --containers containers, all-pairs reachability, "
    "bring-up time and memory per host.",
)
@click.option("--hosts", type=click.IntRange(2, 64), default=32, help="--scale: hosts.")
@click.option("--containers", type=click.IntRange(1, 16), default=4, help="--scale: per host.")
@click.option(
    "--gossip",
    "gossip_args",
    default=None,
    help="Run the gossip simulation instead, e.g. --gossip '--nodes 100,1000 --loss 0,10'.",
)
def bench(
    duration: int,
    repeats: int,
    streams: int,
    json_path: str | None,
    plot_path: str | None,
    encrypted: bool,
    skip_no_offload: bool,
    underlay_mtu: int,
    hops: bool,
    scale: bool,
    hosts: int,
    containers: int,
    gossip_args: str | None,
) -> None:
    """Kernel VXLAN vs vxnet (offloads on, encrypted, offloads off), side by side in one run."""
    from bench.run import run_bench

    if scale:
        from bench.scale import run_scale

        sys.exit(run_scale(hosts, containers, json_path))

    if gossip_args is not None:
        import shlex

        from bench.gossip_sim import main as gossip_main

        sys.exit(gossip_main(shlex.split(gossip_args)))

    sys.exit(
        run_bench(
            duration=duration,
            repeats=repeats,
            json_path=json_path,
            encrypted=encrypted,
            streams=streams,
            plot_path=plot_path,
            no_offload_row=not skip_no_offload,
            underlay_mtu=underlay_mtu,
            hops=hops,
        )
    )


# the other command groups register themselves on `cli`
from vxnet import (  # noqa: E402
    cli_fault,  # noqa: F401  (lab fault)
    cli_lab,  # noqa: F401  (lab up/down/ls/inspect/restart/demo, validate, graph)
    cli_swarm,  # noqa: F401  (swarm, node, network, service, gossip)
    cli_trace,  # noqa: F401  (trace)
)


def main() -> None:
    try:
        cli(prog_name="vxnet")
    except UsageError as exc:  # pragma: no cover - raised outside a command
        fail(str(exc))


if __name__ == "__main__":
    main()

"""``vxnet lab ...``: build, inspect, restart and tear down labs, run the demo, grade an
exercise (``validate``), draw a live lab (``graph``).

They register themselves on the ``lab`` group of :mod:`vxnet.cli` (imported there once).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

from vxnet.cli import FORMAT, Ctx, _emit, lab, pass_ctx
from vxnet.errors import VxnetError
from vxnet.lab import Lab, builder, fault, neigh
from vxnet.lab.graph import RENDERERS, collect
from vxnet.lab.probes import run_checks
from vxnet.lab.topology import DEFAULT_LAB, check_lab_name, default_spec, load_spec
from vxnet.lab.validate import exit_code, parse_checks, render_table, report_json

EXIT_ERROR = 2


@lab.command("up")
@click.option("--name", help="Lab name (letters/digits, default 'vxnet').")
@click.option("--hosts", type=click.IntRange(1, 64), help="Number of hosts (default 3).")
@click.option("--no-swarm", is_flag=True, help="Manual mode: no manager, the lab programs FDBs.")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
def lab_up(name: str | None, hosts: int | None, no_swarm: bool, file: str | None) -> None:
    """Build a lab: fabric, hosts h1..hN, a daemon each; swarm init on h1, the others join."""
    spec = (
        load_spec(Path(file), name, hosts)
        if file
        else default_spec(name or DEFAULT_LAB, hosts or 3)
    )
    if no_swarm:
        spec = dataclasses.replace(spec, swarm=False)
    note = neigh.advice(len(spec.hosts), len(spec.containers))
    if note:
        click.echo(note, err=True)
    t0 = time.monotonic()
    lab_obj = Lab(spec=spec)
    click.echo(
        f"lab {lab_obj.name} is up in {time.monotonic() - t0:.1f}s: "
        f"{len(lab_obj.hosts)} hosts ({', '.join(lab_obj.hosts)})"
    )
    for net in lab_obj.state["networks"]:
        click.echo(f"  network {net['name']}: {net['subnet']} VNI {net['vni']} MTU {net['mtu']}")


@lab.command("down")
@click.option("--name", help="Lab name.")
@pass_ctx
def lab_down(ctx: Ctx, name: str | None) -> None:
    """Stop the daemons and remove every namespace, link and file of a lab (idempotent)."""
    lab_name = check_lab_name(name) if name else ctx.lab_name()
    removed = builder.down(lab_name)
    click.echo(f"lab {lab_name} is down ({len(removed)} namespaces removed)")


@lab.command("ls")
def lab_ls() -> None:
    """List the labs on this machine."""
    rows = [["NAME", "HOSTS", "DAEMONS UP"]]
    for name in builder.list_labs():
        try:
            st = builder.inspect(name)
            hosts = st["hosts"]
            rows.append(
                [name, str(len(hosts)), str(sum(1 for h in hosts.values() if h["daemon_running"]))]
            )
        except VxnetError:
            rows.append([name, "?", "state missing: `vxnet lab down --name " + name + "`"])
    _emit(None, "table", rows)


@lab.command("inspect")
@click.option("--name", help="Lab name.")
@FORMAT
@pass_ctx
def lab_inspect(ctx: Ctx, name: str | None, fmt: str) -> None:
    """Show a lab's fabric and, per host, namespace, underlay interface, address, daemon pid."""
    st = builder.inspect(check_lab_name(name) if name else ctx.lab_name())
    rows = [["HOST", "NETNS", "UNDERLAY", "ADDRESS", "DAEMON PID", "RUNNING"]]
    for hname, h in st["hosts"].items():
        rows.append(
            [
                hname,
                h["netns"],
                h["underlay_if"],
                h["address"],
                str(h["pid"]),
                "yes" if h["daemon_running"] else "NO",
            ]
        )
    if fmt == "table":
        click.echo(
            f"lab {st['name']}: fabric namespace {st['fabric']['netns']}, "
            f"bridge {st['fabric']['bridge']}, underlay {st['underlay']['subnet']}"
        )
    _emit(st, fmt, rows)
    if fmt == "table" and (st.get("faults", {}).get("rules") or st.get("faults", {}).get(
            "partitions")):  # fmt: skip
        from vxnet.cli_fault import print_faults

        click.echo()
        print_faults(fault.show(st["name"]))


@lab.command("restart")
@click.option("--name", help="Lab name.")
@click.argument("host")
@pass_ctx
def lab_restart(ctx: Ctx, name: str | None, host: str) -> None:
    """Start HOST's daemon again (after a crash, or to test one)."""
    lab_obj = Lab.attach(check_lab_name(name) if name else ctx.lab_name())
    result = lab_obj.restart(host)
    click.echo(f"{host}: daemon restarted (pid {result['pid']})")
    if result["adopted"]:
        click.echo(f"  re-adopted (persistent TAPs): {', '.join(result['adopted'])}")
    if result["lost_containers"]:
        click.echo(f"  lost: {', '.join(result['lost_containers'])}")


@lab.command("demo")
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards to explore.")
@click.option("--step", is_flag=True, help="Pause between steps.")
def lab_demo(keep: bool, step: bool) -> None:
    """The guided tour: a 3-host lab, an overlay, containers, ping, VXLAN on the wire."""
    from vxnet.demo import run_demo

    sys.exit(run_demo(keep=keep, step=step))


@lab.command("validate")
@click.option("--name", help="Lab name (default: --lab, else the name in FILE).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_ctx
def lab_validate(ctx: Ctx, name: str | None, fmt: str, file: str) -> None:
    """Run the [[check]]s of FILE against the running lab: exit 0 pass, 1 fail, 2 error."""
    try:
        spec = load_spec(Path(file))
        checks = parse_checks(spec.extra.get("check"), file)
        if not checks:
            raise VxnetError(f"{file} has no [[check]] tables: nothing to validate")
        lab_name = check_lab_name(name or ctx.lab_arg or spec.name)
        results = run_checks(Lab.attach(lab_name), checks)
    except VxnetError as exc:
        if fmt == "json":
            click.echo(json.dumps({"status": "error", "exit_code": EXIT_ERROR, "error": str(exc)}))
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if fmt == "json":
        click.echo(json.dumps(report_json(lab_name, results), indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(render_table(lab_name, results)))
    sys.exit(exit_code(results))


@lab.command("graph")
@click.option("--name", help="Lab name (default: --lab, or the only lab up).")
@click.option("--format", "fmt", type=click.Choice(sorted(RENDERERS)), default="text")
@pass_ctx
def lab_graph(ctx: Ctx, name: str | None, fmt: str) -> None:
    """Draw the live lab: hosts, containers, networks (VNIs), who peers with whom, services."""
    lab_obj = Lab.attach(check_lab_name(name) if name else ctx.lab_name())
    click.echo(RENDERERS[fmt](collect(lab_obj)), nl=False)

"""``vxnet lab fault``: impair the lab's fabric (there is no netem here), or show the faults.

It registers itself on the ``lab`` group of :mod:`vxnet.cli` (imported there once).  The work is
in :mod:`vxnet.lab.fault`; the model of an impairment in :mod:`vxnet.lab.impair`.
"""

from __future__ import annotations

from typing import Any

import click

from vxnet.cli import FORMAT, Ctx, _emit, lab, pass_ctx
from vxnet.errors import UsageError
from vxnet.lab import fault
from vxnet.lab.impair import Impairment, parse_percent
from vxnet.lab.topology import check_lab_name


@lab.command("fault")
@click.option("--name", help="Lab name (default: the current lab).")
@click.option("--host", "host", help="Impair everything this host sends and receives.")
@click.option("--link", help="Impair only what crosses between two hosts: HOST_A,HOST_B.")
@click.option("--loss", help="Drop this share of frames, e.g. 10%.")
@click.option("--delay", type=click.FloatRange(0, 10_000), help="Delay every frame, ms.")
@click.option("--jitter", type=click.FloatRange(0, 10_000), help="+- around --delay, ms.")
@click.option("--duplicate", help="Send this share of frames twice, e.g. 1%.")
@click.option("--reorder", help="This share of frames skips the delay (needs --delay).")
@click.option("--partition", help="Cut the fabric between two groups: h1,h2/h3.")
@click.option("--seed", type=int, help="Seed of the impairments (same seed, same fates).")
@click.option("--clear", is_flag=True, help="Remove every fault.")
@FORMAT
@pass_ctx
def lab_fault(
    ctx: Ctx,
    name: str | None,
    host: str | None,
    link: str | None,
    loss: str | None,
    delay: float | None,
    jitter: float | None,
    duplicate: str | None,
    reorder: str | None,
    partition: str | None,
    seed: int | None,
    clear: bool,
    fmt: str,
) -> None:
    """Impair the lab's fabric (there is no netem here: vxnet brings its own), or show faults."""
    lab_name = check_lab_name(name) if name else ctx.lab_name()
    impaired = any(v is not None for v in (loss, delay, jitter, duplicate, reorder))
    if clear:
        out = fault.clear(lab_name)
    elif partition:
        out = fault.add_partition(lab_name, partition)
    elif impaired:
        imp = Impairment(
            loss=parse_percent(loss, "loss") if loss else 0.0,
            delay=(delay or 0.0) / 1000,
            jitter=(jitter or 0.0) / 1000,
            duplicate=parse_percent(duplicate, "duplicate") if duplicate else 0.0,
            reorder=parse_percent(reorder, "reorder") if reorder else 0.0,
        )
        pair = None
        if link is not None:
            a, sep, b = link.partition(",")
            if not sep or not a or not b:
                raise UsageError("--link HOST_A,HOST_B")
            pair = (a, b)
        out = fault.add_impairment(lab_name, imp, host=host, link=pair, seed=seed)
    else:
        out = fault.show(lab_name)
    if fmt == "json":
        _emit(out, fmt)
    else:
        print_faults(out)


def print_faults(out: dict[str, Any]) -> None:
    if not out["rules"] and not out["partitions"]:
        click.echo("no faults: the fabric is clean")
    for r in out["rules"]:
        where = f"link {r['host']}<->{r['peer']}" if r["peer"] else f"host {r['host']}"
        click.echo(f"{where}: {Impairment(**r['impairment']).describe()} (seed {out['seed']})")
    for left, right in out["partitions"]:
        click.echo(f"partition: {','.join(left)} / {','.join(right)} (dropped in the fabric)")
    for port, relay in sorted(out["relays"].items()):
        c = relay.get("counters", {})
        click.echo(
            f"  relay on fabric port {port}: {c.get('frames', 0)} frames, "
            f"{c.get('dropped', 0)} dropped, {c.get('delayed', 0)} delayed, "
            f"{c.get('duplicated', 0)} duplicated, {c.get('reordered', 0)} reordered"
        )

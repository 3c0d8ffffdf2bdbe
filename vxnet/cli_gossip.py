"""``vxnet gossip members|networks|tables``: what a node's gossip (7946) knows.

Registers itself on :mod:`vxnet.cli` (imported by :mod:`vxnet.cli_swarm`).
"""

from __future__ import annotations

import click

from vxnet.cli import FORMAT, Ctx, VxnetGroup, _emit, cli, pass_ctx


@cli.group(cls=VxnetGroup)
def gossip() -> None:
    """What a node's gossip (memberlist + networkdb on 7946) knows."""


@gossip.command("members")
@FORMAT
@pass_ctx
def gossip_members(ctx: Ctx, fmt: str) -> None:
    """The memberlist view of the addressed node: members, states, incarnations."""
    snap = ctx.client().get("/gossip")
    rows = [["NAME", "ADDRESS", "STATE", "INCARNATION"]]
    rows += [
        [m["name"], f"{m['addr']}:{m['port']}", m["state"], str(m["incarnation"])]
        for m in snap["members"]
    ]
    if fmt == "table":
        click.echo(
            f"node {snap['name']} on {snap['addr']}, encrypted: {snap['encrypted']} "
            f"({snap['key_count']} keys), awareness {snap['awareness']}"
        )
    _emit(snap, fmt, rows)


@gossip.command("networks")
@FORMAT
@pass_ctx
def gossip_networks(ctx: Ctx, fmt: str) -> None:
    """networkdb: the networks this node gossips on, their nodes and table sizes."""
    snap = ctx.client().get("/gossip")
    rows = [["NETWORK ID", "NODES", "PEER ENTRIES", "ENDPOINT ENTRIES"]]
    for net, info in snap["networks"].items():
        rows.append(
            [
                net[:12],  # a network id, shortened as `network ls` does
                str(len(info["nodes"])),
                str(info["tables"]["overlay_peer_table"]),
                str(info["tables"]["endpoint_table"]),
            ]
        )
    _emit(snap["networks"], fmt, rows)


@gossip.command("tables")
@click.option("--network", help="Only this network (name or id).")
@FORMAT
@pass_ctx
def gossip_tables(ctx: Ctx, network: str | None, fmt: str) -> None:
    """networkdb's entries on the addressed node (overlay_peer_table, endpoint_table decoded)."""
    rows_ = ctx.client().get("/gossip/tables" + (f"?network={network}" if network else ""))
    rows = [["NETWORK", "TABLE", "OWNER", "LTIME", "ENDPOINT", "MAC/NAME", "VTEP/VIP", "STATE"]]
    for r in rows_:
        state = "deleted" if r["deleting"] else "hidden (owner failed)" if r["hidden"] else "live"
        rows.append(
            [
                r["network"],
                r["table"],
                r["owner"],
                str(r["ltime"]),
                r.get("endpoint_ip", ""),
                r.get("endpoint_mac", r.get("name", "")),
                r.get("tunnel_endpoint_ip", r.get("virtual_ip", "")),
                state,
            ]
        )
    _emit(rows_, fmt, rows)

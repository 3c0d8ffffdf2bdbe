"""``vxnet swarm|node|network|service ...``: Docker's swarm commands, as a thin API client.

Cluster state lives on the manager: address it with ``-H`` (in a lab, h1 is the manager and the
default host).  In a lab, commands that change where containers run wait until the service has
converged and then refresh the lab's peer tables (until gossip does that by itself).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from vxnet.cli import FORMAT, Ctx, VxnetGroup, _emit, cli, pass_ctx
from vxnet.dataplane.tables import DEFAULT_UNDERLAY_MTU, MAX_UNDERLAY_MTU, MIN_UNDERLAY_MTU
from vxnet.errors import NotFound, UsageError, VxnetError

CONVERGE_TIMEOUT = 60.0

INGRESS_WARNING = (
    "WARNING! Before removing the routing-mesh network, make sure all the nodes in your swarm "
    "run the same vxnet version. Otherwise, removal may not be effective and functionality of "
    "newly create ingress networks will be impaired.\nAre you sure you want to continue?"
)


def _short(ident: str) -> str:
    return ident[:12]


# ---------------------------------------------------------------------------------- swarm


@cli.group(cls=VxnetGroup)
def swarm() -> None:
    """Manage the swarm (init, join, tokens, keys)."""


@swarm.command("init")
@click.option("--advertise-addr", help="Address for the manager (2377) and gossip (7946).")
@click.option(
    "--data-path-addr", help="Address for VXLAN traffic (default: the advertise address)."
)
@click.option("--data-path-port", type=int, help="UDP port for VXLAN (4789 or 1024-49151).")
@click.option("--default-addr-pool", multiple=True, help="CIDR pool for network subnets (repeat).")
@click.option("--default-addr-pool-mask-length", type=click.IntRange(8, 29), default=24)
@click.option(
    "--key-rotation-interval", default="12h", help="How often the keys rotate (e.g. 12h, 2s)."
)
@click.option("--cert-expiry", default="2160h", help="Node certificate lifetime (default 90 days).")
@click.option(
    "--esp-icv-length",
    type=click.Choice(["8", "16"]),
    default="16",
    help="ESP integrity tag of encrypted networks, bytes: 16 (default) or 8 as Docker (MTU 1424).",
)
@click.option(
    "--underlay-mtu",
    type=click.IntRange(MIN_UNDERLAY_MTU, MAX_UNDERLAY_MTU),
    default=DEFAULT_UNDERLAY_MTU,
    show_default=True,
    help="MTU of every node's underlay: the ceiling of network MTUs (9000: jumbo frames).",
)
@pass_ctx
def swarm_init(
    ctx: Ctx,
    advertise_addr: str | None,
    data_path_addr: str | None,
    data_path_port: int | None,
    default_addr_pool: tuple[str, ...],
    default_addr_pool_mask_length: int,
    key_rotation_interval: str,
    cert_expiry: str,
    esp_icv_length: str,
    underlay_mtu: int,
) -> None:
    """Make this node the swarm's manager."""
    r = ctx.client().post(
        "/swarm/init",
        {
            "advertise_addr": advertise_addr,
            "data_path_addr": data_path_addr,
            "data_path_port": data_path_port,
            "default_addr_pool": list(default_addr_pool) or None,
            "default_addr_pool_mask_length": default_addr_pool_mask_length,
            "key_rotation_interval": key_rotation_interval,
            "cert_expiry": cert_expiry,
            "esp_icv_length": int(esp_icv_length),
            "underlay_mtu": underlay_mtu,
        },
    )
    click.echo(f"Swarm initialized: current node ({r['node_id']}) is now a manager.\n")
    click.echo("To add a worker to this swarm, run the following command:\n")
    click.echo(f"    vxnet swarm join --token {r['worker_token']} {r['manager_addr']}\n")
    click.echo(
        "To add a manager to this swarm, run 'vxnet swarm join-token manager' and follow "
        "the instructions."
    )


@swarm.command("join")
@click.option("--token", required=True, help="Worker or manager join token (SWMTKN-1-...).")
@click.option("--advertise-addr")
@click.option("--data-path-addr")
@click.argument("remote")
@pass_ctx
def swarm_join(
    ctx: Ctx, token: str, advertise_addr: str | None, data_path_addr: str | None, remote: str
) -> None:
    """Join a swarm as a node (MANAGER:2377)."""
    r = ctx.client().post(
        "/swarm/join",
        {
            "token": token,
            "remote": remote,
            "advertise_addr": advertise_addr,
            "data_path_addr": data_path_addr,
        },
    )
    click.echo(f"This node joined a swarm as a {r['role']}.")
    if r.get("note"):
        click.echo(f"Note: {r['note']}")


@swarm.command("join-token")
@click.option("-q", "--quiet", is_flag=True, help="Only the token.")
@click.option("--rotate", is_flag=True, help="Make a new token; the old one stops working.")
@click.argument("role", type=click.Choice(["worker", "manager"]))
@pass_ctx
def swarm_join_token(ctx: Ctx, quiet: bool, rotate: bool, role: str) -> None:
    """Show (or rotate) the token to join as ROLE."""
    r = ctx.client().get(f"/swarm/join-token/{role}" + ("?rotate=1" if rotate else ""))
    if quiet:
        click.echo(r["token"])
        return
    if rotate:
        click.echo(f"Successfully rotated {role} join token.\n")
    click.echo(f"To add a {role} to this swarm, run the following command:\n")
    click.echo(f"    vxnet swarm join --token {r['token']} {r['manager']}\n")
    if r.get("note"):
        click.echo(f"Note: {r['note']}")


@swarm.command("leave")
@click.option("-f", "--force", is_flag=True, help="Leave even as the manager (erases the swarm).")
@pass_ctx
def swarm_leave(ctx: Ctx, force: bool) -> None:
    """Leave the swarm."""
    ctx.client().post("/swarm/leave" + ("?force=1" if force else ""))
    click.echo("Node left the swarm.")


@swarm.command("update")
@click.option("--key-rotation-interval", required=True, help="e.g. 12h, 10m, 2s")
@pass_ctx
def swarm_update(ctx: Ctx, key_rotation_interval: str) -> None:
    """Change the swarm's settings."""
    r = ctx.client().post("/swarm/update", {"key_rotation_interval": key_rotation_interval})
    click.echo(f"Swarm updated: keys rotate every {r['key_rotation_interval']:g} s.")


@swarm.command("keys")
@click.option(
    "--show-keys", is_flag=True, help="Print the key bytes too (teaching, outside checks)."
)
@FORMAT
@pass_ctx
def swarm_keys(ctx: Ctx, show_keys: bool, fmt: str) -> None:
    """The encryption keys this node holds (tags; bytes with --show-keys)."""
    keys = ctx.client().get("/swarm/keys" + ("?show=1" if show_keys else ""))
    rows = [["SUBSYSTEM", "TAG", "ALGORITHM", "PRIMARY"] + (["KEY"] if show_keys else [])]
    for sub in sorted({k["subsystem"] for k in keys}):
        ring = sorted((k for k in keys if k["subsystem"] == sub), key=lambda k: k["lamport_time"])
        for i, k in enumerate(ring):
            row = [sub, str(k["lamport_time"]), k["algorithm"], "*" if i == len(ring) // 2 else ""]
            rows.append(row + ([k["key"]] if show_keys else []))
    _emit(keys, fmt, rows)


@swarm.command("inspect")
@pass_ctx
def swarm_inspect(ctx: Ctx) -> None:
    """This node's view of the swarm."""
    click.echo(json.dumps(ctx.client().get("/swarm"), indent=2))


# ----------------------------------------------------------------------------------- node


@cli.group(cls=VxnetGroup)
def node() -> None:
    """Manage swarm nodes (on the manager)."""


@node.command("ls")
@FORMAT
@pass_ctx
def node_ls(ctx: Ctx, fmt: str) -> None:
    """List the swarm's nodes."""
    client = ctx.client()
    me = client.get("/swarm").get("node_id")
    nodes = client.get("/nodes")
    rows = [["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"]]
    for n in nodes:
        star = " *" if n["id"] == me else ""
        rows.append(
            [
                n["id"] + star,
                n["hostname"],
                n["status"].capitalize(),
                n["availability"].capitalize(),
                n["manager_status"],
            ]
        )
    _emit(nodes, fmt, rows)


@node.command("rm")
@click.option("-f", "--force", is_flag=True)
@click.argument("nodes", nargs=-1, required=True)
@pass_ctx
def node_rm(ctx: Ctx, force: bool, nodes: tuple[str, ...]) -> None:
    """Remove nodes from the swarm."""
    for ref in nodes:
        ctx.client().delete(f"/nodes/{ref}" + ("?force=1" if force else ""))
        click.echo(ref)


# -------------------------------------------------------------------------------- network


@cli.group(cls=VxnetGroup)
def network() -> None:
    """Manage networks (overlay networks on the manager, bridge networks per node)."""


@network.command("create")
@click.option("-d", "--driver", default="bridge", help="overlay (swarm) or bridge (this node).")
@click.option("--attachable", is_flag=True, help="Let standalone containers join.")
@click.option("--ingress", is_flag=True, help="Make this the routing-mesh network.")
@click.option("--subnet")
@click.option("--gateway")
@click.option("--ip-range")
@click.option("-o", "--opt", "opts", multiple=True, help="Driver option KEY=VALUE (repeat).")
@click.argument("name")
@pass_ctx
def network_create(
    ctx: Ctx,
    driver: str,
    attachable: bool,
    ingress: bool,
    subnet: str | None,
    gateway: str | None,
    ip_range: str | None,
    opts: tuple[str, ...],
    name: str,
) -> None:
    """Create a network."""
    client = ctx.client()
    if driver == "bridge":
        if attachable or ingress or ip_range:
            raise UsageError("--attachable, --ingress and --ip-range are for overlay networks")
        options = dict(o.partition("=")[::2] for o in opts)
        r = client.post(
            "/local-networks",
            {"name": name, "subnet": subnet, "gateway": gateway, "options": options},
        )
        click.echo(r["Id"])
        return
    if driver != "overlay":
        raise UsageError(f"unknown driver {driver!r}: vxnet has overlay and bridge")
    r = client.post(
        "/swarm/networks",
        {
            "name": name,
            "driver": driver,
            "attachable": attachable,
            "ingress": ingress,
            "subnet": subnet,
            "gateway": gateway,
            "ip_range": ip_range,
            "options": list(opts),
        },
    )
    click.echo(r["id"])


def _all_networks(ctx: Ctx) -> list[dict[str, Any]]:
    client = ctx.client()
    out: list[dict[str, Any]] = []
    swarm_names: set[str] = set()
    if client.get("/swarm").get("is_manager"):
        for n in client.get("/swarm/networks"):
            out.append(
                {
                    "id": n["id"],
                    "name": n["name"],
                    "driver": "overlay",
                    "scope": "swarm",
                    "detail": n,
                }
            )
            swarm_names.add(n["name"])
    for n in client.get("/networks"):
        if n["name"] not in swarm_names:
            out.append(
                {
                    "id": f"vni-{n['vni']}",
                    "name": n["name"],
                    "driver": "overlay",
                    "scope": "swarm" if n.get("swarm") else "local",
                    "detail": n,
                }
            )
    for n in client.get("/local-networks"):
        out.append(
            {"id": n["Id"], "name": n["Name"], "driver": "bridge", "scope": "local", "detail": n}
        )
    return out


@network.command("ls")
@FORMAT
@pass_ctx
def network_ls(ctx: Ctx, fmt: str) -> None:
    """List networks (the swarm's on a manager, plus this node's)."""
    nets = _all_networks(ctx)
    rows = [["NETWORK ID", "NAME", "DRIVER", "SCOPE"]]
    rows += [[_short(n["id"]), n["name"], n["driver"], n["scope"]] for n in nets]
    _emit([n["detail"] for n in nets], fmt, rows)


@network.command("inspect")
@click.option("-v", "--verbose", is_flag=True, help="Also the peers (nodes) of the network.")
@click.option("--format", "fmt", type=click.Choice(["json"]), default="json")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def network_inspect(ctx: Ctx, verbose: bool, fmt: str, names: tuple[str, ...]) -> None:
    """Show networks in detail (Docker's field names)."""
    client = ctx.client()
    manager = client.get("/swarm").get("is_manager")
    out = []
    for name in names:
        try:
            if manager:
                out.append(
                    client.get(f"/swarm/networks/{name}" + ("?verbose=1" if verbose else ""))
                )
                continue
        except NotFound:
            pass
        out.append(client.get(f"/local-networks/{name}"))
    click.echo(json.dumps(out, indent=2))


@network.command("rm")
@click.option("-f", "--force", is_flag=True, help="Do not prompt before removing ingress.")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def network_rm(ctx: Ctx, force: bool, names: tuple[str, ...]) -> None:
    """Remove networks."""
    client = ctx.client()
    local = {n["Name"] for n in client.get("/local-networks")}
    failed = False
    for name in names:
        try:
            if name in local:
                client.delete(f"/local-networks/{name}")
            else:
                net = client.get(f"/swarm/networks/{name}")
                if (
                    net["Ingress"]
                    and not force
                    and not click.confirm(INGRESS_WARNING, default=False)
                ):
                    continue
                client.delete(f"/swarm/networks/{name}")
            click.echo(name)
        except VxnetError as exc:
            click.echo(f"Error response from daemon: {exc}", err=True)
            failed = True
    if failed:
        sys.exit(1)


# -------------------------------------------------------------------------------- service


@cli.group(cls=VxnetGroup)
def service() -> None:
    """Manage swarm services (on the manager)."""


@service.command("create", context_settings={"allow_interspersed_args": False})
@click.option("--name", required=True)
@click.option("--replicas", type=click.IntRange(0, 1000))
@click.option("--mode", type=click.Choice(["replicated", "global"]), default="replicated")
@click.option("--network", "networks", multiple=True, help="Attach to a network (repeat).")
@click.option(
    "-p",
    "--publish",
    "ports",
    multiple=True,
    help="8080:80[/udp] or published=8080,target=80,protocol=udp,mode=ingress",
)
@click.option("--endpoint-mode", type=click.Choice(["vip", "dnsrr"]), default="vip")
@click.option("--dns", multiple=True, help="Upstream DNS server of the tasks (up to 3).")
@click.option("-d", "--detach", is_flag=True, help="Do not wait for the service to converge.")
@click.argument("image")
@click.argument("cmd", nargs=-1)
@pass_ctx
def service_create(
    ctx: Ctx,
    name: str,
    replicas: int | None,
    mode: str,
    networks: tuple[str, ...],
    ports: tuple[str, ...],
    endpoint_mode: str,
    dns: tuple[str, ...],
    detach: bool,
    image: str,
    cmd: tuple[str, ...],
) -> None:
    """Create a service: IMAGE is whoami, echo, iperf3 or idle (or any with CMD...)."""
    svc = ctx.client().post(
        "/services",
        {
            "name": name,
            "image": image,
            "cmd": list(cmd[1:] if cmd[:1] == ("--",) else cmd),
            "replicas": replicas,
            "mode": mode,
            "networks": list(networks),
            "ports": list(ports),
            "endpoint_mode": endpoint_mode,
            "dns": list(dns),
        },
    )
    click.echo(svc["id"])
    if not detach:
        _converge(ctx, svc["name"])


def _converge(ctx: Ctx, name: str) -> None:
    """Wait until every task runs (as `docker service create` does), then refresh the lab."""
    client = ctx.client()
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while True:
        row = next((s for s in client.get("/services") if s["name"] == name), None)
        if row is None:
            break
        tasks = client.get(f"/services/{name}/tasks")
        running = sum(1 for t in tasks if t["state"] == "running")
        if running >= row["desired"] and row["pending"] == 0 and len(tasks) == row["desired"]:
            click.echo(f"overall progress: {running} out of {row['desired']} tasks")
            click.echo(f"verify: Service {name} converged")
            break
        if time.monotonic() > deadline:
            click.echo(
                f"overall progress: {running} out of {row['desired']} tasks "
                f"({row['pending']} pending: no suitable node); not converged",
                err=True,
            )
            break
        time.sleep(0.2)
    _sync_lab(ctx)


def _sync_lab(ctx: Ctx) -> None:
    """In a lab: wait until the hosts run what the manager assigned, then refresh peers."""
    try:
        lab = ctx.lab()
    except VxnetError:
        return  # not in a lab
    lab.converge()


@service.command("ls")
@FORMAT
@pass_ctx
def service_ls(ctx: Ctx, fmt: str) -> None:
    """List services."""
    svcs = ctx.client().get("/services")
    rows = [["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]]
    for s in svcs:
        ports = ", ".join(f"*:{p['published']}->{p['target']}/{p['protocol']}" for p in s["ports"])
        rows.append(
            [
                _short(s["id"]),
                s["name"],
                s["mode"],
                f"{s['running']}/{s['desired']}",
                s["image"],
                ports,
            ]
        )
    _emit(svcs, fmt, rows)


@service.command("ps")
@FORMAT
@click.argument("name")
@pass_ctx
def service_ps(ctx: Ctx, fmt: str, name: str) -> None:
    """List a service's tasks."""
    tasks = ctx.client().get(f"/services/{name}/tasks")
    rows = [["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"]]
    for t in tasks:
        label = f"{t['service_name']}.{t['slot'] or t['node_id'][:8]}"
        rows.append(
            [
                _short(t["id"]),
                label,
                t["image"],
                t["node"],
                t["desired"].capitalize(),
                t["state"].capitalize(),
                t["message"],
            ]
        )
    _emit(tasks, fmt, rows)


@service.command("inspect")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def service_inspect(ctx: Ctx, names: tuple[str, ...]) -> None:
    """Show services in detail."""
    client = ctx.client()
    click.echo(json.dumps([client.get(f"/services/{n}") for n in names], indent=2))


@service.command("scale")
@click.option("-d", "--detach", is_flag=True)
@click.argument("pairs", nargs=-1, required=True)
@pass_ctx
def service_scale(ctx: Ctx, detach: bool, pairs: tuple[str, ...]) -> None:
    """Scale services: SERVICE=REPLICAS ..."""
    for pair in pairs:
        name, _, count = pair.partition("=")
        if not count.isdigit():
            raise UsageError(f"invalid scale specifier {pair!r}: use SERVICE=REPLICAS")
        ctx.client().post(f"/services/{name}/scale", {"replicas": int(count)})
        click.echo(f"{name} scaled to {count}")
        if not detach:
            _converge(ctx, name)


@service.command("rm")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def service_rm(ctx: Ctx, names: tuple[str, ...]) -> None:
    """Remove services."""
    for name in names:
        ctx.client().delete(f"/services/{name}")
        click.echo(name)
    _sync_lab(ctx)


from vxnet import cli_gossip  # noqa: E402, F401  (the gossip group registers itself)

"""``vxnet lab validate`` and ``vxnet lab graph``: grading an exercise, drawing a live lab.

They register themselves on the ``lab`` group of :mod:`vxnet.cli` (imported there once).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vxnet.cli import Ctx, lab, pass_ctx
from vxnet.errors import VxnetError
from vxnet.lab import Lab
from vxnet.lab.graph import RENDERERS, collect
from vxnet.lab.probes import run_checks
from vxnet.lab.topology import check_lab_name, load_spec
from vxnet.lab.validate import exit_code, parse_checks, render_table, report_json

EXIT_ERROR = 2


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

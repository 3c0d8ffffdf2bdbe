"""The guided labs in ``lab/``, run as a learner runs them, then graded: every check must pass.

Each ``lab/NAME.md`` goes with ``lab/NAME.toml``.  Its ```` ```sh ```` and ```` ```python ````
blocks are run in order, under a unique lab name (``VXNET_LAB``, and ``lab up --name``).  A shell
line whose comment starts with ``# fails`` must fail; every other line must succeed.  The lab's
own ``vxnet lab down`` and ``export VXNET_LAB=...`` lines are the harness's business.  The lab is
torn down even when a step fails.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import need, unique_lab_name
from vxnet import netns
from vxnet.lab import builder
from vxnet.lab.topology import load_spec
from vxnet.lab.validate import KINDS, parse_checks

ROOT = Path(__file__).parent.parent
GUIDED = sorted(
    p.stem for p in (ROOT / "lab").glob("*.md") if (ROOT / "lab" / f"{p.stem}.toml").exists()
)
BLOCK = re.compile(r"```(sh|python)\n(.*?)```", re.S)


@dataclass(frozen=True)
class Step:
    kind: str  # "sh" or "python"
    code: str
    fails: bool = False


def steps(markdown: str) -> list[Step]:
    """The runnable steps of a guided lab, in order (a shell block gives one step per line)."""
    out = []
    for kind, code in BLOCK.findall(markdown):
        if kind == "python":
            out.append(Step("python", code))
            continue
        for line in code.replace("\\\n", " ").splitlines():
            command, _, comment = line.partition(" #")
            command = command.strip()
            if not command or command.startswith("export VXNET_LAB=") or "lab down" in command:
                continue
            out.append(Step("sh", command, comment.strip().startswith("fails")))
    return out


def run_step(step: Step, env: dict[str, str], lab: str) -> subprocess.CompletedProcess[str]:
    if step.kind == "python":
        argv = [sys.executable, "-c", step.code]
    else:
        command = step.code.replace("vxnet lab up ", f"vxnet lab up --name {lab} ", 1)
        vxnet = f'vxnet() {{ {shlex.quote(sys.executable)} -m vxnet "$@"; }}'
        argv = ["bash", "-c", f"{vxnet}\n{command}"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_the_harness_reads_the_steps() -> None:
    md = "```sh\nvxnet a   # comment\nexport VXNET_LAB=x\nvxnet b \\\n  c # fails: why\n```\n" \
         "```text\nnot run\n```\n```python\nprint(1)\n```\n"  # fmt: skip
    assert steps(md) == [Step("sh", "vxnet a"), Step("sh", "vxnet b    c", True),
                         Step("python", "print(1)\n")]  # fmt: skip


def test_docs_list_every_guided_lab_and_every_check_kind() -> None:
    docs = (ROOT / "docs" / "labs.md").read_text()
    assert len(GUIDED) >= 5
    for guide in GUIDED:
        assert parse_checks(load_spec(ROOT / "lab" / f"{guide}.toml").extra.get("check"))
        assert f"[`{guide}`](../lab/{guide}.md)" in docs
    for kind in KINDS:
        assert f"| `{kind}` |" in docs


@pytest.mark.root
@pytest.mark.parametrize("guide", GUIDED)
def test_guided_lab(guide: str) -> None:
    need("curl", "dig", "ping")
    markdown = (ROOT / "lab" / f"{guide}.md").read_text()
    assert f"vxnet lab up lab/{guide}.toml" in markdown
    assert f"vxnet lab validate lab/{guide}.toml" in markdown
    lab = unique_lab_name("l")
    env = dict(os.environ, VXNET_LAB=lab, PYTHONPATH=str(ROOT))
    try:
        for step in steps(markdown):
            r = run_step(step, env, lab)
            said = f"{step.code}\n--- exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            if "lab validate" in step.code:
                assert r.returncode == 0, said
                assert "0 failed, 0 errors" in r.stdout, said
            elif step.fails:
                assert r.returncode != 0, said
            else:
                assert r.returncode == 0, said
    finally:
        builder.down(lab)
    assert netns.list_with_prefix(builder.prefix(lab)) == []

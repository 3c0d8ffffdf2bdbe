"""Every command in the docs, run as a user runs it, so the docs never rot.

The convention, for every page under ``docs/`` (``docs/from-docker/README.md`` says it for
readers):

* A ```` ```sh ```` block is run: each line in its own shell, in page order, against the lab of
  its page.  A line whose comment starts with ``# fails`` must fail; every other line must
  succeed.  A ```` ```python ```` block is run the same way, as one step.
* A page with runnable blocks brings its own lab up first (``vxnet lab up --name NAME ...``) and
  ends with ``vxnet lab down --name NAME``.  The harness renames the lab to a name unique to the
  run and tears it down even when a step fails.
* Everything else is for reading and never run: ```` ```console ```` for commands shown without
  the lab they need (or too slow for a test, such as ``vxnet bench``), ```` ```text ```` for
  output, diagrams and usage lines, and ```` ```toml ````, ```` ```json ````,
  ```` ```mermaid ```` for what their names say.

It is the guided labs' harness (``tests/test_guided_labs.py``): the same steps, the same
``# fails`` marker, the same runner.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from tests.conftest import need, unique_lab_name
from tests.test_guided_labs import BLOCK, Step, run_step, steps
from vxnet import netns
from vxnet.lab import builder

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
#: pages whose runnable blocks another module runs (its lab name is part of its example)
RUN_ELSEWHERE = {"docs/lab-api.md": "tests/test_docs.py"}
#: info strings a fence may carry (see the module docstring)
LANGUAGES = {"sh", "python", "console", "text", "toml", "json", "mermaid"}
#: pages other engineers were rewriting when the convention came in: their bare fences are
#: theirs to label (```text / ```console); remove a page from here once it is labelled
UNLABELLED_FOR_NOW: set[str] = set()  # every page labels its fences now
FENCE = re.compile(r"^ {0,3}```(\S*)", re.M)
FENCED = re.compile(r"^ {0,3}```.*?^ {0,3}```", re.M | re.S)
LAB_UP = re.compile(r"vxnet lab up --name ([a-z0-9]+)\b")
SCENARIOS = 19


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def runnable_pages() -> list[str]:
    pages = sorted(DOCS.rglob("*.md"))
    return [rel(p) for p in pages if BLOCK.search(p.read_text()) and rel(p) not in RUN_ELSEWHERE]


PAGES = runnable_pages()


def opening_fences(markdown: str) -> list[str]:
    """The info string of every opening fence (closing fences alternate with them)."""
    return [m.group(1) for m in FENCE.finditer(markdown)][::2]


def page_lab(markdown: str) -> str:
    """The lab a page brings up: its first runnable step must be `vxnet lab up --name NAME`."""
    first = steps(markdown)[0]
    m = LAB_UP.match(first.code)
    assert first.kind == "sh" and m, f"start with `vxnet lab up --name NAME`, not {first.code!r}"
    return m.group(1)


def renamed(markdown: str, lab: str) -> str:
    """The page with its lab renamed everywhere (`--name`, `VXNET_LAB=`, `vx-NAME-h1`, ...)."""
    return re.sub(rf"\b{page_lab(markdown)}\b", lab, markdown)


def test_the_harness_reads_a_page() -> None:
    md = (
        "```sh\nvxnet lab up --name mylab f.toml\nexport VXNET_LAB=mylab\n```\n"
        "```console\nvxnet bench\n```\n```sh\nip netns exec vx-mylab-h1 true\n"
        "vxnet lab down --name mylab\n```\n"
    )
    assert page_lab(md) == "mylab"
    assert steps(renamed(md, "t0a1b2c")) == [
        Step("sh", "vxnet lab up --name t0a1b2c f.toml"),
        Step("sh", "ip netns exec vx-t0a1b2c-h1 true"),
    ]
    assert opening_fences(md) == ["sh", "console", "sh"]


def test_every_fence_says_whether_it_runs() -> None:
    bad = []
    for page in sorted(DOCS.rglob("*.md")):
        if rel(page) in UNLABELLED_FOR_NOW:
            continue
        for lang in opening_fences(page.read_text()):
            if lang not in LANGUAGES:
                bad.append(f"{rel(page)}: ```{lang}")
    assert not bad, f"label these fences ({', '.join(sorted(LANGUAGES))}): {bad}"


def test_every_runnable_page_brings_its_own_lab_and_takes_it_down() -> None:
    assert len(PAGES) >= 6
    for page in PAGES:
        markdown = (ROOT / page).read_text()
        lab = page_lab(markdown)
        last = BLOCK.findall(markdown)[-1][1].strip().splitlines()[-1]
        down = f"vxnet lab down --name {lab}"
        assert last == down, f"{page} must end with `{down}`"
    names = [page_lab((ROOT / p).read_text()) for p in PAGES]
    assert len(set(names)) == len(names), f"each page needs its own lab name: {names}"


def test_from_docker_maps_every_scenario_and_is_linked() -> None:
    index = (DOCS / "from-docker" / "README.md").read_text()
    for n in range(1, SCENARIOS + 1):
        assert re.search(rf"^\| {n} \|", index, re.M), f"scenario {n} missing from the index"
    for page in sorted((DOCS / "from-docker").glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name}" in index, f"{page.name} not linked from the index"
    readme = (ROOT / "README.md").read_text()
    assert "docs/from-docker/README.md" in readme and "docs/differences.md" in readme


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", FENCED.sub("", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_and_their_anchors_resolve() -> None:
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
    broken = []
    for page in [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]:
        for target, anchor in link.findall(FENCED.sub("", page.read_text())):
            if "://" in target:
                continue
            path = page.parent / target if target else page
            if not path.exists():
                broken.append(f"{rel(page)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                broken.append(f"{rel(page)} -> {target}#{anchor}")
    assert not broken, broken


@pytest.mark.root
@pytest.mark.parametrize("page", PAGES)
def test_docs_page_commands(page: str) -> None:
    need("curl", "dig", "ping", "nc", "ss")
    if importlib.util.find_spec("scapy") is None:
        pytest.skip("needs scapy for `vxnet trace` (`pip install vxnet[trace]`)")
    lab = unique_lab_name("d")
    markdown = renamed((ROOT / page).read_text(), lab)
    env = dict(os.environ, VXNET_LAB=lab, PYTHONPATH=str(ROOT))
    env.pop("VXNET_HOST", None)
    try:
        for step in steps(markdown):
            r = run_step(step, env, lab)
            said = f"{page}: {step.code}\n--- exit {r.returncode}\n{r.stdout[-2000:]}"
            said += r.stderr[-1000:]
            assert (r.returncode != 0) if step.fails else (r.returncode == 0), said
    finally:
        builder.down(lab)
    assert netns.list_with_prefix(builder.prefix(lab)) == []

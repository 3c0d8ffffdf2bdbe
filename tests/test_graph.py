"""``vxnet lab graph``: the renderers on a fixed model, then a live lab drawn from its daemons."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import unique_lab_name
from vxnet.lab import Lab
from vxnet.lab.graph import (
    GraphContainer,
    GraphHost,
    GraphNetwork,
    GraphService,
    LabGraph,
    Link,
    Peering,
    collect,
    links,
    to_dot,
    to_mermaid,
    to_text,
)

MODEL = LabGraph(
    "demo",
    hosts=(
        GraphHost("h1", "192.168.100.11", "192.168.100.11", "manager",
                  (GraphContainer("web.1.abc", (("ingress", "10.0.0.5"), ("front", "10.0.1.3")),
                                  "web"),)),
        GraphHost("h2", "192.168.100.12", "192.168.200.12", "worker",
                  (GraphContainer("client", (("front", "10.0.1.4"),)),)),
        GraphHost("h3", "192.168.100.13", "192.168.100.13", "worker, down"),
    ),
    networks=(
        GraphNetwork("ingress", 4096, "10.0.0.0/24", 1450, ingress=True),
        GraphNetwork("front", 4097, "10.0.1.0/24", 1416, encrypted=True),
    ),
    peerings=(
        Peering("h1", "front", "h2", 2),
        Peering("h2", "front", "h1", 2),
        Peering("h1", "front", "192.168.100.200", 1),
        Peering("h2", "ingress", "h1", 1),
    ),
    services=(GraphService("web", "replicated", "vip", 1, 1,
                           (("front", "10.0.1.2"), ("ingress", "10.0.0.4")), ("8080->80/tcp",)),),
)  # fmt: skip


def test_peerings_fold_into_links() -> None:
    assert links(MODEL) == [
        Link("front", "h1", "192.168.100.200", False),
        Link("front", "h1", "h2", True),
        Link("ingress", "h2", "h1", False),
    ]
    assert MODEL.external_vteps == ["192.168.100.200"]


def test_text() -> None:
    assert to_text(MODEL) == (
        "lab demo\n"
        "networks:\n"
        "  ingress  VNI 4096  10.0.0.0/24  MTU 1450  (ingress)\n"
        "  front    VNI 4097  10.0.1.0/24  MTU 1416  (encrypted)\n"
        "hosts:\n"
        "  h1  192.168.100.11  [manager]\n"
        "    web.1.abc  ingress 10.0.0.5, front 10.0.1.3  (task of web)\n"
        "  h2  192.168.100.12, data 192.168.200.12  [worker]\n"
        "    client  front 10.0.1.4\n"
        "  h3  192.168.100.13  [worker, down]\n"
        "    (no containers)\n"
        "peers (from each host's FDB):\n"
        "  front    h1 -> 192.168.100.200\n"
        "  front    h1 <-> h2\n"
        "  ingress  h2 -> h1\n"
        "  192.168.100.200: a VTEP outside the lab\n"
        "services:\n"
        "  web  replicated 1/1, VIP 10.0.1.2 on front, VIP 10.0.0.4 on ingress, "
        "published 8080->80/tcp\n"
    )


def test_mermaid() -> None:
    out = to_mermaid(MODEL).splitlines()
    assert out[0] == "flowchart LR"
    assert '  subgraph h_h1["h1 192.168.100.11  [manager]"]' in out
    assert '    c_h1_web_1_abc["web.1.abc<br/>ingress 10.0.0.5, front 10.0.1.3"]' in out
    assert '    e_h3["no containers"]' in out
    assert '  n_front{{"front<br/>VNI 4097  10.0.1.0/24  MTU 1416  (encrypted)"}}' in out
    assert "  c_h1_web_1_abc --- n_ingress" in out and "  c_h1_web_1_abc --- n_front" in out
    assert '  h_h1 <-->|"front"| h_h2' in out
    assert '  h_h2 -->|"ingress"| h_h1' in out
    assert '  h_h1 -->|"front"| x_192_168_100_200' in out
    assert '  x_192_168_100_200[/"VTEP 192.168.100.200, outside the lab"/]' in out
    assert "  s_web -.- c_h1_web_1_abc" in out
    assert out.count("  end") == 3


def test_mermaid_quotes_are_escaped() -> None:
    odd = LabGraph("q", (GraphHost("h1", "a", "a", 'role "x"'),), ())
    assert "#quot;x#quot;" in to_mermaid(odd)


def test_dot() -> None:
    out = to_dot(MODEL)
    assert out.startswith('digraph "demo" {\n  rankdir=LR;\n')
    assert '  subgraph "cluster_h2" {\n    label="h2";\n' in out
    assert '"host:h2" [shape=box3d, label="192.168.100.12, data 192.168.200.12  [worker]"];' in out
    assert '"c_h1_web_1_abc" [label="web.1.abc\\n10.0.0.5\\n10.0.1.3"];' in out
    assert '"host:h1" -> "host:h2" [label="front", dir=both];' in out
    assert '"host:h2" -> "host:h1" [label="ingress", dir=forward];' in out
    assert '"host:192.168.100.200" [shape=box3d, style=dashed' in out
    assert '"svc:web" -> "c_h1_web_1_abc" [style=dashed];' in out
    assert out.count("{") == out.count("}") and out.endswith("}\n")


# ---------------------------------------------------------------------------- live lab


@pytest.fixture(scope="module")
def drawn() -> Iterator[Lab]:
    lab = Lab(hosts=3, name=unique_lab_name("g"))
    try:
        lab.run("h1", "web", "front", "whoami")
        lab.run("h2", "client", "front", "idle")
        lab.manager.post("/services", {"name": "api", "image": "whoami", "replicas": 1,
                                       "networks": ["back"]})  # fmt: skip
        lab.converge()
        yield lab
    finally:
        lab.down()


@pytest.mark.root
def test_the_live_lab_is_drawn_from_its_daemons(drawn: Lab) -> None:
    graph = collect(drawn)
    assert [h.name for h in graph.hosts] == ["h1", "h2", "h3"]
    assert graph.hosts[0].address == "192.168.100.11" and graph.hosts[0].role == "manager"
    vnis = {n.name: n.vni for n in graph.networks}
    assert vnis["front"] == 4097 and vnis["back"] == 4098 and vnis["ingress"] == 4096
    where = {c.name: h.name for h in graph.hosts for c in h.containers}
    assert (where["web"], where["client"]) == ("h1", "h2")
    assert Link("front", "h1", "h2", True) in links(graph)
    (api,) = graph.services
    assert (api.name, api.running, api.vips[0][0]) == ("api", 1, "back")
    assert any(c.service == "api" for h in graph.hosts for c in h.containers)


@pytest.mark.root
def test_lab_graph_command(drawn: Lab) -> None:
    def graph(fmt: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "vxnet", "lab", "graph", "--name", drawn.name, "--format", fmt],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "  front    h1 <-> h2" in graph("text")
    assert '  h_h1 <-->|"front"| h_h2' in graph("mermaid")
    assert '"host:h1" -> "host:h2" [label="front", dir=both];' in graph("dot")

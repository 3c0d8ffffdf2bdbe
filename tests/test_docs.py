"""The docs as a user would run them: the README's main job and the Python examples."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vxnet.lab import builder

pytestmark = pytest.mark.root
ROOT = Path(__file__).parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_lab_api_example_runs() -> None:
    (block,) = python_blocks(ROOT / "docs" / "lab-api.md")
    try:
        r = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, check=False
        )
        assert r.returncode == 0, r.stderr
        assert "frames received on h1" in r.stdout
    finally:
        builder.down("apidemo")


def test_readme_main_job_is_the_demo_and_it_passes() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "vxnet lab demo" in readme and ".ci/install && python -m pytest" in readme
    assert ".ci/install && python -m pytest" in (ROOT / ".ci" / "run").read_text()
    r = subprocess.run(
        [sys.executable, "-m", "vxnet", "lab", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "steps verified" in r.stdout and "FAILED" not in r.stdout
    assert not builder.run_dir("demo").exists()


def test_lab_file_walkthrough() -> None:
    """The commands in lab/two-networks.toml's header, as a user types them."""
    vx = [sys.executable, "-m", "vxnet"]
    try:
        up = subprocess.run(
            [*vx, "lab", "up", str(ROOT / "lab" / "two-networks.toml")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert up.returncode == 0, up.stderr
        ping = subprocess.run(
            [
                *vx,
                "--lab",
                "twonets",
                "exec",
                "client",
                "--",
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "10.10.1.2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        inspect = subprocess.run(
            [*vx, "--lab", "twonets", "network", "inspect", "db"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        (db,) = json.loads(inspect.stdout)
        assert db["IPAM"]["Config"][0] == {"Subnet": "10.10.2.0/24", "Gateway": "10.10.2.1"}
        assert db["Options"]["com.docker.network.driver.overlay.vxlanid_list"] == "5002"
        assert db["Options"]["com.docker.network.driver.mtu"] == "1400"
    finally:
        down = subprocess.run(
            [*vx, "lab", "down", "--name", "twonets"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert down.returncode == 0

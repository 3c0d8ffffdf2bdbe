"""A thin runner for nftables (the ``nft`` program) inside network namespaces.

vxnet owns whole tables and replaces them in one transaction: ``apply_table`` sends nft a file
that creates the table if missing, deletes it, and declares it again with its new contents, so
applying is atomic (old rules or new rules, never a mix) and idempotent.

Blocking (runs ``nft`` as a child process): trio code calls these through
``trio.to_thread.run_sync``.  ``ns=None`` means the caller's own namespace; everything vxnet
itself builds passes a namespace name, so the machine's own ruleset is never touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from vxnet import netns
from vxnet.errors import LabError, UsageError

FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
TIMEOUT = 30.0


def apply_table(ns: str | None, family: str, table: str, body: str) -> None:
    """Replace table ``family table`` in namespace ``ns`` by one declaring ``body``.

    ``body`` is the text between the table's braces (chains, sets, maps).
    """
    head = _table(family, table)
    script = f"{head} {{}}\ndelete {head}\n{head} {{\n{body.rstrip()}\n}}\n"
    _run(ns, ["-f", "-"], script)


def delete_table(ns: str | None, family: str, table: str) -> None:
    """Delete table ``family table`` in namespace ``ns``; fine if it does not exist."""
    head = _table(family, table)
    _run(ns, ["-f", "-"], f"{head} {{}}\ndelete {head}\n")


def list_table(ns: str | None, family: str, table: str) -> str:
    """The table as ``nft list table`` prints it (a LabError if it does not exist)."""
    return _run(ns, ["list", *_table(family, table).split()], None)


def _table(family: str, table: str) -> str:
    if family not in FAMILIES:
        raise UsageError(f"nftables family {family!r} is not one of {', '.join(sorted(FAMILIES))}")
    if not _IDENTIFIER.match(table):
        raise UsageError(f"nftables table name {table!r}: use letters, digits, '_', '.' or '-'")
    return f"table {family} {table}"


def _run(ns: str | None, args: list[str], script: str | None) -> str:
    binary = shutil.which("nft")
    if binary is None:
        raise LabError("nft not found: apt-get install nftables")
    argv = [binary, *args]
    if ns is not None:
        argv = netns.exec_argv(ns, argv)
    where = f"namespace {ns}" if ns is not None else "the current namespace"
    try:
        proc = subprocess.run(
            argv, input=script, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"nft {' '.join(args)} in {where}: {exc}") from None
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
        raise LabError(f"nft {' '.join(args)} in {where} failed: {message}")
    return proc.stdout

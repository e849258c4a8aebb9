"""``distbudget install`` (the Redis Functions library, by an admin) and ``distbudget acl`` (the rules
of a worker and an admin user for a prefix). See docs/deployment-acl.md."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from distbudget.cli._common import CommandError, connect


def _functions() -> Any:
    """``distbudget.engines.functions`` (issue 14's Functions path), or a clear error before it exists."""
    try:
        return importlib.import_module("distbudget.engines.functions")
    except ImportError as exc:
        raise CommandError(f"this distbudget has no Redis Functions library ({exc})", code=2) from exc


def run_install(args: argparse.Namespace) -> int:
    """Load this version's Redis Functions library on the server (on every master of a Cluster), so
    workers call FCALL and need no script rights. Idempotent. Needs an admin user (FUNCTION LOAD).
    With --prune, also remove the other distbudget library versions (only once every worker runs
    this version)."""
    functions = _functions()
    conn = connect(args, need="")
    name = functions.library()[0]  # the library's name carries its version (engines/scripts.py)
    for node, status in functions.install_library(conn.client, prune=args.prune).items():
        print(f"{node}: {name} {status}")
    return 0


def run_acl(args: argparse.Namespace) -> int:
    """Print ACL SETUSER lines for a least-privilege worker (FCALL, its prefix's keys and channels
    only) and an admin (who may also install the library and read the server's config). Run them on
    every node of a Cluster, with a real password. Nothing is sent to Redis."""
    functions = _functions()
    name = args.user or args.prefix
    for role in functions.ROLES:
        rules = functions.acl_rules(args.prefix, role)
        print(" ".join(["ACL", "SETUSER", f"{name}-{role}", "reset", "on", ">PASSWORD", *rules]))
    return 0

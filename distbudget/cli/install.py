"""``distbudget install`` (the Redis Functions library, by an admin) and ``distbudget acl`` (the rules
of a worker and an admin user for a prefix). See docs/deployment-acl.md."""

from __future__ import annotations

import argparse

from distbudget.cli._common import connect
from distbudget.engines import functions
from distbudget.engines.scripts import library


def run_install(args: argparse.Namespace) -> int:
    """Load this version's Redis Functions library on the server (on every master of a Cluster), so
    workers call FCALL and need no script rights. Idempotent. Needs an admin user (FUNCTION LOAD).
    With --prune, also remove the other distbudget library versions (only once every worker runs
    this version)."""
    conn = connect(args, need="")
    name = library()[0]  # the library's name carries its version (engines/scripts.py)
    for node, status in functions.install_library(conn.client, prune=args.prune).items():
        print(f"{node}: {name} {status}")
    return 0


def run_acl(args: argparse.Namespace) -> int:
    """Print ACL SETUSER lines for a least-privilege worker (FCALL, its prefix's keys and channels
    only) and an admin (who may also install the library and read the server's config). Run them on
    every node of a Cluster, with a real password. Nothing is sent to Redis."""
    name = args.user or args.prefix
    for role in functions.ROLES:
        rules = functions.acl_rules(args.prefix, role)
        print(" ".join(["ACL", "SETUSER", f"{name}-{role}", "reset", "on", ">PASSWORD", *rules]))
    return 0

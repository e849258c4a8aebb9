"""The ``distbudget`` command (``distbudget --help``; docs/cli.md). One module per job: ``main`` holds
the table of subcommands (``main.COMMANDS``) and runs one; ``status``, ``admin`` (reset, update),
``report``, ``doctor``, ``watch``, ``ledger``, ``servers`` (exporter, dashboard), ``install``
(install, acl), ``prices`` and ``demo`` each run theirs; ``_common`` holds what they share."""

from distbudget.cli.main import main

__all__ = ["main"]

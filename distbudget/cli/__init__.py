"""The ``distbudget`` command (``distbudget --help``). One module per job: ``main`` wires the
subcommands; ``status``, ``admin`` (update, reset), ``doctor``, ``watch``, ``ledger``, ``servers``
(exporter, dashboard), ``prices`` and ``demo`` each hold one."""

from distbudget.cli.main import main

__all__ = ["main"]

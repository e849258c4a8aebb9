"""What ``record()``'s fast paths compile once per budget, session and model: the plan, validated and
priced, and the constant parts of the record and of the ledger entry. The budget's side
(``_accounting.py``) fills it; each engine's fast path adds its own compiled part: the embedded
engine's counters (``engines/memory.py``: ``FastPlan``), the Redis engine's packed script call
(``engines/codec.py``: ``RecordWire``, kept in ``wire``)."""

from __future__ import annotations

from typing import Any

from distbudget._core.plan import Plan


class FastCall:
    """A (session, model) compiled for ``record()``'s fast path. ``checks``: per limit, (its usage's
    index in the totals, its value): a charge leaving a usage above its value is not a plain one."""

    __slots__ = (
        "canonical",
        "checks",
        "i_rate",
        "ledger_head",
        "maxlen",
        "o_rate",
        "plan",
        "record_fields",
        "scope",
        "wire",
    )

    def __init__(self, plan: Plan, maxlen: int, i_rate: int, o_rate: int, record_fields: dict[str, Any]) -> None:
        self.plan = plan
        self.maxlen = maxlen  # the ledger's MAXLEN (0: no ledger)
        self.ledger_head = plan.ledger_head
        self.i_rate, self.o_rate = i_rate, o_rate  # nano-USD per million input / output tokens
        self.record_fields = record_fields  # a UsageRecord's constant fields (the budget's)
        self.canonical = self.scope = ""  # its canonical model and scope (the budget's)
        self.checks = plan.used_at
        self.wire: Any = None  # the Redis engine's compiled call, made at its first use

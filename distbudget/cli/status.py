"""``distbudget status``: the scope tree with, per limit, used / held / limit / % / refusals; session
limits with their top sessions; ``--near``, ``--json``, ``--watch``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from distbudget._core.report import aligned
from distbudget._exceptions import BackendError
from distbudget._fleet import FleetReader, LimitRow, ScopeRow, SessionRow, Snapshot
from distbudget.cli._common import (
    BOLD,
    DIM,
    RESET,
    amount,
    connect,
    level_colour,
    pct,
    use_colour,
)

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: --watch redraws in place


def run(args: argparse.Namespace) -> int:
    """Show every registered scope (as a tree) with, per limit, used / held / limit / % and
    refusals, highest % first. Limits counted per session show their top sessions (the busiest
    among those charged recently, from the ledger)."""
    conn = connect(args)
    reader = FleetReader(conn.manager(), conn.prefix, top_sessions=args.sessions)
    colour = use_colour(sys.stdout, args.color) and not args.json
    while True:
        try:
            snap = filter_near(reader.read(), args.near)
        except BackendError as exc:
            if not args.watch:
                raise
            text = f"distbudget status: error: {exc} (retrying)"  # a watch outlives an outage
        else:
            text = json.dumps(snap.as_json(), indent=2) if args.json else "\n".join(render(snap, colour))
        if args.watch:
            sys.stdout.write(CLEAR + f"distbudget status, prefix {conn.prefix!r}, every {args.watch:g} s\n\n")
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def filter_near(snap: Snapshot, near: float | None) -> Snapshot:
    """Only the limits at or above ``near`` (and the scopes on the way to them)."""
    if near is None:
        return snap
    keep: dict[str, ScopeRow] = {}
    for s in snap.scopes:
        limits = [lim for lim in s.limits if lim.pct >= near]
        keep[s.name] = ScopeRow(s.name, s.parent, s.depth, s.hard_stop, s.total, s.per_model, limits)
    shown = {name for name, s in keep.items() if s.limits}
    for name in list(shown):  # the ancestors of a shown scope frame it
        parent = keep[name].parent
        while parent is not None and parent in keep:
            shown.add(parent)
            parent = keep[parent].parent
    return Snapshot(snap.prefix, snap.read_at, [keep[s.name] for s in snap.scopes if s.name in shown])


def render(snap: Snapshot, colour: bool = False) -> list[str]:
    if not snap.scopes:
        return [f"no scope of prefix {snap.prefix!r} matches"]
    rows: list[list[str]] = [["SCOPE / LIMIT", "USED", "HELD", "LIMIT", "%", "REFUSED"]]
    paint: list[str] = [BOLD]  # per row: BOLD for the header and scope lines, else the colour of its %
    totals: dict[int, str] = {}  # scope line index -> its totals, appended after alignment
    for s in snap.scopes:
        pad = "  " * s.depth
        totals[len(rows)] = (
            f"  ({s.total['requests']:,} calls, {s.total['tokens']:,} tokens, ${s.total['cost_usd']:,.6f}"
            + (", soft limits)" if not s.hard_stop else ")")
        )
        rows.append([pad + s.name, "", "", "", "", ""])
        paint.append(BOLD)
        for lim in s.limits:
            label = lim.limit_type + (" (top session)" if lim.per_session else "")
            rows.append(_limit_cells(pad + "  " + label, lim))
            paint.append(level_colour(lim.pct, lim.thresholds))
            for sess in lim.sessions:
                rows.append(_limit_cells(pad + "    session " + sess.session_id, sess))
                paint.append(level_colour(sess.pct, lim.thresholds))
    lines = aligned(rows, right={1, 2, 3, 4, 5})
    out = []
    for i, (line, row, tint) in enumerate(zip(lines, rows, paint, strict=True)):
        if i in totals:  # a scope line: its name, then its totals (not aligned with the columns)
            out.append((BOLD + row[0] + RESET if colour else row[0]) + totals[i])
        elif tint == BOLD or not colour:
            out.append(BOLD + line + RESET if colour else line)
        else:  # colour the % cell: the fifth column, found from the right
            cell = row[4]
            at = line.rfind(cell, 0, len(line) - len(row[5]))
            out.append(line[:at] + tint + cell + RESET + line[at + len(cell) :])
    if colour:
        out.append(DIM + f"read at {time.strftime('%H:%M:%S', time.localtime(snap.read_at))}" + RESET)
    return out


def _limit_cells(label: str, lim: LimitRow | SessionRow) -> list[str]:
    refusals = "-" if lim.refusals is None else f"{lim.refusals:,}"
    return [
        label,
        amount(lim.metric, lim.used),
        amount(lim.metric, lim.held),
        amount(lim.metric, lim.limit),
        pct(lim.pct),
        refusals,
    ]

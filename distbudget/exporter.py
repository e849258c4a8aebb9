"""Prometheus metrics (``pip install 'distbudget[prometheus]'``): the fleet's budgets read from the
registry, and this process's own client metrics.

:class:`BudgetCollector` reads a whole prefix per scrape through :class:`distbudget._fleet.FleetReader`
(the registry, then one pipeline of every scope's summary: bounded whatever the number of scopes)::

    distbudget_up                                    1 when the last read succeeded
    distbudget_scopes                                registered scopes
    distbudget_scrape_duration_seconds               time the read took
    distbudget_limit{scope,limit,metric}             a limit's value (USD for metric="cost")
    distbudget_used{scope,limit,metric}              used in its window (not for per-session limits)
    distbudget_held{scope,limit,metric}              held by live reservations (likewise)
    distbudget_used_ratio{scope,limit,metric}        used / limit
    distbudget_refusals_total{scope,limit,metric}    calls refused by the limit since the scope's reset
    distbudget_spend_usd_total{scope,model}          spend since the scope's last reset
    distbudget_tokens_total{scope,model}, distbudget_requests_total{scope,model}

No session or request labels (unbounded cardinality): a per-session limit exports its value only.

With budgets or managers passed to :func:`instrument`, the collector adds this process's client
metrics: ``distbudget_client_calls_total{operation}``, ``distbudget_client_latency_seconds`` (a
histogram per operation), ``distbudget_client_errors_total``, ``distbudget_client_degraded`` and
``distbudget_client_journal_length`` (see ``Budget.backend_status``).

``distbudget exporter --port 9464`` serves ``/metrics`` for a whole prefix.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from distbudget._fleet import FleetReader

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ClientMetrics:
    """Calls and latency of one engine (shared by a manager's budgets), counted at the engine seam."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list[float]] = {}  # operation -> bucket counts, then count, then sum
        self.errors: dict[str, int] = {}
        self.holders: list[Any] = []  # budgets and managers whose backend_status is reported

    def observe(self, operation: str, seconds: float, failed: bool) -> None:
        with self.lock:
            row = self.calls.get(operation)
            if row is None:
                row = self.calls[operation] = [0.0] * (len(LATENCY_BUCKETS) + 2)
            i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
            if i < len(LATENCY_BUCKETS):
                row[i] += 1
            row[-2] += 1
            row[-1] += seconds
            if failed:
                self.errors[operation] = self.errors.get(operation, 0) + 1


def _operation(args: tuple[Any, ...]) -> str:
    first = args[0] if args else None
    return first if isinstance(first, str) else type(first).__name__.lower()


def instrument(target: Any, metrics: ClientMetrics | None = None) -> ClientMetrics:
    """Count the calls a ``Budget`` / ``BudgetManager`` (sync) makes to its engine, with latency.
    Every budget sharing that engine (a manager's) is measured; returns the metrics to pass to
    :class:`BudgetCollector`."""
    metrics = metrics if metrics is not None else ClientMetrics()
    engine = getattr(target, "engine", None) or target._engine
    name = "execute" if hasattr(engine, "execute") else "apply"
    inner = getattr(engine, name)
    if getattr(inner, "_distbudget_metrics", None) is None:
        counted = metrics

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            failed = True
            try:
                result = inner(*args, **kwargs)
                failed = False
                return result
            finally:
                counted.observe(_operation(args), time.perf_counter() - began, failed)

        timed._distbudget_metrics = metrics  # type: ignore[attr-defined]
        setattr(engine, name, timed)
        _time_fast_path(engine, metrics)
    else:
        metrics = inner._distbudget_metrics
    metrics.holders.append(target)
    return metrics


# record()'s fast path, by engine: its method (which the budgets look up at each call) and its answer
# when it declined the call, which then goes to ``execute`` (counted there)
_FAST_PATHS = (("record_fast", None), ("fast_record", False))


def _time_fast_path(engine: Any, counted: ClientMetrics) -> None:
    """Count the charges ``record()``'s fast path makes without ``execute`` as ``record`` calls."""
    for name, declined in _FAST_PATHS:
        inner = getattr(engine, name, None)
        if inner is None:
            continue

        def timed(*args: Any, inner: Callable[..., Any] = inner, declined: Any = declined) -> Any:
            began = time.perf_counter()
            answer: Any = declined
            try:
                answer = inner(*args)
                return answer
            finally:
                if answer is not declined:  # an error raised, or returned (a BackendError): failed
                    counted.observe("record", time.perf_counter() - began, isinstance(answer, Exception))

        setattr(engine, name, timed)


class BudgetCollector(Collector):
    """Collects the metrics above. ``fleet``: a ``BudgetManager`` (its Redis and prefix), a Redis URL or
    client (with ``prefix``), or None (only client metrics); ``client``: from :func:`instrument`."""

    def __init__(self, fleet: Any = None, *, prefix: str = "distbudget", client: ClientMetrics | None = None) -> None:
        self.reader = fleet if isinstance(fleet, FleetReader) or fleet is None else FleetReader(fleet, prefix)
        self.client = client
        self._reading = threading.Lock()  # concurrent scrapes share the reader's cached budgets

    def collect(self) -> Iterator[Metric]:
        if self.reader is not None:
            with self._reading:
                families = list(self._fleet(self.reader))
            yield from families
        if self.client is not None:
            yield from self._client(self.client)

    @staticmethod
    def _fleet(reader: FleetReader) -> Iterator[Metric]:
        began = time.perf_counter()
        up = GaugeMetricFamily("distbudget_up", "1 when the last read of the fleet succeeded")
        try:
            snap = reader.read()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        labels = ["scope", "limit", "metric"]
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "limit": GaugeMetricFamily("distbudget_limit", "A limit's value (USD for metric=cost)", labels=labels),
            "used": GaugeMetricFamily("distbudget_used", "Used in the limit's window", labels=labels),
            "held": GaugeMetricFamily("distbudget_held", "Held by live reservations", labels=labels),
            "ratio": GaugeMetricFamily("distbudget_used_ratio", "Used / limit", labels=labels),
            "refusals": CounterMetricFamily("distbudget_refusals", "Calls refused by the limit", labels=labels),
        }
        per_model = ["scope", "model"]
        spend = CounterMetricFamily("distbudget_spend_usd", "Spend since the scope's last reset", labels=per_model)
        tokens = CounterMetricFamily("distbudget_tokens", "Tokens since the scope's last reset", labels=per_model)
        calls = CounterMetricFamily("distbudget_requests", "Calls since the scope's last reset", labels=per_model)
        for scope in snap.scopes:
            for lim in scope.limits:
                key = [scope.name, lim.limit_type, lim.metric]
                fams["limit"].add_metric(key, lim.limit)
                if lim.refusals is not None:
                    fams["refusals"].add_metric(key, lim.refusals)
                if lim.per_session:
                    continue  # usage is per session: no fleet-wide figure, and no session labels
                fams["used"].add_metric(key, lim.used)
                fams["held"].add_metric(key, lim.held)
                fams["ratio"].add_metric(key, lim.pct)
            for model, row in scope.per_model.items():
                spend.add_metric([scope.name, model], row["cost_usd"])
                tokens.add_metric([scope.name, model], row["tokens"])
                calls.add_metric([scope.name, model], row["requests"])
        up.add_metric([], 1)
        yield up
        count = GaugeMetricFamily("distbudget_scopes", "Registered scopes")
        count.add_metric([], len(snap.scopes))
        yield count
        yield from fams.values()
        yield from (spend, tokens, calls)
        took = GaugeMetricFamily("distbudget_scrape_duration_seconds", "Seconds the fleet read took")
        took.add_metric([], time.perf_counter() - began)
        yield took

    @staticmethod
    def _client(metrics: ClientMetrics) -> Iterator[Metric]:
        ops = ["operation"]
        calls = CounterMetricFamily("distbudget_client_calls", "Engine calls of this process", labels=ops)
        errors = CounterMetricFamily("distbudget_client_errors", "Engine calls that raised", labels=ops)
        latency = HistogramMetricFamily(
            "distbudget_client_latency_seconds", "Engine call latency of this process", labels=ops
        )
        with metrics.lock:
            rows = {op: list(row) for op, row in metrics.calls.items()}
            failed = dict(metrics.errors)
        for op, row in sorted(rows.items()):
            calls.add_metric([op], row[-2])
            errors.add_metric([op], failed.get(op, 0))
            cumulative, buckets = 0.0, []
            for bound, n in zip(LATENCY_BUCKETS, row, strict=False):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", row[-2]))
            latency.add_metric([op], buckets, row[-1])
        yield from (calls, errors, latency)
        degraded = GaugeMetricFamily("distbudget_client_degraded", "1 while the backend is unavailable")
        journal = GaugeMetricFamily("distbudget_client_journal_length", "Charges journaled, not yet replayed")
        statuses = [_status(h) for h in metrics.holders]
        degraded.add_metric([], max((int(s.get("degraded", False)) for s in statuses), default=0))
        journal.add_metric([], max((int(s.get("journaled", 0)) for s in statuses), default=0))
        yield from (degraded, journal)


def _status(holder: Any) -> dict[str, Any]:
    """A budget's ``backend_status``; a manager's: that of any of its budgets (they share one engine
    and one failure state)."""
    status = getattr(holder, "backend_status", None)
    if isinstance(status, dict):
        return status
    budgets = list(getattr(holder, "_budgets", {}).values())
    return budgets[0].backend_status if budgets else {}


def registry_for(collectors: Iterable[Collector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry


def serve(fleet: Any, port: int = 9464, addr: str = "127.0.0.1", *, prefix: str = "distbudget") -> Any:
    """Serve ``/metrics`` for a whole prefix (``fleet`` as for :class:`BudgetCollector`) in a background
    thread; returns the server (``server.shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr, registry=registry_for([BudgetCollector(fleet, prefix=prefix)]))
    return server

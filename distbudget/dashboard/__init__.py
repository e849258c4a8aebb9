"""``distbudget dashboard``: one live web page over a prefix, served by the standard library.

No front-end build and no web framework: ``page.html`` (plain HTML, CSS and JavaScript) is package
data, served by a ``ThreadingHTTPServer`` next to a small JSON API:

    GET  /                 the page (holds no data: it fetches the API)
    GET  /api/snapshot     the fleet (``distbudget status --json``'s schema), top 3 sessions per limit
    GET  /api/ledger?n=50  the newest ledger entries of every tree, newest first
    GET  /api/alerts       server-sent events: the alert feed (an AlertListener in a thread)
    POST /api/reset        {"scope": ..., "session": ...}: only with --allow-writes

With a token, every API request needs ``Authorization: Bearer <token>`` (the event stream, which
browsers open without headers, takes ``?token=``). Writes also need the ``X-Distbudget`` header, which
a cross-site form cannot send. Why the standard library: an SSE feed and a few JSON routes do not
need an ASGI server, and the dashboard then costs no dependency at all.
"""

from __future__ import annotations

import collections
import hmac
import json
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from distbudget._core import ledger as L
from distbudget._core.keys import KeySpace
from distbudget._core.types import BudgetAlert
from distbudget._fleet import FleetReader, budget_of, read_ledger_tails
from distbudget.manager import BudgetManager

TOP_SESSIONS = 3
RECENT_ALERTS = 50
HEARTBEAT_S = 10.0
MAX_LEDGER_ROWS = 500


def alert_json(alert: BudgetAlert) -> dict[str, Any]:
    by = alert.requested_by._asdict() if alert.requested_by is not None else None
    return {**asdict(alert), "level": alert.level.value, "pct": alert.pct, "requested_by": by}


class AlertFeed:
    """The alerts heard since the dashboard started (the latest ``RECENT_ALERTS``), and a condition
    the event streams wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.recent: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=RECENT_ALERTS)
        self.count = 0
        self.closed = False

    def add(self, alert: BudgetAlert) -> None:
        with self.cond:
            self.count += 1
            self.recent.append((self.count, alert_json(alert)))
            self.cond.notify_all()

    def after(self, seen: int, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """Alerts numbered above ``seen``, waiting up to ``timeout`` for one."""
        with self.cond:
            if self.count <= seen and not self.closed:
                self.cond.wait(timeout)
            return [(n, a) for n, a in self.recent if n > seen]

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Dashboard:
    """The dashboard of a manager's prefix (a manager on Redis: the alert feed reads its streams)."""

    def __init__(self, manager: BudgetManager, *, allow_writes: bool = False, token: str | None = None) -> None:
        from distbudget.alerts import AlertListener

        self.manager = manager
        self.reader = FleetReader(manager, top_sessions=TOP_SESSIONS)
        self.prefix = self.reader.prefix
        self.read_lock = threading.Lock()  # one reader, its budgets cached between reads
        self.allow_writes = allow_writes
        self.token = token or None
        self.feed = AlertFeed()
        self.listener = AlertListener(redis=self.reader.client, prefix=self.prefix, from_start=False)
        self.listener.start(self.feed.add)
        self.page = (resources.files(__package__) / "page.html").read_bytes()

    def close(self) -> None:
        self.feed.close()
        self.listener.stop()

    def snapshot(self) -> dict[str, Any]:
        with self.read_lock:
            data = self.reader.read().as_json()
        data["allow_writes"] = self.allow_writes
        return data

    def ledger(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` entries over every tree of the registry, newest first."""
        with self.read_lock:
            configs = [json.loads(c) for c in self.reader.registry().values()]
        keys = sorted(KeySpace(self.prefix, c["name"]).ledger for c in configs if c["parent"] is None)
        tails = read_ledger_tails(self.manager._engine, keys, n)
        entries = [L.parse_entry(i, f) for tail in tails for i, f in tail]
        entries.sort(key=lambda e: (e.timestamp, e.id), reverse=True)
        return [asdict(e) for e in entries[:n]]

    def reset(self, scope: str, session: str | None) -> str:
        budget = budget_of(self.manager, scope)
        if session:
            budget.reset_session(session)
            return f"session {session!r} of scope {scope!r} reset"
        budget.reset()
        return f"scope {scope!r} reset"

    def serve(self, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
        board = self

        class Handler(_Handler):
            dashboard = board

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        return server


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "distbudget-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the event stream would log a line per reconnect."""

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        token = self.dashboard.token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, default=str).encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.dashboard.page, "text/html; charset=utf-8")
            return
        if not url.path.startswith("/api/"):
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        if not self._authorised(query):
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "a bearer token is required"})
            return
        try:
            if url.path == "/api/snapshot":
                self._json(HTTPStatus.OK, self.dashboard.snapshot())
            elif url.path == "/api/ledger":
                n = min(max(int((query.get("n") or ["50"])[0]), 1), MAX_LEDGER_ROWS)
                self._json(HTTPStatus.OK, self.dashboard.ledger(n))
            elif url.path == "/api/alerts":
                self._events()
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception as exc:  # Redis down, a bad parameter: an answer, not a dropped connection
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"{type(exc).__name__}: {exc}"})

    def _events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        feed = self.dashboard.feed
        seen = 0
        while not feed.closed:
            fresh = feed.after(seen, HEARTBEAT_S)
            if not fresh:
                self.wfile.write(b": heartbeat\n\n")
            for n, alert in fresh:
                self.wfile.write(f"id: {n}\nevent: alert\ndata: {json.dumps(alert, default=str)}\n\n".encode())
                seen = n
            self.wfile.flush()

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/reset":
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        if not self._authorised({}):
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "a bearer token is required"})
            return
        if not self.dashboard.allow_writes:
            self._json(HTTPStatus.FORBIDDEN, {"error": "read-only: start the dashboard with --allow-writes"})
            return
        if self.headers.get("X-Distbudget") != "1":
            self._json(HTTPStatus.FORBIDDEN, {"error": "missing X-Distbudget header"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(min(length, 65536)) or b"{}")
            message = self.dashboard.reset(str(body["scope"]), body.get("session") or None)
        except KeyError as exc:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(exc.args[0] if exc.args else exc)})
            return
        except Exception as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._json(HTTPStatus.OK, {"ok": True, "message": message})

"""The Redis engine: applies a plan with exactly one ``EVALSHA`` of a script from ``lua/``.

Scripts are registered once per client (``register_script`` reloads a script by itself after
``SCRIPT FLUSH``, a restart or a failover: ``NOSCRIPT`` never reaches the caller). Time is the
server's ``TIME`` unless a test injects a clock.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from distbudget._core.plan import (
    AdmitResult,
    ChargeResult,
    Plan,
    SummaryResult,
    parse_admit,
    parse_charge,
    parse_summary,
    script_args,
)
from distbudget._exceptions import BackendError

OPERATIONS = ("record", "commit", "check", "reserve", "release", "summary")


def _lua_dir() -> Path:
    """``lua/`` ships inside the wheel as ``distbudget/lua``; in a source tree it is top level."""
    packaged = resources.files("distbudget") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "lua"


@lru_cache(maxsize=None)
def script_source(name: str) -> str:
    """A script with ``_common.lua`` prepended (Redis scripts cannot include each other)."""
    base = _lua_dir()
    return (base / "_common.lua").read_text("utf-8") + "\n" + (base / f"{name}.lua").read_text("utf-8")


def connect(url: str, **options: Any) -> Any:
    """A redis-py client for a ``redis://``, ``rediss://`` or ``unix://`` URL."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 5.0)
        return redis.Redis.from_url(url, **options)
    raise ValueError(f"unsupported Redis URL scheme {scheme!r} (use redis://, rediss:// or unix://)")


class RedisEngine:
    """Applies plans on one redis-py client (``Redis`` or anything with ``register_script``)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = {op: client.register_script(script_source(op)) for op in OPERATIONS}

    def _run(self, op: str, keys: tuple[str, ...] | list[str], args: list[Any]) -> Any:
        try:
            return self._scripts[op](keys=keys, args=args)
        except redis.RedisError as exc:
            raise BackendError(f"Redis {op} failed: {exc}") from exc

    def record(self, plan: Plan, now_us: int | None, amt: tuple[int, int, int],
               request_key: str | None = None, request_ttl_ms: int = 0) -> ChargeResult:
        keys = plan.keys if request_key is None else (*plan.keys, request_key)
        ttl = "" if request_key is None else request_ttl_ms
        return parse_charge(self._run("record", keys, script_args(plan, now_us, amt, ttl)))

    def commit(self, plan: Plan, now_us: int | None, amt: tuple[int, int, int], hold_id: str,
               request_key: str | None = None, request_ttl_ms: int = 0) -> ChargeResult:
        keys = plan.keys if request_key is None else (*plan.keys, request_key)
        ttl = "" if request_key is None else request_ttl_ms
        return parse_charge(self._run("commit", keys, script_args(plan, now_us, amt, ttl, hold_id)))

    def check(self, plan: Plan, now_us: int | None, amt: tuple[int, int, int]) -> AdmitResult:
        return parse_admit(self._run("check", plan.keys, script_args(plan, now_us, amt)))

    def reserve(self, plan: Plan, now_us: int | None, amt: tuple[int, int, int], hold_id: str,
                ttl_us: int) -> AdmitResult:
        args = script_args(plan, now_us, amt, "", hold_id, ttl_us)
        return parse_admit(self._run("reserve", plan.keys, args))

    def release(self, plan: Plan, hold_id: str) -> bool:
        args = ["", 0, 0, 0, "", hold_id, ""]
        return bool(self._run("release", plan.keys[:2], args))

    def summary(self, plan: Plan, now_us: int | None) -> SummaryResult:
        args = script_args(plan, now_us, (0, 0, 0), plan.totals_key_index)
        return parse_summary(self._run("summary", plan.keys, args))

    def delete(self, keys: list[str]) -> None:
        try:
            self.client.delete(*keys)
        except redis.RedisError as exc:
            raise BackendError(f"Redis delete failed: {exc}") from exc

"""Trust boundaries on the Redis side: the Functions library, least-privilege users, eviction.

**The library.** An admin installs the scripts once as a Redis Functions library
(:func:`install_library`, ``distbudget install --redis URL``; on every master of a Cluster;
idempotent). Workers then call ``FCALL`` and need neither ``EVAL*`` nor ``SCRIPT``: no worker can
run Lua of its own (a busy loop in one made every client answer ``BUSY``). Where the library is not
installed the engines keep the script path (``EVALSHA``), so the quick start needs no admin step.
The library's name carries a digest of its code (``distbudget/engines/scripts.py``): an upgrade
installs the new library beside the old one (old workers keep calling theirs), and ``prune=True``
removes the others once every worker runs the new version.

**The checks on connect** (:func:`check_server`, again after any error that may mean a reconnect):
the server's ``maxmemory-policy`` must be ``noeviction`` — an evicting server silently drops
counters, holds and windows, and then admits spending twice (:class:`ServerConfigError`, unless
``allow_eviction=True``); and whether the library (this exact version) is installed on every
master decides the path: ``"functions"`` or ``"scripts"`` (the engine's ``path``, logged at DEBUG).

**Users** (:func:`acl_rules`): a *worker* may ``FCALL`` the library on its prefix's keys and read
what the listeners read; an *admin* may also install the library and read the server's config.
Redis checks every command a function runs against the *caller's* ACL, so a worker must hold the
commands the functions call (``HSET``, ``ZADD``, ...) on its prefix's keys: the ACL keeps a worker
from running Lua and from touching any other prefix, not from writing its own keys directly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.exceptions

from distbudget._core.errors import ServerConfigError
from distbudget._core.keys import check_prefix
from distbudget.engines import connect as _connect
from distbudget.engines.scripts import OPERATIONS, function_name, library, source

log = logging.getLogger("distbudget")

FUNCTIONS = "functions"  # the engine calls the installed library with FCALL
SCRIPTS = "scripts"  # the engine loads the scripts itself (SCRIPT LOAD) and calls EVALSHA

# A worker holds the minimal ACL (engines/connect.py: every command distbudget sends or its Lua calls,
# the listeners' included; a test checks it against the source) without the script commands: Redis
# checks each command a function calls against the caller's ACL, so those stay.
SCRIPT_COMMANDS = ("evalsha", "script|load")
# An admin installs, lists and prunes the library, and reads the server's config (distbudget doctor).
ADMIN_COMMANDS = ("function|load", "function|list", "function|delete", "config|get", "info")

ROLES = ("worker", "admin")


def acl_rules(prefix: str = "distbudget", role: str = "worker") -> list[str]:
    """The ACL rules of a ``role`` user for key prefix ``prefix``, on standalone and Cluster alike:
    ``ACL SETUSER <name> reset on ><password> <rules...>`` (on every node of a Cluster). Its keys
    and channels are ``<prefix>:*``; prefixes hold no ``:`` nor glob characters (``check_prefix``),
    so no other prefix's keys match."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_prefix(prefix)
    worker = [c for c in _connect.ACL_COMMANDS if c not in SCRIPT_COMMANDS]
    commands = [*worker, *_connect.CLUSTER_ACL_COMMANDS, *(ADMIN_COMMANDS if role == "admin" else ())]
    return [f"~{prefix}:*", f"&{prefix}:*", "-@all", *(f"+{c}" for c in dict.fromkeys(commands))]


# ---- the library ------------------------------------------------------------------------------------


def _masters(client: Any) -> list[tuple[str, Any]]:
    """(name, a client of that node) for every master a sync client writes to."""
    if _connect.is_cluster_client(client):
        return [(node.name, client.get_redis_connection(node)) for node in client.get_primaries()]
    return [(_standalone_name(client), client)]


def _standalone_name(client: Any) -> str:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "host" in kwargs:
        return f"{kwargs['host']}:{kwargs.get('port', 6379)}"
    return str(kwargs.get("path", "master"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def installed_libraries(node: Any) -> list[str]:
    """The names of the distbudget libraries a node holds (``FUNCTION LIST``)."""
    names = []
    for entry in node.function_list(library="distbudget_*"):
        fields = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
        name = _text(fields.get(b"library_name", fields.get("library_name", "")))
        if name.startswith("distbudget_"):
            names.append(name)
    return names


def install_library(client: Any, *, prune: bool = False) -> dict[str, str]:
    """Install this version's library on every master (needs an admin user: ``FUNCTION LOAD``).
    Idempotent. Returns, per node, ``"installed"`` or ``"present"`` (already there), followed by
    ``", removed <names>"`` when ``prune`` removed the other distbudget libraries (older versions:
    prune only once no worker runs them)."""
    name, code = library()
    done: dict[str, str] = {}
    for node_name, node in _masters(client):
        present = installed_libraries(node)
        if name in present:
            status = "present"
        else:
            node.function_load(code)
            status = "installed"
        others = [n for n in present if n != name]
        if prune and others:
            for other in others:
                node.function_delete(other)
            status += f", removed {' '.join(others)}"
        done[node_name] = status
        log.info("distbudget: library %s %s on %s", name, status, node_name)
    return done


# ---- the checks on connect ---------------------------------------------------------------------------

# The checks, per master, in one round trip: INFO's memory section (any user may be granted it
# alone: +info|memory) and FCALL_RO of the library's version function. CONFIG GET only where INFO
# was refused (a refused command is logged in the server's ACL LOG: a worker's is never refused).
PROBE = (("INFO", "memory"),)
CONFIG = ("CONFIG", "GET", "maxmemory-policy")


def probe_commands() -> list[tuple[str, ...]]:
    return [*PROBE, ("FCALL_RO", function_name("version"), "0")]


@dataclass(frozen=True, slots=True)
class Server:
    """What the checks found on the masters: each one's eviction policy (``None`` where the user
    may read neither ``INFO memory`` nor ``CONFIG GET``), which of them hold this version's library,
    and so the path the engine takes (``"functions"`` only when every master holds it)."""

    policies: Mapping[str, str | None]
    installed: tuple[str, ...]  # the masters holding this version's library
    reason: str  # why the library could not be called, where it could not ("" when it could)

    @property
    def path(self) -> str:
        return FUNCTIONS if self.policies and len(self.installed) == len(self.policies) else SCRIPTS

    @property
    def evicting(self) -> dict[str, str]:
        return {node: p for node, p in self.policies.items() if p is not None and p != "noeviction"}

    def describe(self) -> str:
        """One line for people (``distbudget doctor``): the path, and why."""
        name = library()[0]
        if self.path == FUNCTIONS:
            return f"calls the Redis Functions library {name} (FCALL) on every master"
        missing = [node for node in self.policies if node not in self.installed]
        where = f"not on {', '.join(missing)}" if self.installed else f"not callable: {self.reason}"
        return f"calls scripts (EVALSHA): library {name} {where} (an admin runs: distbudget install)"


def _policy(info: Any, config: Any) -> str | None:
    if isinstance(info, Mapping):
        value = info.get("maxmemory_policy", info.get(b"maxmemory_policy"))
        if value is not None:
            return _text(value)
    if isinstance(config, Mapping):
        for key, value in config.items():
            if _text(key) == "maxmemory-policy":
                return _text(value)
    if isinstance(config, list) and len(config) == 2:
        return _text(config[1])
    return None


def survey(replies: Mapping[str, list[Any]]) -> Server:
    """What each master's replies (to :func:`probe_commands`, then to ``CONFIG GET`` or None) say."""
    policies = {node: _policy(r[0], r[2]) for node, r in replies.items()}
    installed = tuple(node for node, r in replies.items() if not isinstance(r[1], Exception))
    errors = [str(r[1]) for r in replies.values() if isinstance(r[1], Exception)]
    return Server(policies, installed, errors[0] if errors else "")


def enforce(server: Server, allow_eviction: bool) -> Server:
    """:class:`ServerConfigError` for an evicting policy (unless ``allow_eviction``); the path and
    what could not be checked, logged."""
    evicting = server.evicting
    if evicting and not allow_eviction:
        where = ", ".join(f"{node}: {p}" for node, p in evicting.items())
        raise ServerConfigError(
            f"Redis evicts keys under memory pressure (maxmemory-policy {where}): an evicted counter, "
            "hold or window silently resets a budget and admits spending twice. Set "
            "`maxmemory-policy noeviction` (CONFIG SET maxmemory-policy noeviction, and in redis.conf; "
            "on a Cluster, on every master); when memory is full Redis then refuses writes and the "
            "failure policy takes over. Or pass allow_eviction=True to accept the risk (unsafe)."
        )
    if evicting:
        log.warning("distbudget: allow_eviction=True on an evicting server (%s): budgets may reset", evicting)
    unknown = [node for node, p in server.policies.items() if p is None]
    if unknown:
        log.warning(
            "distbudget: cannot read maxmemory-policy on %s (grant +info|memory): make sure it is noeviction",
            ", ".join(unknown),
        )
    if server.path == SCRIPTS and server.installed:  # some masters have it: an install half done
        log.warning("distbudget: %s", server.describe())
    else:
        log.debug("distbudget: %s", server.describe())
    return server


def _config(node: Any, info: Any) -> Any:
    """``CONFIG GET maxmemory-policy`` on a sync node whose INFO was refused, else None."""
    if not isinstance(info, Exception):
        return None
    try:
        return node.execute_command(*CONFIG)
    except redis.exceptions.ResponseError as exc:
        return exc


def probe(client: Any) -> Server:
    """What the masters of a sync client say (one round trip per master); raises nothing."""
    replies: dict[str, list[Any]] = {}
    for name, node in _masters(client):
        pipe = node.pipeline(transaction=False)
        for command in probe_commands():
            pipe.execute_command(*command)
        info, version = pipe.execute(raise_on_error=False)
        replies[name] = [info, version, _config(node, info)]
    return survey(replies)


def check_server(client: Any, allow_eviction: bool = False) -> Server:
    """The checks on connect, on a sync client."""
    return enforce(probe(client), allow_eviction)


async def probe_async(client: Any) -> Server:
    """:func:`probe` on a ``redis.asyncio`` client (one round trip on a standalone server)."""
    replies: dict[str, list[Any]] = {}
    if _connect.is_cluster_client(client):
        for node in client.get_primaries():
            target = {"target_nodes": node}
            info, version = [await _answer(client, c, target) for c in probe_commands()]
            config = await _answer(client, CONFIG, target) if isinstance(info, Exception) else None
            replies[node.name] = [info, version, config]
        return survey(replies)
    pipe = client.pipeline(transaction=False)
    for command in probe_commands():
        pipe.execute_command(*command)
    info, version = await pipe.execute(raise_on_error=False)
    config = await _answer(client, CONFIG, {}) if isinstance(info, Exception) else None
    return survey({_standalone_name(client): [info, version, config]})


async def check_server_async(client: Any, allow_eviction: bool = False) -> Server:
    """The checks on connect, on a ``redis.asyncio`` client."""
    return enforce(await probe_async(client), allow_eviction)


async def _answer(client: Any, command: Iterable[str], target: Mapping[str, Any]) -> Any:
    try:
        return await client.execute_command(*command, **target)
    except redis.exceptions.ResponseError as exc:
        return exc


# ---- the engines' calls ---------------------------------------------------------------------------------


class Function:
    """One library function, called as the engines call redis-py's ``Script`` (``fn(keys=, args=)``).
    On a Cluster it is sent to the node of its first key (the Cluster client would otherwise ask the
    server for an ``FCALL``'s keys on every call).

    When the library is gone (``FUNCTION FLUSH`` or ``DELETE``, a server restarted without its
    data) the function did not run: it falls back to its script (``EVALSHA``, loaded when missing)
    for this call and the next ones, where the user may load scripts; a worker that may not gets
    an error naming the fix. ``sha`` and ``script`` are the script's, for the engines' pipelines."""

    def __init__(self, client: Any, operation: str) -> None:
        self.client = client
        self.name = function_name(operation)
        self.cluster = _connect.is_cluster_client(client)
        self.fallback = client.register_script(source(operation))
        self.lost = False  # the library was not found: calls go to the script

    @property
    def sha(self) -> str:
        return str(self.fallback.sha)

    @sha.setter
    def sha(self, value: str) -> None:
        self.fallback.sha = value

    @property
    def script(self) -> str:
        return str(self.fallback.script)

    def _fcall(self, keys: Any, args: Any) -> Any:
        command = ("FCALL", self.name, len(keys), *keys, *args)
        if self.cluster:
            return self.client.execute_command(*command, target_nodes=self.client.get_node_from_key(keys[0]))
        return self.client.execute_command(*command)

    def _lost(self, exc: redis.exceptions.ResponseError) -> bool:
        if not str(exc).startswith("Function not found"):
            return False
        log.warning("distbudget: library %s not found: calling scripts (EVALSHA); run distbudget install", self.name)
        self.lost = True
        return True

    def _refused(self, exc: redis.exceptions.NoPermissionError) -> redis.exceptions.ResponseError:
        return redis.exceptions.ResponseError(
            f"the distbudget library is not installed ({self.name} not found) and this user may not load "
            f"scripts ({exc}): run distbudget install"
        )

    def __call__(self, keys: Any, args: Any) -> Any:
        if not self.lost:
            try:
                return self._fcall(keys, args)
            except redis.exceptions.ResponseError as exc:
                if not self._lost(exc):
                    raise
        try:
            return self.fallback(keys=keys, args=args)
        except redis.exceptions.NoPermissionError as exc:
            raise self._refused(exc) from exc


class AsyncFunction(Function):
    """:class:`Function` on a ``redis.asyncio`` client."""

    async def __call__(self, keys: Any, args: Any) -> Any:
        if not self.lost:
            try:
                return await self._fcall(keys, args)
            except redis.exceptions.ResponseError as exc:
                if not self._lost(exc):
                    raise
        try:
            return await self.fallback(keys=keys, args=args)
        except redis.exceptions.NoPermissionError as exc:
            raise self._refused(exc) from exc


def callables(client: Any, path: str) -> dict[str, Any]:
    """What the engine calls per operation on ``path``: the library's functions, or the scripts
    registered on ``client`` (redis-py's ``Script``: loaded again by itself after ``NOSCRIPT``)."""
    if path == FUNCTIONS:
        kind = AsyncFunction if inspect.iscoroutinefunction(client.execute_command) else Function
        return {op: kind(client, op) for op in OPERATIONS}
    return {op: client.register_script(source(op)) for op in OPERATIONS}


def command(script: Any, keys: Any, argv: Any) -> tuple[Any, ...]:
    """A raw command (for a pipeline) that runs ``script``: a :class:`Function` or a redis-py ``Script``."""
    if isinstance(script, Function) and not script.lost:
        return ("FCALL", script.name, len(keys), *keys, *argv)
    return ("EVALSHA", script.sha, len(keys), *keys, *argv)


__all__ = [
    "FUNCTIONS",
    "SCRIPTS",
    "AsyncFunction",
    "Function",
    "Server",
    "acl_rules",
    "callables",
    "check_server",
    "check_server_async",
    "command",
    "enforce",
    "install_library",
    "installed_libraries",
    "probe",
    "probe_async",
    "survey",
]

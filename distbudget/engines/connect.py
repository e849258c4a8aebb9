"""Redis clients from URLs: standalone, Cluster and Sentinel, sync and asyncio, with timeouts and a
retry policy that never sends a charge twice.

URL forms (user name, password and query parameters work in all of them)::

    redis://[user:password@]host:port[/db]              standalone (rediss:// for TLS, unix:// sockets)
    redis+cluster://[user:password@]host:port[,host:port...]      Redis Cluster (rediss+cluster:// TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]
                                                        Sentinel (rediss+sentinel:// TLS)

A Sentinel URL's database is its path's ``/db`` or a ``?db=`` parameter (both: they must agree); a
Cluster has database 0 only. A user name or password containing ``#``, ``?``, ``/``, ``@``, ``[`` or
``]`` must be percent-encoded (``urllib.parse.quote(password, safe="")``): errors about a URL never
quote it, so that no part of a password ends up in a log.

The user name and password are the data nodes'. Sentinels that require their own password take
``?sentinel_password=...`` (and ``sentinel_username``). Other query parameters are redis-py's
(``ssl_ca_certs``, ``ssl_cert_reqs``, ``socket_timeout``, ...). distbudget's own:

* ``wait_replicas=N`` (and ``wait_timeout_ms=T``, default 100): after each charging script
  (``record``, ``commit``), ``WAIT N T`` in the same round trip, so a call returns only once N
  replicas hold the charge, or T ms passed. It narrows what a failover can lose (see the README).

Timeouts: 5 s to connect and 5 s per reply unless the URL or the caller says otherwise.

Retries: a command whose reply was lost may have run (the script charged, the reply never came
back), and sending it again would charge twice. So these clients never re-send a command on their
own: a lost reply, a refused or timed-out connection surfaces at once as an error (distbudget wraps
it in ``BackendError``), and retrying is the caller's decision, safe with a ``request_id``. What is
safe is still done: redis-py replaces a pooled connection the server closed (idle timeout,
restart) before using it, and Cluster clients follow ``MOVED`` / ``ASK`` redirections and retry the
cluster's own refusals (``CLUSTERDOWN``, a slot not yet covered), which mean the command never ran.
(A pipeline on a Cluster is not sent through redis-py's ClusterPipeline, which re-sends a node's
commands after a lost reply: see ``RedisEngine._send_cluster``.)

A Cluster client reads the slot map from the nodes as it is built: when none answers, ``connect``
raises ``BackendError``, or with ``lazy=True`` (budgets under ``on_backend_error="deny"`` /
``"allow"``) returns a :class:`PendingClient` that the engine builds at its first call, so that a
worker can start during an outage (its calls meet the failure policy until a node answers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.retry
import redis.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import parse_url
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError

from distbudget._core.errors import BackendError, InvalidInputError

TIMEOUTS: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
DEFAULT_WAIT_TIMEOUT_MS = 100

SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")
# redis-py leaves these untyped: called through Any so that mypy --strict accepts the calls
redis_parse_url: Any = parse_url
SyncClusterNode: Any = redis.cluster.ClusterNode
SyncSentinel: Any = redis.sentinel.Sentinel
AsyncSentinel: Any = redis.asyncio.sentinel.Sentinel

_OURS = ("wait_replicas", "wait_timeout_ms", "sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class Target:
    """What a URL names: ``kind`` ("standalone", "cluster" or "sentinel"), the nodes, the data
    nodes' connection keyword arguments, and distbudget's own options."""

    kind: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS
    url: str = ""  # standalone: the URL for redis-py, without distbudget's query parameters

    @property
    def wait(self) -> tuple[int, int] | None:
        """``(replicas, timeout ms)`` when charges must wait for replicas, else None."""
        return (self.wait_replicas, self.wait_timeout_ms) if self.wait_replicas else None


def _int_option(options: dict[str, str], name: str, default: int, low: int) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


# Errors about a URL's shape never quote the URL: a password with '#', '?', '/' or '[' left as is
# would be cut there and parsed as a host, a port or a path, and echoed in the message.
_ENCODE = (
    "a password containing '#', '?', '/', '@', '[' or ']' must be percent-encoded: urllib.parse.quote(pw, safe='')"
)
_SPLIT_USERINFO = f"the Redis URL has an '@' after a '/', '?' or '#' ({_ENCODE}; an '@' in a path or query: %40)"


def _hosts_ok(authority: str) -> bool:
    """Is ``[userinfo@]host[:port][,host[:port]]`` well formed (hosts present, ports numeric)?"""
    for raw in authority.rpartition("@")[2].split(","):
        part = raw.strip()
        if part.startswith("["):
            host, _, tail = part[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else ""
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host or (port and not _is_number(port)):
            return False
    return True


def _split(url: str, rest: str) -> Any:
    """``urlsplit(url)`` (``rest``: what follows ``://``), with errors that quote no part of it.

    An un-encoded '/', '?' or '#' in a password ends the host part early, leaving a broken host part
    and an '@' further on: refused without quoting anything. An '@' in a well-formed URL's query
    (``?client_name=worker@host``) is fine."""
    delimiters = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    if delimiters and "@" in rest[min(delimiters) :]:
        authority = rest[: min(delimiters)]
        # unix://[user:password@]/path has no host: any text before the path must end in '@'
        cut = bool(authority) and "@" not in authority if url.startswith("unix:") else not _hosts_ok(authority)
        if cut:
            raise ValueError(_SPLIT_USERINFO)
    try:
        return urlsplit(url)
    except ValueError:  # e.g. urllib quotes what it takes for an IPv6 address (a password with '[')
        raise ValueError(f"malformed Redis URL: check its host part ({_ENCODE})") from None


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for raw in netloc.split(","):
        part = raw.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"bad port in Redis URL host {part!r}") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"bad host in Redis URL: {part!r}")
        out.append((unquote(host), port))
    if not out:
        raise ValueError("the Redis URL names no host")
    return tuple(out)


def parse(url: str) -> Target:
    """Parse and validate a distbudget Redis URL (never echoes a password in its errors)."""
    if not isinstance(url, str):
        raise TypeError("a Redis URL must be a str")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {scheme!r} (use redis://, rediss://, unix://, "
            "redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://)"
        )
    parts = _split(url, rest)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _OURS}
    theirs = urlencode([(k, v) for k, v in query if k not in _OURS])
    tls = sorted({k for k, _ in query if k.startswith("ssl")})
    if tls and not scheme.startswith("rediss"):
        secure = scheme.replace("redis", "rediss", 1) if scheme.startswith("redis") else "rediss"
        raise InvalidInputError(
            f"TLS option(s) {', '.join(tls)} on a {scheme}:// URL, which connects without TLS: use {secure}:// "
            "for TLS, or drop them"
        )
    wait_replicas = _int_option(ours, "wait_replicas", 0, 0)
    wait_timeout_ms = _int_option(ours, "wait_timeout_ms", DEFAULT_WAIT_TIMEOUT_MS, 0)
    if "+" not in scheme:
        if scheme != "unix":
            try:
                _ = parts.port  # (urllib's error would quote the port text)
            except ValueError:
                raise ValueError(f"bad port in the Redis URL ({_ENCODE})") from None
            db_text = unquote(parts.path).strip("/")
            if db_text and not _is_number(db_text):  # redis-py would take it as database 0
                raise ValueError(f"bad database number in the Redis URL path: {db_text!r} (use redis://host:port/<db>)")
            query_dbs = {v for k, v in query if k == "db" and v}
            if db_text and query_dbs and query_dbs != {db_text}:  # redis-py would silently take the query's
                raise ValueError(f"the Redis URL names two databases: /{db_text} in its path and db= in its query")
        clean = url.partition("?")[0] + (f"?{theirs}" if theirs else "")  # (geturl() drops unix:'s //)
        redis_parse_url(clean)  # validates the query parameters now rather than at the first call
        return Target("standalone", wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms, url=clean)

    base, kind = scheme.split("+")
    auth, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = auth.partition(":")
    # redis-py's own parser types the query parameters (and sets TLS up for rediss).
    kwargs = redis_parse_url(f"{base}://127.0.0.1:6379/0" + (f"?{theirs}" if theirs else ""))
    query_db = kwargs["db"] if any(k == "db" and v for k, v in query) else None  # (typed by redis-py)
    for name in ("host", "port", "db", "connection_class"):
        kwargs.pop(name, None)
    if base == "rediss":
        kwargs["ssl"] = True
    if user:
        kwargs["username"] = unquote(user)
    if password:
        kwargs["password"] = unquote(password)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if kind == "cluster":
        if wait_replicas:
            raise ValueError("wait_replicas is not supported on Redis Cluster URLs")
        if path not in ([], ["0"]) or query_db not in (None, 0):
            raise ValueError(
                "a Redis Cluster has database 0 only: drop the URL's /db or ?db= (redis+cluster://host:port[,host:port])"
            )
        return Target("cluster", _hosts(hostlist, 6379), kwargs=kwargs)
    if not path or len(path) > 2:
        raise ValueError("use redis+sentinel://host:port[,host:port]/service_name[/db]")
    if len(path) == 2 and not _is_number(path[1]):
        raise ValueError(f"bad database number in the Sentinel URL: {path[1]!r}")
    path_db = int(path[1]) if len(path) == 2 else None
    if path_db is not None and query_db is not None and path_db != query_db:
        raise ValueError(f"the Sentinel URL names two databases: /{path_db} in its path and db={query_db} in its query")
    db = path_db if path_db is not None else query_db or 0
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith(("ssl", "socket_"))}
    if "sentinel_username" in ours:
        sentinel_kwargs["username"] = ours["sentinel_username"]
    if "sentinel_password" in ours:
        sentinel_kwargs["password"] = ours["sentinel_password"]
    return Target(
        "sentinel",
        _hosts(hostlist, 26379),
        service=path[0],
        db=db,
        kwargs=kwargs,
        sentinel_kwargs=sentinel_kwargs,
        wait_replicas=wait_replicas,
        wait_timeout_ms=wait_timeout_ms,
    )


def check_url(url: str) -> None:
    parse(url)


def no_retry() -> redis.retry.Retry:
    """Never re-send: redis-py's own default (10 retries on a client built by hand) re-sends a
    script whose reply timed out, which can charge twice."""
    return redis.retry.Retry(NoBackoff(), 0)


def _async_no_retry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(NoBackoff(), 0)


# The cluster clients' own retry loop re-sends on ConnectionError / TimeoutError too (after a lost
# reply): these retry only the cluster's refusals, which mean the command never ran.
_CLUSTER_SAFE_RETRY = (ClusterDownError, SlotNotCoveredError)


class SafeRedisCluster(redis.cluster.RedisCluster):
    """``RedisCluster`` that never re-sends a command whose reply was lost."""

    ERRORS_ALLOW_RETRY = _CLUSTER_SAFE_RETRY  # type: ignore[assignment]


class SafeAsyncRedisCluster(redis.asyncio.cluster.RedisCluster):
    """The same for ``redis.asyncio``."""

    ERRORS_ALLOW_RETRY = _CLUSTER_SAFE_RETRY  # type: ignore[assignment]


def _cluster_retry() -> redis.retry.Retry:
    return redis.retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)


class PendingClient:
    """A client not built yet because its construction found no node answering (a sync Cluster
    client): :meth:`get` builds it (raising as construction does until a node answers)."""

    def __init__(self, build: Callable[[], Any], error: BaseException) -> None:
        self._build = build
        self.error = error  # why the first construction failed
        self._client: Any = None

    def get(self) -> Any:
        if self._client is None:
            self._client = self._build()
        return self._client


def connect(url: str, *, lazy: bool = False, **options: Any) -> Any:
    """A redis-py client (``Redis``, ``RedisCluster``, or a Sentinel-managed ``Redis``) for a URL.

    ``options`` are redis-py keyword arguments (they override the defaults here, and the URL's query
    parameters override them, as in ``redis.Redis.from_url``). A Cluster none of whose nodes answers
    raises ``BackendError``; with ``lazy``, a :class:`PendingClient` is returned instead."""
    target = parse(url)
    if target.kind == "standalone":
        return redis.Redis.from_url(target.url, **{**TIMEOUTS, "retry": no_retry(), **options})
    if target.kind == "cluster":
        nodes = [SyncClusterNode(host, port) for host, port in target.hosts]
        kw = {**TIMEOUTS, **options, **target.kwargs}
        kw.pop("retry", None)  # the cluster client sets its nodes' retries itself

        def build() -> Any:
            return SafeRedisCluster(startup_nodes=nodes, retry=_cluster_retry(), **kw)

        try:
            return build()
        except (redis.RedisError, RedisClusterException) as exc:
            if lazy:
                return PendingClient(build, exc)
            hosts = ",".join(f"{host}:{port}" for host, port in target.hosts)
            raise BackendError(f"cannot connect to the Redis Cluster at {hosts}: {exc}") from exc
    sentinel = SyncSentinel(list(target.hosts), sentinel_kwargs={**TIMEOUTS, **target.sentinel_kwargs}, **TIMEOUTS)
    kw = {**TIMEOUTS, "retry": no_retry(), **options, **target.kwargs}
    return sentinel.master_for(target.service, db=target.db, **kw)


def connect_async(url: str, max_connections: int = 64, *, lazy: bool = False, **options: Any) -> Any:
    """A ``redis.asyncio`` client for a URL (it connects at its first command: ``lazy`` changes
    nothing). Standalone: its pool makes tasks wait for a free
    connection (rather than fail with "Too many connections") when hundreds of tasks call at once.
    Cluster: ``max_connections`` per node (redis-py's cluster client refuses beyond it, so it is
    raised to at least 1,024). Sentinel: one connection per concurrent task."""
    target = parse(url)
    if target.kind == "standalone":
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            target.url,
            max_connections=max_connections,
            timeout=TIMEOUTS["socket_timeout"],
            **{**TIMEOUTS, "retry": _async_no_retry(), **options},
        )
        return redis.asyncio.Redis(connection_pool=pool)
    if target.kind == "cluster":
        anodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in target.hosts]
        kw = {**TIMEOUTS, **options, **target.kwargs}
        kw.pop("retry", None)
        return SafeAsyncRedisCluster(
            startup_nodes=anodes,
            max_connections=max(max_connections, 1024),
            retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            **kw,
        )
    sentinel = AsyncSentinel(list(target.hosts), sentinel_kwargs={**TIMEOUTS, **target.sentinel_kwargs}, **TIMEOUTS)
    kw = {**TIMEOUTS, "retry": _async_no_retry(), **options, **target.kwargs}
    return sentinel.master_for(target.service, db=target.db, **kw)


# The minimal Redis ACL (README, "Deployment"): every command distbudget sends, and every command its
# Lua scripts call (Redis checks a script's calls against the caller's ACL too). tests/test_security.py
# checks this list against the source and runs the behavioural suite as a user holding only these.
ACL_COMMANDS = (
    # sent by the client: scripts (loaded again after SCRIPT FLUSH), the alert-stream index and the
    # registry, the ledger, the alert listeners; PING for health checks; WAIT with wait_replicas
    "evalsha",
    "script|load",
    "hset",
    "hkeys",
    "hgetall",
    "xrange",
    "xrevrange",
    "xread",
    "ping",
    "wait",
    # alert listeners in a consumer group (alerts.py), and any listener looking for a gap (xinfo|stream)
    "xinfo|stream",
    "xinfo|groups",
    "xgroup|create",
    "xreadgroup",
    "xpending",
    "xclaim",
    "xack",
    "zscore",  # (the scripts call it too)
    "zremrangebyrank",
    # called inside the scripts (lua/)
    "time",
    "get",
    "set",
    "del",
    "pttl",
    "pexpire",
    "hget",
    "hmget",
    "hset",
    "hexists",
    "hincrby",
    "hdel",
    "hgetall",
    "zadd",
    "zrem",
    "zrange",
    "zrangebyscore",
    "zremrangebyscore",
    "zscore",  # commit and extend: is the hold's lease still running?
    "xadd",
    "publish",
)
# A Cluster client also reads the slot map and the command table (to find each command's keys).
CLUSTER_ACL_COMMANDS = ("cluster|slots", "cluster|shards", "command")


def acl_rules(prefix: str = "distbudget", cluster: bool = False) -> list[str]:
    """The rules of a user that can run distbudget with key prefix ``prefix`` and nothing else:
    ``ACL SETUSER <name> on ><password> <rules...>`` (on every node of a Cluster)."""
    commands = dict.fromkeys(ACL_COMMANDS + (CLUSTER_ACL_COMMANDS if cluster else ()))
    return [f"~{prefix}:*", f"&{prefix}:*", "-@all", *(f"+{c}" for c in commands)]


def is_cluster_client(client: object) -> bool:
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


__all__ = [
    "ACL_COMMANDS",
    "PendingClient",
    "Target",
    "acl_rules",
    "check_url",
    "connect",
    "connect_async",
    "is_cluster_client",
    "parse",
]

"""Real Redis deployments the tests start on loopback free ports and kill at the end: a standalone
server (optionally with TLS, a password or an ACL user), a 3-master Cluster, and a master + replica
watched by a Sentinel. Nothing here mocks Redis; every fault a test injects is a real one."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from distbudget.engines import connect


def free_port(bus: bool = False) -> int:
    """A free loopback port; with ``bus``, one whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def redis_exe() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    return exe


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, step: float = 0.02) -> bool:
    """Poll a condition the system under test will make true (bounded; not a timing assertion).
    Exceptions from the predicate count as 'not yet'."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


class RedisServer:
    """A redis-server process of our own (killed at the end), so tests never touch shared state.

    ``extra`` are extra command-line options; ``admin`` are the keyword arguments of a client that
    may do anything (a password, TLS settings) used to wait for the server and by :meth:`client`.
    ``url`` is what budgets under test connect with: the ACL user's URL once :meth:`restrict` ran.
    """

    def __init__(
        self,
        tmp: Path,
        *extra: str,
        port: int | None = None,
        admin: dict[str, Any] | None = None,
        wait: bool = True,
        mkdir: bool = False,
    ) -> None:
        if mkdir:
            tmp.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.dir = tmp
        self.extra = extra
        self.admin = admin or {}
        self.user: tuple[str, str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(5):
            if self.start(wait) or port is not None:
                break
            self.port = free_port()  # another process took the free port first: take another
        if wait and not self.ours():
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        auth = f"{self.user[0]}:{self.user[1]}@" if self.user else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait: bool = True) -> bool:
        self.proc = subprocess.Popen(
            [
                redis_exe(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait and not wait_for(lambda: self.ours() or self.proc is None or self.proc.poll() is not None, timeout=10):
            raise RuntimeError("redis-server did not start")
        return self.ours()

    def ours(self) -> bool:
        """Our process answers on the port (not another one that took the port, e.g. a server that
        another test run restarts on a port it had, while ours failed to bind it)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return bool(self.client(socket_timeout=1).info("server")["process_id"] == self.proc.pid)
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self, username: str | None = None, password: str | None = None, **kw: Any) -> redis.Redis:
        """The admin client, or a client as ``username`` (e.g. the ACL user)."""
        if username is not None:
            kw = {**kw, "username": username, "password": password}
        return redis.Redis(port=self.port, **{**self.admin, **kw})

    def restrict(self, user: str, password: str, prefixes: Sequence[str] = ("distbudget",)) -> None:
        """Create the README's minimal ACL user and make :attr:`url` connect as it."""
        self.client().execute_command("ACL", "SETUSER", user, "reset", *acl_rules(password, prefixes))
        self.user = (user, password)


def acl_rules(password: str, prefixes: Sequence[str], cluster: bool = False) -> list[str]:
    """The README's minimal ACL user (``distbudget.engines.connect.acl_rules``) for ``prefixes``."""
    rules = dict.fromkeys(r for p in prefixes for r in connect.acl_rules(p, cluster=cluster))
    return ["on", f">{password}", *rules]


def make_tls_files(d: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with the ``openssl`` CLI
    (skips the test when it is missing): ``d/ca.crt``, ``d/server.crt``, ``d/server.key``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
    )  # fmt: skip
    return d


def tls_server_args(d: Path) -> list[str]:
    return [
        "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
        "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
    ]  # fmt: skip


def tls_client_options(d: Path) -> dict[str, Any]:
    return {"ssl": True, "ssl_ca_certs": str(d / "ca.crt"), "ssl_cert_reqs": "required"}


class Cluster:
    """A 3-master Redis Cluster (no replicas) on loopback free ports."""

    def __init__(self, tmp: Path, masters: int = 3, tls: Path | None = None) -> None:
        """``tls``: a directory made by :func:`make_tls_files`; the nodes then speak TLS only (clients,
        the cluster bus), and :attr:`admin` holds the client TLS settings."""
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli is not installed")
        self.nodes: list[RedisServer] = []
        self.user: tuple[str, str] | None = None
        self.admin: dict[str, Any] = tls_client_options(tls) if tls else {}
        tls_args = tls_server_args(tls) if tls else []
        cli_tls = ["--tls", "--cacert", str(tls / "ca.crt")] if tls else []
        ports: list[int] = []
        while len(ports) < masters:
            port = free_port(bus=True)
            if port not in ports and port + 10000 not in ports:
                ports.append(port)
        try:
            for port in ports:
                node_dir = tmp / str(port)
                self.nodes.append(
                    RedisServer(
                        node_dir,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        *(["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", *tls_args] if tls else []),
                        port=port,
                        admin=self.admin,
                        mkdir=True,
                    )
                )
            hosts = [f"127.0.0.1:{p}" for p in ports]
            subprocess.run(
                [cli, *cli_tls, "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
            ok = wait_for(lambda: all(self._state_ok(n) for n in self.nodes), timeout=30, step=0.05)
            if not ok:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        info = node.client(socket_timeout=1).execute_command("CLUSTER", "INFO").decode()
        return "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self, username: str | None = None, password: str | None = None, **kw: Any) -> redis.cluster.RedisCluster:
        if username is not None:
            kw = {**kw, "username": username, "password": password}
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **{**self.admin, **kw})

    def async_client(self, username: str | None = None, password: str | None = None) -> Any:
        kw = {} if username is None else {"username": username, "password": password}
        return redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **kw)

    def restrict(self, user: str, password: str, prefixes: Sequence[str] = ("distbudget",)) -> None:
        """The ACL user on every node (ACLs are per node), plus what a Cluster client needs."""
        for node in self.nodes:
            node.client().execute_command("ACL", "SETUSER", user, "reset", *acl_rules(password, prefixes, True))
        self.user = (user, password)

    @property
    def user_url(self) -> str:
        assert self.user is not None
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{self.user[0]}:{self.user[1]}@{hosts}"

    def flushall(self) -> None:
        for node in self.nodes:
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelSet:
    """A master, ``replicas`` replicas and one Sentinel watching them (quorum 1, the master declared
    down after ``down_ms`` without a reply), all on loopback free ports. ``password``: the data nodes
    require it (the replicas and the Sentinel authenticate with it)."""

    SERVICE = "distbudget-test"

    def __init__(self, tmp: Path, password: str = "", down_ms: int = 500, replicas: int = 1) -> None:
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        # Replicas sync from an RDB file. Diskless sync waits 5 s for more replicas by default, and
        # with no delay (Redis 7.0.15 here) one of two replicas syncing together was sometimes left
        # "online" at offset 0, never fed: promoted, it lost everything acknowledged before.
        auth += ["--repl-diskless-sync", "no"]
        admin = {"password": password} if password else {}
        self.password = password
        self.master = RedisServer(tmp / "master", *auth, admin=admin, mkdir=True)
        self.replicas = [
            RedisServer(
                tmp / f"replica{i}",
                *auth,
                "--replicaof",
                "127.0.0.1",
                str(self.master.port),
                admin=admin,
                mkdir=True,
            )
            for i in range(replicas)
        ]
        self.guard: socket.socket | None = None
        self.port = free_port()
        conf = tmp / "sentinel.conf"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {tmp}",
            f"logfile {tmp / 'sentinel.log'}",
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds {self.SERVICE} {down_ms}",
            f"sentinel failover-timeout {self.SERVICE} 5000",
            f"sentinel parallel-syncs {self.SERVICE} 1",
        ]
        if password:
            lines.append(f"sentinel auth-pass {self.SERVICE} {password}")
        conf.write_text("\n".join(lines) + "\n")
        self.sentinel = subprocess.Popen(
            [redis_exe(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            synced = wait_for(
                lambda: all(r.client().info("replication")["master_link_status"] == "up" for r in self.replicas)
            )
            known = wait_for(
                lambda: len(self.sentinel_client().execute_command("SENTINEL", "REPLICAS", self.SERVICE)) == replicas
            )
            master = self.master.client()
            master.set("replication-check", 1)  # every replica is fed, not only "up"
            fed = synced and master.execute_command("WAIT", replicas, 10_000) == replicas
            master.delete("replication-check")
            if not (synced and known and fed):
                raise RuntimeError("the replica or the Sentinel did not come up")
        except BaseException:
            self.stop()
            raise

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}127.0.0.1:{self.port}/{self.SERVICE}"

    def master_port(self) -> int:
        _host, port = self.sentinel_client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(port)

    def kill_master(self) -> None:
        """``kill -9`` the master, then hold its port (bound, not listening: connections are refused
        as by a dead host) so that no other process starts a server there that the Sentinel would
        take for the old master coming back and turn into a replica."""
        self.master.stop()
        self.guard = socket.socket()
        with contextlib.suppress(OSError):
            self.guard.bind(("127.0.0.1", self.master.port))

    def stop(self) -> None:
        if self.guard is not None:
            self.guard.close()
        if self.sentinel.poll() is None:
            self.sentinel.kill()
            self.sentinel.wait()
        self.master.stop()
        for replica in self.replicas:
            replica.stop()

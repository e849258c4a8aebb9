"""URL parsing edge cases: a password with reserved characters never leaks into an error message, and
a database number is never silently dropped or taken as 0."""

from __future__ import annotations

import traceback
from urllib.parse import quote

import pytest

from distbudget import Budget, BudgetScope
from distbudget.engines import connect as C

# A password whose two halves must never show up in an error, around each character that cuts a
# URL's userinfo short when it is not percent-encoded (or that urllib takes for an IPv6 bracket).
RESERVED = ["#", "?", "/", "[", "]", "[1]", "#1?2/"]
SHAPES = [
    "redis://:{pw}@127.0.0.1:6379/0",
    "redis://user:{pw}@cache.internal:6380",
    "rediss://user:{pw}@cache.internal:6380/2?ssl_cert_reqs=required",
    "unix://:{pw}@/run/redis.sock?db=1",
    "redis+cluster://:{pw}@h1:7000",
    "rediss+cluster://user:{pw}@h1:7000,h2:7001",
    "redis+sentinel://:{pw}@s1:26379/mymaster/1",
    "rediss+sentinel://user:{pw}@s1:26379,s2:26379/mymaster?sentinel_password=x",
]


def _all_text(exc: BaseException) -> str:
    """The message and everything a traceback of it would print."""
    return str(exc) + "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("char", RESERVED)
def test_an_unencoded_password_never_appears_in_the_error(shape: str, char: str) -> None:
    url = shape.format(pw=f"alpha{char}omega")
    with pytest.raises(ValueError) as info:
        C.parse(url)
    text = _all_text(info.value)
    assert "alpha" not in text and "omega" not in text, text
    assert "percent-encoded" in str(info.value)
    with pytest.raises(ValueError) as built:  # what a budget given the URL reports
        Budget(BudgetScope("leak"), redis=url)
    assert "alpha" not in _all_text(built.value) and "omega" not in _all_text(built.value)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_percent_encoded_password_works(shape: str) -> None:
    password = "al#p?h/a[1]@omega:%"
    target = C.parse(shape.format(pw=quote(password, safe="")))
    if target.kind == "standalone":
        kwargs = C.connect(shape.format(pw=quote(password, safe=""))).connection_pool.connection_kwargs
        assert kwargs["password"] == password
    else:
        assert target.kwargs["password"] == password


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:notaport/0",
        "redis://:s3cret@127.0.0.1:99999/0",
        "rediss://user:s3cret@h:-1",
        "redis+cluster://:s3cret@h:port",
        "redis+sentinel://:s3cret@s1:x/svc",
    ],
)
def test_bad_ports_are_reported_without_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="port") as info:
        C.parse(url)
    assert "s3cret" not in _all_text(info.value)


def test_an_at_sign_after_a_well_formed_host_part_is_fine() -> None:
    """An '@' in the query or a unix socket path is legal; only a host part left broken by a password
    cut short is refused."""
    assert "a%40b" in C.parse("rediss://h:6379/0?ssl_ca_certs=/etc/a@b/ca.pem").url
    assert C.parse("redis://h:6379/0?client_name=worker@host1").kind == "standalone"
    assert C.parse("redis+sentinel://h1:26379,h2:26379/svc?sentinel_password=s3cr@t").kind == "sentinel"
    assert C.parse("unix:///run/a@b/redis.sock?db=1").kind == "standalone"
    with pytest.raises(ValueError, match="%40"):
        C.parse("redis://user:pa?ss@h:6379/0")


# ---- database numbers ---------------------------------------------------------------------------


def test_standalone_path_and_query_databases_must_agree() -> None:
    assert C.parse("redis://h:6379/2?db=2").kind == "standalone"
    with pytest.raises(ValueError, match="two databases"):
        C.parse("redis://h:6379/2?db=3")


def test_sentinel_db_from_the_query() -> None:
    assert C.parse("redis+sentinel://h:26379/svc?db=3").db == 3
    assert C.parse("redis+sentinel://h:26379/svc?sentinel_password=sp&db=3").db == 3
    assert C.parse("redis+sentinel://h:26379/svc/3?db=3").db == 3  # both, agreeing
    assert C.parse("redis+sentinel://h:26379/svc/4").db == 4
    assert C.parse("redis+sentinel://h:26379/svc").db == 0
    client = C.connect("redis+sentinel://127.0.0.1:1/svc?db=3")  # (connects at its first command)
    assert client.connection_pool.connection_kwargs["db"] == 3
    with pytest.raises(ValueError, match="two databases"):
        C.parse("redis+sentinel://h:26379/svc/2?db=3")
    for bad in ("redis+sentinel://h:26379/svc?db=x", "redis+sentinel://h/svc/-1", "redis+sentinel://h/svc/+1"):
        with pytest.raises(ValueError, match=r"db|database"):
            C.parse(bad)


def test_cluster_urls_refuse_any_database_but_0() -> None:
    for bad in (
        "redis+cluster://h:7000/1",
        "redis+cluster://h:7000?db=1",
        "redis+cluster://h:7000/?db=2",
        "rediss+cluster://h:7000/0?db=5",
    ):
        with pytest.raises(ValueError, match="database 0 only"):
            C.parse(bad)
    for ok in ("redis+cluster://h:7000", "redis+cluster://h:7000/0", "redis+cluster://h:7000?db=0"):
        assert C.parse(ok).kind == "cluster"


def test_standalone_urls_refuse_a_path_that_is_not_a_database_number() -> None:
    for bad in ("redis://h:6379/abc", "redis://h:6379/1/2", "rediss://h/-1", "redis://h:6379/%201"):
        with pytest.raises(ValueError, match="bad database number"):
            C.parse(bad)
    for url, db in (
        ("redis://h:6379", 0),
        ("redis://h:6379/", 0),
        ("redis://h:6379/7", 7),
        ("redis://h:6379/?db=5", 5),
        ("rediss://h/15", 15),
    ):
        assert C.connect(C.parse(url).url).connection_pool.connection_kwargs.get("db", 0) == db
    assert C.parse("unix:///run/redis.sock?db=2").kind == "standalone"  # a socket's path is no db

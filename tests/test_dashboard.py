"""The dashboard: its JSON API (token, read-only unless --allow-writes) over a real Redis, and the page
in Debian's headless Chromium (Selenium + chromium-driver): it loads, its bars are the counters, an
alert appears within 2 s, no console errors. DISTBUDGET_UPDATE_SCREENSHOT=1 refreshes the docs' screenshot
(docs/img/dashboard.png)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from distbudget import BudgetManager, BudgetScope, Limit, ModelRates
from distbudget.dashboard import Dashboard
from tests.conftest import RedisServer

PREFIX = "pfx"
RATES = {"gpt-4o-mini": ModelRates(0.00015, 0.0006), "claude-3-5-haiku": ModelRates(0.0008, 0.004)}
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "dashboard.png"
TOKEN = "s3cret-token"


@pytest.fixture
def fleet(redis_server: RedisServer, redis_client: redis.Redis) -> BudgetManager:
    mgr = BudgetManager(redis=redis_server.url, prefix=PREFIX)
    mgr.register(BudgetScope("acme", max_cost_per_day_usd=5.0, limits=[Limit("requests", 500, "hour")]), RATES)
    mgr.register(BudgetScope("support", parent="acme", max_tokens_per_day=80_000, max_tokens_per_session=20_000), RATES)
    mgr.register(BudgetScope("research", parent="acme", max_cost_per_day_usd=2.0, alert_thresholds=[0.5]), RATES)
    for i in range(12):
        mgr.record("support", f"user-{i % 4}", "claude-3-5-haiku", 2000 + 300 * i, 800)
    for _ in range(10):
        mgr.record("research", "batch-7", "gpt-4o-mini", 400_000, 100_000)
    mgr.reserve("support", "claude-3-5-haiku", 4000, 2000, session_id="user-1")  # a live hold
    return mgr


@pytest.fixture
def board(fleet: BudgetManager, redis_server: RedisServer) -> Iterator[tuple[Dashboard, str]]:
    dashboard, url = _serve(redis_server, token=None, allow_writes=False)
    yield dashboard, url
    dashboard.close()


def _serve(server: RedisServer, token: str | None, allow_writes: bool) -> tuple[Dashboard, str]:
    dashboard = Dashboard(BudgetManager(redis=server.url, prefix=PREFIX), allow_writes=allow_writes, token=token)
    http = dashboard.serve(0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    return dashboard, f"http://127.0.0.1:{http.server_address[1]}"


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_snapshot_and_ledger_are_the_store(board: tuple[Dashboard, str], fleet: BudgetManager) -> None:
    _dashboard, url = board
    status, snap = _get(url + "/api/snapshot")
    assert status == 200 and snap["allow_writes"] is False
    support = next(s for s in snap["scopes"] if s["name"] == "support")
    want = fleet.summary("support")["limits"]["day_tokens"]
    got = next(lim for lim in support["limits"] if lim["limit_type"] == "day_tokens")
    assert (got["used"], got["held"], got["limit"]) == (want["used"], want["held"], want["limit"])
    status, ledger = _get(url + "/api/ledger?n=5")
    assert status == 200 and len(ledger) == 5
    assert [e["session_id"] for e in ledger] == ["batch-7"] * 5  # newest first: research's charges came last


def test_api_token_and_writes(fleet: BudgetManager, redis_server: RedisServer) -> None:
    dashboard, url = _serve(redis_server, token=TOKEN, allow_writes=False)
    try:
        assert _get(url + "/api/snapshot")[0] == 401
        assert _get(url + "/api/snapshot", {"Authorization": "Bearer nope"})[0] == 401
        assert _get(url + "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        body = json.dumps({"scope": "research"}).encode()
        auth = {"Authorization": f"Bearer {TOKEN}", "X-Distbudget": "1"}
        status, answer = _get(url + "/api/reset", auth, body)
        assert status == 403 and "read-only" in answer["error"]
    finally:
        dashboard.close()
    dashboard, url = _serve(redis_server, token=None, allow_writes=True)
    try:
        body = json.dumps({"scope": "research"}).encode()
        assert _get(url + "/api/reset", {}, body)[0] == 403  # no X-Distbudget header: a cross-site form
        assert fleet.summary("research")["limits"]["day_cost_usd"]["used"] > 0
        status, answer = _get(url + "/api/reset", {"X-Distbudget": "1"}, body)
        assert (status, answer["message"]) == (200, "scope 'research' reset")
        assert fleet.summary("research")["limits"]["day_cost_usd"]["used"] == 0
        status, answer = _get(url + "/api/reset", {"X-Distbudget": "1"}, json.dumps({"scope": "nobody"}).encode())
        assert status == 404 and "unknown scope" in answer["error"]
    finally:
        dashboard.close()


def _browser() -> Any:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_page_in_headless_chromium(board: tuple[Dashboard, str], fleet: BudgetManager, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _dashboard, url = board
    driver = _browser()
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".limit[data-used]")))
        driver.execute_script("clearInterval(state.timer)")  # no redraw under our reads (an alert still redraws)
        # every bar is its counter: data attributes and the drawn width (used / limit)
        for scope in ("acme", "support", "research"):
            summary = fleet.summary(scope)
            for key, lim in summary["limits"].items():
                if lim["scope"] != scope or lim["window"] == "session":
                    continue
                row = driver.find_element(By.CSS_SELECTOR, f'.limit[data-scope="{scope}"][data-limit="{key}"]')
                assert float(row.get_attribute("data-used")) == pytest.approx(lim["used"])
                assert float(row.get_attribute("data-held")) == pytest.approx(lim["held"])
                bar = row.find_element(By.CSS_SELECTOR, ".bar")
                fill = bar.find_element(By.CSS_SELECTOR, ".used")
                drawn = fill.size["width"] / bar.size["width"]
                assert drawn == pytest.approx(min(lim["used"] / lim["limit"], 1), abs=0.01), (scope, key)
                marks = bar.find_elements(By.CSS_SELECTOR, ".mark")
                assert len(marks) == (2 if scope == "research" else 1)  # 50 % (research) and 80 %
        # top sessions of the per-session limit, each its own counter
        sessions = driver.find_elements(By.CSS_SELECTOR, '.limit[data-session-limit="session_tokens"]')
        assert [s.get_attribute("data-session") for s in sessions] == ["user-3", "user-2", "user-1"]
        for s in sessions:
            want = fleet.summary("support", s.get_attribute("data-session"))["limits"]["session_tokens"]
            assert float(s.get_attribute("data-used")) == want["used"]
        # a new alert: support's day_tokens crosses 80 %; the feed shows it within 2 s
        day = fleet.summary("support")["limits"]["day_tokens"]
        began = time.monotonic()
        fleet.record("support", "user-9", "claude-3-5-haiku", int(0.85 * day["limit"] - day["used"]), 0)
        WebDriverWait(driver, 2).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#alerts li.warning[data-alert-id]"))
        )
        latency = time.monotonic() - began
        item = driver.find_element(By.CSS_SELECTOR, "#alerts li.warning")
        assert "support" in item.text and "day_tokens" in item.text and "user-9" in item.text
        print(f"\nalert on the page {latency * 1000:.0f} ms after the charge")
        WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: (
                float(
                    d.find_element(
                        By.CSS_SELECTOR, '.limit[data-scope="support"][data-limit="day_tokens"]'
                    ).get_attribute("data-used")
                )
                == fleet.summary("support")["limits"]["day_tokens"]["used"]
            )
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "#ledger tr[data-ledger-id]")
        assert rows and "user-9" in rows[0].text  # the ledger tail, newest first
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        assert driver.save_screenshot(str(tmp_path / "dashboard.png"))
        if os.environ.get("DISTBUDGET_UPDATE_SCREENSHOT"):  # the docs' picture, refreshed on demand
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "dashboard.png", SCREENSHOT)
    finally:
        driver.quit()


def test_dashboard_command_serves_the_page_and_the_api(fleet: BudgetManager, redis_server: RedisServer) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbudget.cli", "dashboard", "--redis", redis_server.url, "--prefix", PREFIX,
         "--port", "0", "--token", TOKEN],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("distbudget dashboard: reading redis://***@")
        url = proc.stderr.readline().strip().rsplit(" ", 1)[1]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert (
                response.headers["Content-Type"].startswith("text/html")
                and b"<title>distbudget</title>" in response.read()
            )
        assert _get(url + "api/snapshot")[0] == 401
        status, snap = _get(url + "api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and [s["name"] for s in snap["scopes"]] == ["acme", "support", "research"]  # by peak %
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""The Python blocks of docs/integrations.md run as written, in order, against the local provider (the
SDKs' default clients reach it through their environment variables) and a real Redis."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from tests._servers import RedisServer
from tests.integrations._llm_server import LLMServer, sdk_environment

PAGE = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_integrations_page_examples_run(
    llm: LLMServer, redis_server: RedisServer, redis_client: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in sdk_environment(llm).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    blocks = BLOCK.findall(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) >= 7
    namespace: dict[str, object] = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDKs warn about model names
        for i, block in enumerate(blocks):
            code = block.replace("redis://localhost:6379", redis_server.url)
            exec(compile(code, f"{PAGE.name} block {i + 1}", "exec"), namespace)
    assert len(llm.served) == 7  # one call per example that calls a model

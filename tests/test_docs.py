"""Every Python code block of README.md and docs/*.md runs as written, against a real Redis.

The blocks of one page run in order in one namespace (a page reads as one session: a later block may
use the ``budget`` an earlier one built), in a fresh temporary directory, after a FLUSHALL.

The URL: the docs write ``redis://localhost:6379`` — what a reader has and copies — and this test
rewrites that one exact string to the suite's own redis-server (``tests/_servers.py``, as the
minimal ACL user, so the examples also prove that ACL suffices). That keeps the examples free of
test plumbing (an environment variable read in every example would be copied into users' code), and
the test refuses any block still naming port 6379 after the rewrite, so no example ever touches the
machine's shared server.

The LLM providers: the SDKs' default clients (``OpenAI()``, ``Anthropic()``, LiteLLM, LangChain) read
their endpoint and key from the environment, so the integration examples run as written against the
local provider of the integration tests (``tests/integrations/_llm_server.py``), as Redis runs
against the suite's server.

A block that deliberately cannot run (it needs a network service) carries, on the line just before
its fence, ``<!-- not run: REASON -->``; those are few and counted below. Blocks in any other
language (``bash``, ``text``, ``json``, ``yaml``) are not Python and are not run.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._servers import RedisServer
from tests.integrations._llm_server import LLMServer, sdk_environment

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOC_URL = "redis://localhost:6379"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n]*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->\s*$")
MAX_NOT_RUN = 6  # keep the exceptions few: a doc example that cannot run is a doc example nobody checks


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (fences may be indented, e.g. inside a list)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.relative_to(REPO)}:{i + 1}: unclosed code fence")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = NOT_RUN.match(lines[k]) if k >= 0 else None
        language = info.split()[0].strip("{}.").lower() if info else ""
        out.append(Block(page, i + 1, language, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i = j + 1
    return out


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in ("python", "py")]


@pytest.fixture
def doc_url(redis_server: RedisServer) -> str:
    """The suite's server as the ACL user, without a database (the docs may add ``/0``)."""
    assert redis_server.user is not None
    user, password = redis_server.user
    return f"redis://{user}:{password}@127.0.0.1:{redis_server.port}"


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LLMServer]:
    server = LLMServer().start()
    yield server
    server.stop()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_code_blocks_run(
    page: Path,
    doc_url: str,
    redis_server: RedisServer,
    llm_server: LLMServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runnable = [b for b in python_blocks(page) if b.not_run is None]
    if not runnable:
        pytest.skip("no Python block to run on this page")
    admin = redis_server.client()
    admin.flushall()
    admin.close()
    llm_server.reset()
    for name, value in sdk_environment(llm_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REDIS_URL", raising=False)  # an example's fallback is the docs' URL
    monkeypatch.chdir(tmp_path)  # blocks that write a file (an export) write it here
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in runnable:
        code = block.code.replace(DOC_URL, doc_url)
        assert ":6379" not in code, f"{block.where}: an example names the shared server other than as {DOC_URL}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the SDKs warn about model names
                exec(compile(code, block.where, "exec"), namespace)
        except BaseException as exc:
            raise AssertionError(f"the code block at {block.where} failed: {exc!r}\n{block.code}") from exc


def test_blocks_not_run_are_few_say_why_and_compile() -> None:
    marked = [b for page in PAGES for b in python_blocks(page) if b.not_run is not None]
    assert len(marked) <= MAX_NOT_RUN, [b.where for b in marked]
    assert all(len(b.not_run or "") >= 10 for b in marked), [(b.where, b.not_run) for b in marked]
    for block in marked:  # not run, but at least valid Python
        compile(block.code, block.where, "exec")


def test_readme_is_short_and_its_links_resolve() -> None:
    """The README stays a front page (issue 12: at most 250 lines); mkdocs checks the links of
    docs/, this checks the README's relative links and their anchors (mkdocs' heading ids)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", text)
    assert links
    for target, anchor in links:
        if re.match(r"[a-z]+://", target):
            continue
        path = REPO / target
        assert path.exists(), target
        if anchor:
            ids = {heading_id(h) for h in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)}
            assert anchor in ids, (target, anchor, sorted(ids))


def heading_id(heading: str) -> str:
    """The anchor Python-Markdown's toc gives a heading (lower case, punctuation dropped, dashes)."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_quick_start_runs() -> None:
    """The README's quick start is checked, not exempted (its blocks run in the test above)."""
    assert any(b.not_run is None for b in python_blocks(REPO / "README.md"))

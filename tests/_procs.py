"""Worker processes for the multi-process tests: each a fresh interpreter as a fleet's worker is,
forked from multiprocessing's fork server, which imported distbudget, redis and the test helpers
once, so a dozen workers start in a fraction of what a dozen spawned interpreters take to import."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

PRELOAD = ["distbudget", "redis", "tests.conftest"]


def context() -> BaseContext:
    """The context to make the workers' processes, queues and events with."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx

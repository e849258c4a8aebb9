"""A local LLM provider for the integration tests: OpenAI-compatible (``/v1/chat/completions``,
``/v1/responses``) and Anthropic-compatible (``/v1/messages``) endpoints on a loopback port, JSON and
SSE streaming, with realistic usage blocks (cached input, cache writes with 5 min / 1 h parts,
reasoning). It counts every request that reaches it and what it served — the ground truth the
ledger is compared with.

Usage is a pure function of the request: the prompt is one token per 4 bytes of its text plus 4 per
message and 3 (OpenAI's own rule of thumb, so distbudget's conservative estimate is above it, as it
is for real text); half of it is read from the cache (Anthropic: a quarter more written to it, a third
of that for 1 h); the output is ``max_tokens`` (or 24), a quarter of it reasoning (OpenAI). Anthropic
is told its cache reads and writes beside ``input_tokens`` (additive), as the real API does.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_OUTPUT = 24


@dataclass(frozen=True)
class Served:
    """What the provider billed for one answered request (normal form: input includes cache)."""

    api: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    stream: bool
    cache_write_1h_tokens: int = 0  # the part of cache_write_tokens written for one hour


def _texts(value: Any, out: list[str]) -> int:
    """Collect the strings of a request part; return how many messages it holds."""
    if isinstance(value, str):
        out.append(value)
        return 0
    if isinstance(value, dict):
        return int("role" in value) + sum(_texts(v, out) for k, v in value.items() if k not in ("role", "type"))
    if isinstance(value, list):
        return sum(_texts(v, out) for v in value)
    return 0


def plan_usage(body: dict[str, Any], anthropic: bool) -> Served:
    texts: list[str] = []
    messages = sum(_texts(body.get(k), texts) for k in ("messages", "input", "system", "instructions", "prompt"))
    prompt = 3 + 4 * max(messages, 1) + (len("".join(texts).encode()) + 3) // 4
    cached = prompt // 2
    write = prompt // 4 if anthropic else 0
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    output = int(cap) if cap else DEFAULT_OUTPUT
    reasoning = 0 if anthropic else output // 4
    stream = bool(body.get("stream"))
    return Served("", str(body.get("model")), prompt, output, cached, write, reasoning, stream, write // 3)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that close kept-alive connections or streams early are expected here


class LLMServer:
    """Start with ``LLMServer().start()``; ``base_url`` for OpenAI (``.../v1``), ``url`` for Anthropic."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0  # every request that reached the server, errors included
        self.served: list[Served] = []
        self.fail_next: list[int] = []  # status codes answered (in order) before serving again
        self.chunk_delay = 0.0  # seconds between stream chunks (lets a client close mid-stream)
        # Anthropic streams: also send a cumulative message_delta mid-stream (its usage must replace,
        # never add to, the one before). The real API sends one, at the end; LiteLLM ends the stream at
        # the first one, so its tests turn this off.
        self.mid_stream_delta = True
        self.response_delay = 0.0  # seconds before answering (a client timeout shorter than it fires)
        self.cut_stream_after: int | None = None  # drop the connection after this many stream events
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> LLMServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.served.clear()
            self.fail_next.clear()
            self.chunk_delay = 0.0
            self.mid_stream_delta = True
            self.response_delay = 0.0
            self.cut_stream_after = None

    def totals(self) -> dict[str, int]:
        with self.lock:
            served = list(self.served)
        return {
            "calls": len(served),
            "input_tokens": sum(s.input_tokens for s in served),
            "output_tokens": sum(s.output_tokens for s in served),
            "cached_input_tokens": sum(s.cached_input_tokens for s in served),
            "cache_write_tokens": sum(s.cache_write_tokens for s in served),
            "reasoning_tokens": sum(s.reasoning_tokens for s in served),
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                with server.lock:
                    server.requests += 1
                    status = server.fail_next.pop(0) if server.fail_next else 200
                if status != 200:
                    self._json({"error": {"message": "injected failure", "type": "server_error"}}, status)
                    return
                path = self.path.split("?")[0]
                anthropic = path.endswith("/messages")
                routes = {
                    "/v1/chat/completions": "chat",
                    "/v1/completions": "completions",
                    "/v1/responses": "responses",
                    "/v1/messages": "messages",
                }
                api = routes.get(path)
                if api is None:
                    self._json({"error": {"message": f"no route {path}"}}, 404)
                    return
                served = replace(plan_usage(body, anthropic), api=api)
                if api == "completions":  # the legacy endpoint reports no cache or reasoning details
                    served = replace(served, cached_input_tokens=0, reasoning_tokens=0)
                with server.lock:
                    server.served.append(served)
                if server.response_delay:
                    time.sleep(server.response_delay)
                getattr(self, f"_{api}")(body, served)

            # -- plumbing --

            def _json(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if status >= 500:
                    self.send_header("retry-after-ms", "5")
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, events: list[tuple[str | None, Any]]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True
                if server.cut_stream_after is not None:  # the connection dies mid-stream
                    events = events[: server.cut_stream_after]
                try:
                    for name, data in events:
                        text = data if isinstance(data, str) else json.dumps(data)
                        frame = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
                        self.wfile.write(frame.encode())
                        self.wfile.flush()
                        if server.chunk_delay:
                            time.sleep(server.chunk_delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client closed the stream

            # -- OpenAI chat completions --

            def _chat(self, body: dict[str, Any], s: Served) -> None:
                rid = "chatcmpl-" + uuid.uuid4().hex[:12]
                usage = {
                    "prompt_tokens": s.input_tokens,
                    "completion_tokens": s.output_tokens,
                    "total_tokens": s.input_tokens + s.output_tokens,
                    "prompt_tokens_details": {"cached_tokens": s.cached_input_tokens, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": s.reasoning_tokens, "audio_tokens": 0},
                }
                base = {"id": rid, "created": int(time.time()), "model": s.model, "system_fingerprint": "fp_local"}
                visible = s.output_tokens - s.reasoning_tokens
                if not s.stream:
                    message = {"role": "assistant", "content": "tok " * visible, "refusal": None}
                    choice = {"index": 0, "message": message, "finish_reason": "length", "logprobs": None}
                    self._json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
                    return
                chunk = {**base, "object": "chat.completion.chunk"}
                events: list[tuple[str | None, Any]] = []
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                events.append((None, {**chunk, "choices": [first], "usage": None}))
                for _ in range(visible):
                    c = {"index": 0, "delta": {"content": "tok "}, "finish_reason": None}
                    events.append((None, {**chunk, "choices": [c], "usage": None}))
                events.append((None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
                if (body.get("stream_options") or {}).get("include_usage"):
                    events.append((None, {**chunk, "choices": [], "usage": usage}))
                events.append((None, "[DONE]"))
                self._sse(events)

            # -- OpenAI (legacy) completions --

            def _completions(self, body: dict[str, Any], s: Served) -> None:
                usage = {
                    "prompt_tokens": s.input_tokens,
                    "completion_tokens": s.output_tokens,
                    "total_tokens": s.input_tokens + s.output_tokens,
                }
                choice = {"index": 0, "text": "tok " * s.output_tokens, "finish_reason": "length", "logprobs": None}
                rid = "cmpl-" + uuid.uuid4().hex[:12]
                payload = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": s.model}
                self._json({**payload, "choices": [choice], "usage": usage})

            # -- OpenAI responses --

            def _responses(self, body: dict[str, Any], s: Served) -> None:
                rid = "resp_" + uuid.uuid4().hex[:12]
                visible = s.output_tokens - s.reasoning_tokens
                text = "tok " * visible
                usage = {
                    "input_tokens": s.input_tokens,
                    "input_tokens_details": {"cached_tokens": s.cached_input_tokens},
                    "output_tokens": s.output_tokens,
                    "output_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
                    "total_tokens": s.input_tokens + s.output_tokens,
                }
                item = {
                    "type": "message",
                    "id": "msg_" + rid,
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
                response = {
                    "id": rid,
                    "object": "response",
                    "created_at": int(time.time()),
                    "model": s.model,
                    "status": "completed",
                    "output": [item],
                    "parallel_tool_calls": True,
                    "tool_choice": "auto",
                    "tools": [],
                    "usage": usage,
                }
                if not s.stream:
                    self._json(response)
                    return
                pending = {**response, "status": "in_progress", "output": [], "usage": None}
                events: list[tuple[str | None, Any]] = [
                    ("response.created", {"type": "response.created", "sequence_number": 0, "response": pending})
                ]
                for i in range(visible):
                    delta = {
                        "type": "response.output_text.delta",
                        "sequence_number": i + 1,
                        "item_id": item["id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": "tok ",
                    }
                    events.append(("response.output_text.delta", delta))
                done = {"type": "response.completed", "sequence_number": visible + 1, "response": response}
                events.append(("response.completed", done))
                self._sse(events)

            # -- Anthropic messages --

            def _messages(self, body: dict[str, Any], s: Served) -> None:
                rid = "msg_" + uuid.uuid4().hex[:12]
                one_hour = s.cache_write_1h_tokens
                usage = {
                    "input_tokens": s.input_tokens - s.cached_input_tokens - s.cache_write_tokens,
                    "cache_creation_input_tokens": s.cache_write_tokens,
                    "cache_read_input_tokens": s.cached_input_tokens,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": s.cache_write_tokens - one_hour,
                        "ephemeral_1h_input_tokens": one_hour,
                    },
                    "output_tokens": s.output_tokens,
                    "service_tier": "standard",
                }
                message = {
                    "id": rid,
                    "type": "message",
                    "role": "assistant",
                    "model": s.model,
                    "content": [{"type": "text", "text": "tok " * s.output_tokens}],
                    "stop_reason": "max_tokens",
                    "stop_sequence": None,
                    "usage": usage,
                }
                if not s.stream:
                    self._json(message)
                    return
                start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
                events: list[tuple[str | None, Any]] = [
                    ("message_start", {"type": "message_start", "message": start}),
                    (
                        "content_block_start",
                        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    ),
                ]
                half = s.output_tokens // 2
                for i in range(s.output_tokens):
                    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok "}}
                    events.append(("content_block_delta", delta))
                    if i + 1 == half and server.mid_stream_delta:  # cumulative: keep the latest, never sum
                        mid = {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None}}
                        events.append(("message_delta", {**mid, "usage": {"output_tokens": half}}))
                events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
                final_usage = {k: v for k, v in usage.items() if k not in ("service_tier", "cache_creation")}
                final = {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": final_usage,
                }
                events.append(("message_delta", final))
                events.append(("message_stop", {"type": "message_stop"}))
                self._sse(events)

        return Handler


def sdk_environment(server: LLMServer) -> dict[str, str]:
    """Environment variables that point the SDKs' default clients (``OpenAI()``, ``Anthropic()``,
    LiteLLM's ``openai/`` and ``anthropic/`` models, LangChain's ``ChatOpenAI``) at ``server``: the
    docs' examples run as users write them."""
    return {
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
        "ANTHROPIC_BASE_URL": server.url,
        "ANTHROPIC_API_KEY": "test",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }

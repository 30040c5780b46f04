"""Instrumented versions of tests/fakes.py for the benchmark (subclasses; tests/fakes.py is unchanged).

- BenchSocketMode: FakeSocketMode that also stamps when each connection said hello.
- BenchSlack: FakeSlack that stamps, per question, the first visible feedback (thinking status,
  placeholder, or stream start), when each marker token first became visible in any message text
  (chat.postMessage / chat.update / chat.startStream / appendStream / stopStream), and when the
  answer finished (its end marker visible) or a notice (busy / error) was posted.
- BenchGateway: FakeGateway whose answers are generated at a scripted pace (time to first token,
  tokens per second) and carry marker tokens; it stamps when each marker is emitted. Runs in its
  own process (``GatewayProcess``) so streaming thousands of chunks does not steal the GIL from
  the Slack side, where ack and visibility times are taken. Times are ``time.monotonic()``,
  which is one system-wide clock, so they compare across processes.

A question's text carries ``qid<N> p=<profile>``; the gateway reads both from the last user turn.
Answer tokens look like ``word `` with ``zz<N>x<i>zz`` markers every ``marker_every`` tokens and
``zz<N>xEzz`` as the last token.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for fakes.py

from fakes import FakeGateway, FakeSlack, FakeSocketMode, _completion, _sse_line  # noqa: E402
from pytest_httpserver import HTTPServer  # noqa: E402
from werkzeug import Request, Response  # noqa: E402

MARKER = re.compile(r"zz(\d+)x(\d+|E)zz")
QUESTION = re.compile(r"qid(\d+) p=(\w+)")
WORDS = ("ledger ", "journal ", "period ", "accrual ", "balance ", "posting ", "entries ", "source ")


@dataclass(frozen=True)
class Profile:
    """How the fake model answers: ``tokens`` tokens, the first after ``ttft`` s, then ``tps``/s."""

    ttft: float
    tps: float
    tokens: int
    marker_every: int


PROFILES = {
    # 50 answers kept in flight while acks/feedback are measured: ~5.5 s each, visible progress.
    "long": Profile(ttft=0.5, tps=40, tokens=200, marker_every=10),
    # Probe questions sent while the long ones stream.
    "probe": Profile(ttft=0.2, tps=200, tokens=10, marker_every=5),
    # 100 concurrent questions x 2 s of gateway latency.
    "burst": Profile(ttft=2.0, tps=400, tokens=20, marker_every=10),
    # client_cpu.py: a long answer delivered as fast as the client reads it.
    "chunky": Profile(ttft=0.0, tps=100000, tokens=200, marker_every=10),
    # Soak / ceiling: short answers, fast gateway.
    "fast": Profile(ttft=0.0, tps=2000, tokens=12, marker_every=6),
}


def answer_tokens(qid: int, p: Profile) -> list[str]:
    toks = []
    for i in range(p.tokens - 1):
        toks.append(f"zz{qid}x{i}zz " if i % p.marker_every == 0 else WORDS[i % len(WORDS)])
    toks.append(f"zz{qid}xEzz")
    return toks


# ── Socket Mode ──────────────────────────────────────────────────────────────────────────


class BenchSocketMode(FakeSocketMode):
    def __init__(self) -> None:
        self.hello_times: list[float] = []
        super().__init__()

    def _handle(self, ws):  # noqa: ANN001
        self.hello_times.append(time.monotonic())
        return super()._handle(ws)


# ── Slack Web API ────────────────────────────────────────────────────────────────────────


class BenchSlack(FakeSlack):
    """FakeSlack that timestamps what a person would see, per question."""

    def __init__(self, server: HTTPServer, socket: FakeSocketMode) -> None:
        super().__init__(server, socket)
        self.cond = threading.Condition(self._lock)
        self.thread_qid: dict[tuple[str, str], int] = {}
        self.feedback: dict[int, float] = {}
        self.visible: dict[tuple[int, str], float] = {}
        self.done: dict[int, float] = {}
        self.notices: dict[int, str] = {}
        self.method_counts: dict[str, int] = {}

    def register(self, qid: int, channel: str, thread_ts: str) -> None:
        with self._lock:
            self.thread_qid[(channel, thread_ts)] = qid

    def finished(self) -> int:
        with self._lock:
            return len(self.done) + len(self.notices)

    def trim(self) -> None:
        """Drop recorded calls and server logs (they only grow)."""
        with self._lock:
            self.calls.clear()
        self.server.clear_log()

    def _dispatch(self, request: Request) -> Response:
        method = request.path.rsplit("/", 1)[-1]
        with self._lock:
            self.method_counts[method] = self.method_counts.get(method, 0) + 1
            if len(self.calls) > 2000:
                self.calls.clear()
        return super()._dispatch(request)

    # what a person sees ------------------------------------------------------------------

    def _feedback(self, channel: str, thread_ts: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            qid = self.thread_qid.get((channel, thread_ts or ""))
            if qid is not None and qid not in self.feedback:
                self.feedback[qid] = now

    def _scan(self, channel: str, msg: dict | None) -> None:
        if not msg:
            return
        now = time.monotonic()
        parts = [msg.get("markdown_text") or "", msg.get("text") or ""]
        parts += [b.get("text") or "" for b in msg.get("blocks") or [] if isinstance(b.get("text"), str)]
        text = "\n".join(parts)
        with self._lock:
            for m in MARKER.finditer(text):
                qid, idx = int(m.group(1)), m.group(2)
                if (qid, idx) not in self.visible:
                    self.visible[(qid, idx)] = now
                if idx == "E" and qid not in self.done:
                    self.done[qid] = now
                    self.cond.notify_all()
            stripped = text.lstrip("_ ")
            if stripped.startswith(("Sorry", "I'm busy", "I’m busy")):
                qid = self.thread_qid.get((channel, msg.get("thread_ts") or msg.get("ts") or ""))
                if qid is not None and qid not in self.notices and qid not in self.done:
                    self.notices[qid] = stripped[:60]
                    self.cond.notify_all()

    def _m_assistant_threads_setStatus(self, p: dict) -> dict:
        r = super()._m_assistant_threads_setStatus(p)
        if r.get("ok") and p.get("status"):
            self._feedback(p.get("channel_id", ""), p.get("thread_ts"))
        return r

    def _m_chat_postMessage(self, p: dict) -> dict:
        r = super()._m_chat_postMessage(p)
        self._feedback(p["channel"], p.get("thread_ts"))
        self._scan(p["channel"], r.get("message"))
        return r

    def _m_chat_update(self, p: dict) -> dict:
        r = super()._m_chat_update(p)
        if r.get("ok"):
            self._scan(p["channel"], self._find(p["channel"], p["ts"]))
        return r

    def _m_chat_startStream(self, p: dict) -> dict:
        r = super()._m_chat_startStream(p)
        if r.get("ok"):
            self._feedback(p["channel"], p.get("thread_ts"))
            self._scan(p["channel"], self._find(p["channel"], r["ts"]))
        return r

    def _m_chat_appendStream(self, p: dict) -> dict:
        r = super()._m_chat_appendStream(p)
        if r.get("ok"):
            self._scan(p["channel"], self._find(p["channel"], p["ts"]))
        return r

    def _m_chat_stopStream(self, p: dict) -> dict:
        r = super()._m_chat_stopStream(p)
        if r.get("ok"):
            self._scan(p["channel"], self._find(p["channel"], p["ts"]))
        return r


# ── LiteLLM gateway ──────────────────────────────────────────────────────────────────────


class BenchGateway(FakeGateway):
    """Paced answers with marker tokens; ``emitted[(qid, idx)]`` = when the token left the gateway.

    Streaming requests get one SSE chunk per token at the scripted pace. Non-streaming requests
    get the whole answer once the last token would have been generated, and each marker is
    stamped with the time it was generated, so token -> visible is comparable between the two.
    """

    def __init__(self, server: HTTPServer) -> None:
        super().__init__(server)
        self.emitted: dict[tuple[int, str], float] = {}
        self.count = 0

    def _handle(self, request: Request) -> Response:
        t0 = time.monotonic()
        body = request.get_json()
        with self._lock:
            self.count += 1
        text = ""
        for msg in reversed(body.get("messages") or []):
            if msg.get("role") == "user":
                content = msg.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                break
        m = QUESTION.search(text)
        qid, profile = (int(m.group(1)), PROFILES.get(m.group(2), PROFILES["fast"])) if m else (-1, PROFILES["fast"])
        toks = answer_tokens(qid, profile)
        if body.get("stream"):
            return Response(self._paced_sse(body, qid, profile, toks, t0), mimetype="text/event-stream")
        end = t0 + profile.ttft + (len(toks) - 1) / profile.tps
        time.sleep(max(0.0, end - time.monotonic()))
        with self._lock:
            for i, tok in enumerate(toks):
                mk = MARKER.search(tok)
                if mk:
                    self.emitted[(qid, mk.group(2))] = t0 + profile.ttft + i / profile.tps
        out = _completion(body, _Text("".join(toks), len(toks)))
        return Response(json.dumps(out), mimetype="application/json")

    def _paced_sse(self, body: dict, qid: int, p: Profile, toks: list[str], t0: float):
        model = body.get("model")
        for i, tok in enumerate(toks):
            due = t0 + p.ttft + i / p.tps
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            delta = {"content": tok} if i else {"role": "assistant", "content": tok}
            mk = MARKER.search(tok)
            if mk:
                with self._lock:
                    self.emitted[(qid, mk.group(2))] = time.monotonic()
            yield _sse_line({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        yield _sse_line({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield _sse_line({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "choices": [],
                         "usage": {"prompt_tokens": 100, "completion_tokens": len(toks), "total_tokens": 100 + len(toks)}})
        yield "data: [DONE]\n\n"


@dataclass
class _Text:
    text: str
    completion_tokens: int
    prompt_tokens: int = 100


def _gateway_main(conn) -> None:  # noqa: ANN001 - runs in the child process
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    gw = BenchGateway(server)
    conn.send(gw.base_url)
    while True:
        cmd = conn.recv()
        if cmd == "take":
            with gw._lock:
                emitted, gw.emitted = gw.emitted, {}
                count, gw.count = gw.count, 0
            server.clear_log()
            conn.send((emitted, count))
        elif cmd == "stop":
            server.stop()
            conn.send("stopped")
            return


class GatewayProcess:
    """The BenchGateway in a child process. ``take()`` returns and clears (emitted, requests)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_gateway_main, args=(child,), daemon=True, name="bench-gateway")
        self.proc.start()
        self.base_url: str = self._conn.recv()
        self._lock = threading.Lock()

    def take(self) -> tuple[dict, int]:
        with self._lock:
            self._conn.send("take")
            return self._conn.recv()

    def stop(self) -> None:
        with self._lock:
            self._conn.send("stop")
            self._conn.recv()
        self.proc.join(5)

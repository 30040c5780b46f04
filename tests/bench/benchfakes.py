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

Production-shaped transport (``run.py --transport production``):

- ``make_tls(dir)`` makes a throwaway CA and a server certificate for 127.0.0.1 with the
  ``openssl`` CLI; the bot trusts it through ``SSL_CERT_FILE`` (a bundle: the system CAs + this CA).
- ShapedHTTPServer: pytest-httpserver's matchers on a keep-alive HTTP/1.1 server (werkzeug's
  closes every connection), TLS done per connection in the connection's own thread, and an
  injected round trip: 2 x RTT when a connection is accepted (TCP + TLS
  handshake) and 1 x RTT per request (half before the request is handled, half before the
  response leaves). It counts accepted connections and requests, so a client that opens a
  connection per call pays, and shows, more than one that keeps connections alive. With no TLS
  and RTT 0 it is the loopback server (both transports use it, so they differ only in TLS + RTT).
- Socket Mode stays ws:// without injected RTT (see BenchSocketMode).
- Rate tiers: BenchSlack turns tests/fakes.py's tier enforcement off, except after
  ``enforce_tiers()`` (the tiers scenario), which uses fakes.py's own (``FakeSlack._over_tier``)
  or, with a fakes.py that has none, this module's SlackTiers (the same budgets).

A question's text carries ``qid<N> p=<profile>``; the gateway reads both from the last user turn.
Answer tokens look like ``word `` with ``zz<N>x<i>zz`` markers every ``marker_every`` tokens and
``zz<N>xEzz`` as the last token.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import io
import json
import math
import multiprocessing as mp
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for fakes.py

from fakes import FakeGateway, FakeSlack, FakeSocketMode, _completion, _sse_line  # noqa: E402
from pytest_httpserver import HTTPServer  # noqa: E402
from werkzeug import Request, Response  # noqa: E402

MARKER = re.compile(r"zz(\d+)x(\d+|E)zz")
QUESTION = re.compile(r"qid(\d+) p=(\w+)")
NOTICE_STARTS = ("Sorry", "I'm busy", "I’m busy")
WORDS = ("ledger ", "journal ", "period ", "accrual ", "balance ", "posting ", "entries ", "source ")


@dataclass(frozen=True)
class Profile:
    """How the fake model answers: ``tokens`` tokens, the first after ``ttft`` s, then ``tps``/s.
    With ``chars``, as many tokens as make an answer of exactly that many characters."""

    ttft: float
    tps: float
    tokens: int
    marker_every: int
    chars: int = 0


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
    # CPU per answer as issue 15 measures it: a 50-chunk stream from an instant model.
    "chunky50": Profile(ttft=0.0, tps=100000, tokens=50, marker_every=10),
    # Overload: ~1.5 s per answer, so 100 workers finish ~65/s while questions arrive at 100/s.
    "overload": Profile(ttft=1.0, tps=100, tokens=50, marker_every=10),
    # Rate tiers (issue 10): 3,000 characters at ~330 characters/s (a Sonnet-class model).
    "tier": Profile(ttft=0.5, tps=40, tokens=0, marker_every=5, chars=3000),
}


def answer_tokens(qid: int, p: Profile) -> list[str]:
    toks: list[str] = []
    end = f"zz{qid}xEzz"
    if p.chars:
        size, i = len(end), 0
        while True:
            tok = f"zz{qid}x{i}zz " if i % p.marker_every == 0 else WORDS[i % len(WORDS)]
            if size + len(tok) > p.chars:
                break
            toks.append(tok)
            size += len(tok)
            i += 1
        pad = p.chars - size  # exact length: widen the last word with a run of letters
        if pad:
            toks.append("x" * (pad - 1) + " " if pad > 1 else " ")
        toks.append(end)
        return toks
    for i in range(p.tokens - 1):
        toks.append(f"zz{qid}x{i}zz " if i % p.marker_every == 0 else WORDS[i % len(WORDS)])
    toks.append(end)
    return toks


def answer_text(qid: int, profile: str) -> str:
    """The exact text the gateway streams for question ``qid`` with ``profile``."""
    return "".join(answer_tokens(qid, PROFILES[profile]))


# ── Production-shaped transport: TLS and round trips ─────────────────────────────────────


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and a server certificate it signed (CN localhost, SAN 127.0.0.1)."""

    ca: str  # the CA certificate alone
    bundle: str  # system CAs + the throwaway CA: what SSL_CERT_FILE points at
    cert: str
    key: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def make_tls(directory: Path) -> TLSFiles:
    """Generate the CA and server certificate with the ``openssl`` CLI (ECDSA P-256, 2 days).

    The bundle starts with the system's CA bundle so that clients load a production-sized
    trust store on every new context (urllib builds one per connection), then adds this CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    d = directory

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ledger-bot bench throwaway CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    system = next((Path(b) for b in SYSTEM_CA_BUNDLES if Path(b).is_file()), None)
    ca = (d / "ca.pem").read_text()
    (d / "bundle.pem").write_text((system.read_text() if system else "") + "\n" + ca)
    return TLSFiles(ca=str(d / "ca.pem"), bundle=str(d / "bundle.pem"), cert=str(d / "server.pem"),
                    key=str(d / "server.key"))


class _KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, handing each request to the WSGI app.

    werkzeug's development server (what pytest-httpserver runs) sends ``Connection: close`` on
    every response, so no client could reuse a connection against it and connection reuse would
    be invisible. This handler keeps a connection open unless the client asks to close it
    (urllib does), sends bodies with Content-Length, and streams the rest chunked (SSE).
    """

    protocol_version = "HTTP/1.1"
    server_version = "bench-fake"
    timeout = 120  # an idle kept-alive connection is dropped after this (real hosts do too)

    def log_message(self, format, *args) -> None:
        pass

    def _wsgi(self) -> None:
        shaped: ShapedHTTPServer = self.server.shaped  # type: ignore[attr-defined]
        shaped._count("requests")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        environ = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": urllib.parse.unquote(path),
            "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": str(self.client_address[1]), "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if shaped.tls_context is not None else "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for key, value in self.headers.items():
            key = key.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ["HTTP_" + key] = value
        started: list = []

        def start_response(status, headers, exc_info=None):
            started[:] = [status, headers]
            return lambda data: None

        if shaped.rtt:
            time.sleep(shaped.rtt / 2)  # the request travels to the server ...
        result = shaped.app(environ, start_response)
        try:
            if shaped.rtt:
                time.sleep(shaped.rtt / 2)  # ... and the response back
            status, headers = started
            code, _, reason = status.partition(" ")
            self.send_response(int(code), reason)
            chunked = not any(k.lower() == "content-length" for k, _ in headers)
            for k, v in headers:
                self.send_header(k, v)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            if not chunked:  # headers and body in one write, as servers do
                self._headers_buffer.append(b"\r\n" + b"".join(result))
                self.flush_headers()
                return
            self.end_headers()
            for data in result:
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except Exception:
            self.close_connection = True  # a stream cut mid-way: drop the connection
            raise
        finally:
            close = getattr(result, "close", None)
            if close:
                close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _wsgi


class _ShapedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection; the (TLS) handshake and its injected cost happen in that
    thread, so a slow handshake never holds up the accept loop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 100 clients connecting at once must not overflow the backlog

    def __init__(self, host: str, shaped: ShapedHTTPServer) -> None:
        self.shaped = shaped
        super().__init__((host, 0), _KeepAliveHandler)
        self.port = self.server_address[1]

    def finish_request(self, request, client_address) -> None:
        shaped = self.shaped
        shaped._count("connections")
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as production servers do
        if shaped.rtt:
            time.sleep(2 * shaped.rtt)  # TCP handshake + TLS 1.3 handshake: ~2 round trips
        conn = request
        if shaped.tls_context is not None:
            try:
                conn = shaped.tls_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                shaped._count("handshake_failures")
                return
        try:
            super().finish_request(conn, client_address)
        finally:
            if conn is not request:
                with contextlib.suppress(Exception):
                    conn.close()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away mid-request (or a TLS EOF): nothing to report


class ShapedHTTPServer(HTTPServer):
    """pytest-httpserver's HTTPServer (same matchers and handlers) on a keep-alive HTTP/1.1
    server shaped like a production host: TLS, a round-trip time, and counters of accepted
    connections and requests (``counters()``). ``rtt=0``, no TLS: loopback."""

    def __init__(self, *, rtt: float = 0.0, tls: TLSFiles | None = None) -> None:
        super().__init__(host="127.0.0.1", port=0, threaded=True)
        self.rtt = rtt
        self.tls_context = tls.server_context() if tls else None
        self.ssl_context = self.tls_context  # only for url_for(): https://
        self._counts: collections.Counter = collections.Counter()
        self._counts_lock = threading.Lock()
        self.app = None

    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def counters(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError("Server is already running")
        self.app = Request.application(self.application)
        self.server = _ShapedServer(self.host, self)
        self.port = self.server.port
        self.server_thread = threading.Thread(target=self.thread_target, daemon=True)
        self.server_thread.start()

    def thread_target(self) -> None:
        self.server.serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server_thread.join()
        self.server = None
        self.server_thread = None


# ── Socket Mode ──────────────────────────────────────────────────────────────────────────


class BenchSocketMode(FakeSocketMode):
    """FakeSocketMode that also stamps when each connection said hello.

    Plain ws:// in both transports: slack_sdk's builtin SocketModeClient (the bot's and Bolt's)
    wraps the socket in TLS only when the port is 443 ("only for library testing"), so wss:// on
    a test port would silently be plain TCP anyway. The one long-lived connection's handshake is
    not paid per answer.
    """

    def __init__(self) -> None:
        self.hello_times: list[float] = []
        super().__init__()

    def _handle(self, ws):
        self.hello_times.append(time.monotonic())
        return super()._handle(ws)


# ── Slack rate tiers ─────────────────────────────────────────────────────────────────────


class SlackTiers:
    """Slack's per-method rate limits, as the Web API enforces them for one workspace.

    Per-minute budgets (Slack's method reference): Tier 2 = 20/min for chat.startStream and
    chat.stopStream, Tier 3 = 50/min for chat.update and conversations.replies, Tier 4 =
    100/min for chat.appendStream; chat.postMessage about one per second per channel (a bucket
    of ``POST_BURST`` that refills at 1/s). A budget is a sliding 60 s window; a call over it gets
    HTTP 429 ``{"ok": false, "error": "ratelimited"}`` with ``Retry-After`` = whole seconds until
    the oldest call in the window ages out (what slack_sdk's RateLimitErrorRetryHandler sleeps).
    Rejected calls do not count against the budget. Methods not listed are not limited.

    Used only when tests/fakes.py's FakeSlack has no enforcement of its own (``_over_tier``,
    issue 10); see BenchSlack.enforce_tiers. Nothing else depends on it.
    """

    PER_MINUTE = {"chat.startStream": 20, "chat.stopStream": 20, "chat.update": 50, "conversations.replies": 50,
                  "chat.appendStream": 100}
    POST_PER_SECOND = 1.0
    POST_BURST = 3

    def __init__(self, per_minute: dict[str, int] | None = None, window: float = 60.0) -> None:
        self.per_minute = {**self.PER_MINUTE, **(per_minute or {})}
        self.window = window
        self._lock = threading.Lock()
        self._calls: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._buckets: dict[str, tuple[float, float]] = {}  # channel -> (tokens, at)
        self.accepted: collections.Counter = collections.Counter()
        self.rejected: collections.Counter = collections.Counter()

    def admit(self, method: str, channel: str | None) -> int | None:
        """None if the call may go ahead (and counts), else the Retry-After in seconds."""
        now = time.monotonic()
        with self._lock:
            if method == "chat.postMessage" and channel:
                tokens, at = self._buckets.get(channel, (float(self.POST_BURST), now))
                tokens = min(float(self.POST_BURST), tokens + (now - at) * self.POST_PER_SECOND)
                if tokens < 1.0:
                    self._buckets[channel] = (tokens, now)
                    self.rejected[method] += 1
                    return max(1, math.ceil((1.0 - tokens) / self.POST_PER_SECOND))
                self._buckets[channel] = (tokens - 1.0, now)
                self.accepted[method] += 1
                return None
            limit = self.per_minute.get(method)
            if limit is None:
                return None
            calls = self._calls[method]
            while calls and calls[0] <= now - self.window:
                calls.popleft()
            if len(calls) >= limit:
                self.rejected[method] += 1
                return max(1, math.ceil(calls[0] + self.window - now))
            calls.append(now)
            self.accepted[method] += 1
            return None


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
        self.notice_at: dict[int, float] = {}
        self.method_counts: dict[str, int] = {}
        self.enforcing_tiers = False
        self.tier_enforcer: SlackTiers | None = None  # ours, only where tests/fakes.py has none
        self.tier_source = "off"

    # rate tiers ----------------------------------------------------------------------------

    def enforce_tiers(self) -> None:
        """From now on, answer calls over Slack's rate tiers with 429 + Retry-After.

        tests/fakes.py's FakeSlack enforces the tiers itself (``_over_tier``, issue 10); that is
        used when present, else this module's SlackTiers. Until this is called the benchmark
        turns enforcement off: the other scenarios measure speed at a load (100 answers at once)
        that no Slack tier allows, and a 429 there would measure the retry sleep instead.
        """
        self.enforcing_tiers = True
        if hasattr(FakeSlack, "_over_tier"):
            self.tier_source = "tests/fakes.py FakeSlack._over_tier"
        else:
            self.tier_enforcer = SlackTiers()
            self.tier_source = "benchfakes.SlackTiers"

    def _over_tier(self, method: str, channel: str) -> float | None:  # tests/fakes.py's hook
        if not self.enforcing_tiers or self.tier_enforcer is not None:
            return None
        return super()._over_tier(method, channel)

    def rejected(self) -> collections.Counter:
        """429s sent to the client, by method."""
        if self.tier_enforcer is not None:
            return collections.Counter(self.tier_enforcer.rejected)
        with self._lock:
            return collections.Counter(getattr(self, "rate_limited", []))

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
        tiers = self.tier_enforcer
        if tiers is not None:
            if request.mimetype == "application/json":
                channel = (request.get_json(silent=True) or {}).get("channel")
            else:
                channel = request.form.get("channel") or request.args.get("channel")
            retry_after = tiers.admit(method, channel)
            if retry_after is not None:
                return Response(json.dumps({"ok": False, "error": "ratelimited"}), status=429,
                                headers={"Retry-After": str(retry_after)}, mimetype="application/json")
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
            stripped = next((t.lstrip("_ \n") for t in parts if t.lstrip("_ \n").startswith(NOTICE_STARTS)), "")
            if stripped:
                qid = self.thread_qid.get((channel, msg.get("thread_ts") or msg.get("ts") or ""))
                if qid is not None and qid not in self.notices and qid not in self.done:
                    self.notices[qid] = stripped[:60]
                    self.notice_at[qid] = now
                    self.cond.notify_all()

    def _m_assistant_threads_setStatus(self, p: dict) -> dict:
        r = super()._m_assistant_threads_setStatus(p)
        if r.get("ok") and p.get("status"):
            self._feedback(p.get("channel_id", ""), p.get("thread_ts"))
        return r

    def _m_reactions_add(self, p: dict) -> dict:
        r = super()._m_reactions_add(p)
        if r.get("ok"):  # a 👀 on the question: its thread is the question's own ts
            self._feedback(p["channel"], p.get("timestamp"))
        return r

    def _m_chat_postEphemeral(self, p: dict) -> dict:
        r = super()._m_chat_postEphemeral(p)
        # In a thread, or (a question at the top of a channel) just under it: the channel's
        # newest question is the one it answers.
        thread_ts = p.get("thread_ts") or max(
            (ts for (ch, ts) in list(self.thread_qid) if ch == p["channel"]), key=float, default=None)
        self._feedback(p["channel"], thread_ts)
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


def _gateway_main(conn, rtt: float = 0.0, tls: TLSFiles | None = None) -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ShapedHTTPServer(rtt=rtt, tls=tls)
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
        elif cmd == "counters":
            conn.send(server.counters())
        elif cmd == "stop":
            server.stop()
            conn.send("stopped")
            return


class GatewayProcess:
    """The BenchGateway in a child process. ``take()`` returns and clears (emitted, requests);
    ``counters()`` returns the server's cumulative {"connections", "requests"}. With ``rtt`` and
    ``tls`` it is shaped like the production gateway (see ShapedHTTPServer)."""

    def __init__(self, rtt: float = 0.0, tls: TLSFiles | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_gateway_main, args=(child, rtt, tls), daemon=True, name="bench-gateway")
        self.proc.start()
        self.base_url: str = self._conn.recv()
        self._lock = threading.Lock()

    def take(self) -> tuple[dict, int]:
        with self._lock:
            self._conn.send("take")
            return self._conn.recv()

    def counters(self) -> dict[str, int]:
        with self._lock:
            self._conn.send("counters")
            return self._conn.recv()

    def stop(self) -> None:
        with self._lock:
            self._conn.send("stop")
            self._conn.recv()
        self.proc.join(5)

"""Local stand-ins for the three things ledger-bot talks to, speaking their real protocols.

- FakeSocketMode: a WebSocket server speaking Slack Socket Mode (hello, envelopes, acks,
  disconnect). slack_sdk's real SocketModeClient connects to it over plain ws://.
- FakeSlack: the Slack Web API (auth.test, apps.connections.open, conversations.replies,
  chat.*, assistant.threads.setStatus, streaming) on pytest-httpserver, keeping the channel
  history so tests can assert on what a person would see in the thread.
- FakeGateway: the LiteLLM gateway's OpenAI-compatible /chat/completions, streaming SSE, with
  scripted answers, latency and failures.

Nothing here knows about ledger_bot's internals.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_httpserver import HTTPServer
from websockets.sync.server import ServerConnection, serve
from werkzeug import Request, Response

BOT_USER = "UBOT0001"
BOT_ID = "BBOT0001"
TEAM = "T0000001"
APP_TOKEN_TICKET = "ticket-abc123"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# ── Socket Mode ──────────────────────────────────────────────────────────────────────────


_SHUT_RDWR = 2  # socket.SHUT_RDWR


class _Relay:
    """A TCP relay in front of the WebSocket server, so a test can make the connection go
    silent without a close frame (an edge restarting, a NAT dropping the flow): ``silence``
    swallows every byte both ways and keeps both sockets open."""

    def __init__(self, target_port: int) -> None:
        import socket as _socket

        self.target_port = target_port
        self.silent = threading.Event()
        self._listener = _socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._socks: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket as _socket

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.silent.clear()  # a new connection starts healthy
            upstream = _socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                if not self.silent.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if not self.silent.is_set():
                for sock in (src, dst):  # shutdown first: close alone waits for the other recv
                    try:
                        sock.shutdown(_SHUT_RDWR)
                        sock.close()
                    except OSError:
                        pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._socks:
            try:
                sock.shutdown(_SHUT_RDWR)
                sock.close()
            except OSError:
                pass


class FakeSocketMode:
    """A Socket Mode endpoint: sends ``hello`` on connect, pushes envelopes, records acks.
    ``go_silent`` makes the live connection half-open; ``max_frame`` is what a frame may be."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections: list[ServerConnection] = []
        self.total_connections = 0
        self.acks: dict[str, float] = {}  # envelope_id -> time the ack arrived
        self.sent: dict[str, float] = {}  # envelope_id -> time the envelope was sent
        self.ack_payloads: dict[str, dict] = {}
        self._server = serve(self._handle, "127.0.0.1", 0, compression=None, ping_interval=None)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.relay = _Relay(self.port)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.port}/link/?ticket={APP_TOKEN_TICKET}"

    def go_silent(self) -> None:
        """The live connection stops carrying anything, in both directions, with no close
        frame and no TCP reset: pings go unanswered, events never arrive."""
        self.relay.silent.set()

    def _handle(self, ws: ServerConnection) -> None:
        with self._lock:
            self.connections.append(ws)
            self.total_connections += 1
        try:
            ws.send(json.dumps({"type": "hello", "num_connections": 1,
                                "connection_info": {"app_id": "A0000001"}, "debug_info": {"host": "fake"}}))
            for raw in ws:
                msg = json.loads(raw)
                if "envelope_id" in msg:
                    with self._lock:
                        self.acks[msg["envelope_id"]] = time.monotonic()
                        self.ack_payloads[msg["envelope_id"]] = msg
        except Exception:
            pass
        finally:
            with self._lock:
                if ws in self.connections:
                    self.connections.remove(ws)

    def live(self) -> list[ServerConnection]:
        with self._lock:
            return list(self.connections)

    def wait_connected(self, total: int = 1, timeout: float = 10) -> None:
        wait_for(lambda: self.total_connections >= total and self.live(), timeout, f"{total} socket connections")

    def send_raw(self, frame: str) -> None:
        """Send a frame exactly as given (malformed or odd envelopes)."""
        wait_for(lambda: self.live(), 10, "a live socket connection")[-1].send(frame)

    def send(self, envelope: dict) -> str:
        """Send one envelope on the newest live connection; returns its envelope_id."""
        conn = wait_for(lambda: self.live(), 10, "a live socket connection")[-1]
        eid = envelope.setdefault("envelope_id", str(uuid.uuid4()))
        with self._lock:
            self.sent[eid] = time.monotonic()
        conn.send(json.dumps(envelope))
        return eid

    def send_event(self, event: dict, *, event_id: str | None = None, retry_attempt: int = 0) -> str:
        payload = {
            "token": "verification-token", "team_id": TEAM, "api_app_id": "A0000001", "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}", "event_time": int(time.time()),
            "event": event,
        }
        return self.send({"type": "events_api", "payload": payload, "accepts_response_payload": False,
                          "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else ""})

    def send_interactive(self, payload: dict) -> str:
        return self.send({"type": "interactive", "payload": payload, "accepts_response_payload": True})

    def send_block_action(self, payload: dict) -> str:
        return self.send({"type": "interactive", "payload": payload, "accepts_response_payload": False})

    def send_disconnect(self, reason: str = "refresh_requested") -> None:
        conn = self.live()[-1]
        conn.send(json.dumps({"type": "disconnect", "reason": reason, "debug_info": {"host": "fake"}}))

    def wait_ack(self, envelope_id: str, timeout: float = 5) -> float:
        """Seconds between sending the envelope and receiving its ack."""
        wait_for(lambda: envelope_id in self.acks, timeout, f"ack of {envelope_id}")
        return self.acks[envelope_id] - self.sent[envelope_id]

    def close(self) -> None:
        self.relay.close()  # first: a silenced connection would hold shutdown for its close timeout
        self._server.shutdown()
        for ws in self.live():
            ws.close()


# ── Slack Web API ────────────────────────────────────────────────────────────────────────


@dataclass
class Call:
    method: str
    params: dict
    token: str


# Slack's per-workspace rate tiers, calls per minute (method reference), enforced by FakeSlack
# like Slack does: a call over the tier answers HTTP 429 with Retry-After.
SLACK_TIERS = {
    "chat.startStream": 20, "chat.stopStream": 20, "chat.appendStream": 100, "chat.update": 50,
    "conversations.replies": 50, "chat.postEphemeral": 100, "assistant.threads.setStatus": 50,
    "assistant.threads.setSuggestedPrompts": 100, "assistant.threads.setTitle": 100, "views.open": 100,
    "views.publish": 100,
}
REVOKED_ERRORS = {"apps.connections.open": "invalid_auth"}


class FakeSlack:
    """The Slack Web API with just enough state: channels hold messages, threads are real.

    As strict as Slack where the bot could get it wrong: per-method rate tiers (429 with
    Retry-After; ``chat.postMessage`` about one per second per channel), ``chat.update`` on a
    message still streaming (``streaming_state_conflict``), the Stop button (``press_stop``:
    ``stopped_by_user`` from then on), block_ids unique per message and per update
    (``invalid_blocks``), a token revoked mid-run (``revoke``).

    ``fail(method, error=..., status=..., times=n)`` scripts failures; ``calls`` records every
    request; ``rate_limited`` every call answered 429. ``thread(channel, ts)`` shows the thread
    the way Slack would render it.
    """

    def __init__(self, server: HTTPServer, socket: FakeSocketMode) -> None:
        self.server = server
        self.socket = socket
        self._lock = threading.RLock()
        self.calls: list[Call] = []
        self.messages: dict[str, list[dict]] = {}
        self.streams: dict[str, dict] = {}  # ts -> {"channel", "state"}
        self._failures: dict[str, list[tuple[str | None, int, dict]]] = {}
        self._clock = itertools.count(1)
        self.status_supported = True
        self.tiers = dict(SLACK_TIERS)
        self.rate_limited: list[str] = []
        self.revoked = False
        self._window: dict[str, list[float]] = {}
        self._delays: dict[str, float] = {}
        self.triggers: dict[str, float] = {}  # trigger_id -> when issued (valid for 3 s, once)
        self.views: dict[str, dict] = {}  # user -> published Home view; "modal:<id>" -> opened modals
        self.suggested: dict[str, list[dict]] = {}  # "channel:thread_ts" -> prompts
        self.titles: dict[str, str] = {}
        self.files: dict[str, tuple[str, bytes]] = {}  # file id -> (content type, bytes)
        server.expect_request(re.compile(r"^/files/[\w.-]+/[^/]+$")).respond_with_handler(self._file)
        server.expect_request(re.compile(r"^/api/[\w.]+$")).respond_with_handler(self._dispatch)

    @property
    def api_url(self) -> str:
        return self.server.url_for("/api/")

    # scripting ---------------------------------------------------------------------------

    def fail(self, method: str, *, error: str | None = None, status: int = 200, times: int = 1,
             headers: dict | None = None) -> None:
        with self._lock:
            self._failures.setdefault(method, []).extend([(error, status, headers or {})] * times)

    def new_trigger(self) -> str:
        trigger = f"{next(self._clock)}.{uuid.uuid4().hex[:8]}"
        self.triggers[trigger] = time.monotonic()
        return trigger

    def add_file(self, name: str, content_type: str, data: bytes) -> dict:
        """A file a person uploads; returns the file object Slack puts in the message event."""
        file_id = f"F{uuid.uuid4().hex[:8].upper()}"
        self.files[file_id] = (content_type, data)
        url = self.server.url_for(f"/files/{file_id}/{name}")
        return {"id": file_id, "name": name, "title": name, "mimetype": content_type, "filetype": name.rsplit(".")[-1],
                "size": len(data), "url_private": url, "url_private_download": url + "?download=1"}

    def _file(self, request: Request) -> Response:
        """files.slack.com: the bytes with a valid bot token, else Slack's login page (HTML)."""
        file_id = request.path.split("/")[2]
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        with self._lock:
            self.calls.append(Call("files.download", {"file": file_id}, token))
        if not token.startswith("xoxb-") or self.revoked or file_id not in self.files:
            return Response("<!DOCTYPE html><html><body>Sign in to Slack</body></html>", mimetype="text/html")
        content_type, data = self.files[file_id]
        return Response(data, mimetype=content_type)

    def delay(self, method: str, seconds: float) -> None:
        """Make every call of ``method`` take ``seconds`` (a slow Slack)."""
        self._delays[method] = seconds

    def press_stop(self, ts: str) -> None:
        """A person presses Stop on the streaming message ``ts``."""
        with self._lock:
            self.streams[ts]["state"] = "stopped_by_user"
            msg = next(m for ms in self.messages.values() for m in ms if m["ts"] == ts)
            msg["streaming"] = False

    def revoke(self) -> None:
        """Both tokens are revoked, as when the app is uninstalled: every call fails."""
        self.revoked = True

    def _over_tier(self, method: str, channel: str) -> float | None:
        """Seconds until ``method`` may be called again, if this call is over its limit."""
        if method == "chat.postMessage":
            key, limit, window = f"{method}:{channel}", 1, 1.0
        elif method in self.tiers:
            key, limit, window = method, self.tiers[method], 60.0
        else:
            return None
        now = time.monotonic()
        with self._lock:
            calls = [t for t in self._window.get(key, []) if t > now - window]
            if len(calls) >= limit:
                self._window[key] = calls
                return calls[0] + window - now
            self._window[key] = calls + [now]
        return None

    def new_ts(self) -> str:
        return f"{1_700_000_000 + next(self._clock)}.{next(self._clock):06d}"

    def add_message(self, channel: str, *, user: str, text: str, thread_ts: str | None = None,
                    **extra: Any) -> dict:
        """Put a message in a channel as if a person (or another app) had posted it."""
        msg = {"type": "message", "user": user, "text": text, "ts": self.new_ts(), **extra}
        if thread_ts:
            msg["thread_ts"] = thread_ts
        with self._lock:
            self.messages.setdefault(channel, []).append(msg)
        return msg

    # views -------------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def thread(self, channel: str, thread_ts: str) -> list[dict]:
        with self._lock:
            return sorted(
                (m for m in self.messages.get(channel, []) if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts),
                key=lambda m: float(m["ts"]),
            )

    def bot_replies(self, channel: str, thread_ts: str) -> list[dict]:
        return [m for m in self.thread(channel, thread_ts) if m.get("bot_id") == BOT_ID]

    def shown_text(self, msg: dict) -> str:
        """What a person sees: a markdown block's text, else the markdown_text, else text."""
        for block in msg.get("blocks") or []:
            if block.get("type") == "markdown":
                return block["text"]
        return msg.get("markdown_text") or msg.get("text") or ""

    def reply_texts(self, channel: str, thread_ts: str) -> list[str]:
        return [self.shown_text(m) for m in self.bot_replies(channel, thread_ts)]

    # dispatch ----------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> Response:
        method = request.path.rsplit("/", 1)[-1]
        params: dict[str, Any] = dict(request.args)
        if request.mimetype == "application/json":
            params.update(request.get_json(silent=True) or {})
        else:
            params.update(request.form.to_dict())
        for key in ("blocks", "metadata", "chunks"):
            if isinstance(params.get(key), str):
                params[key] = json.loads(params[key])
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or params.get("token", "")
        with self._lock:
            self.calls.append(Call(method, params, token))
            scripted = self._failures.get(method)
            failure = scripted.pop(0) if scripted else None
        if self._delays.get(method):
            time.sleep(self._delays[method])  # the fake's own latency, not test synchronisation
        if self.revoked:
            return self._json({"ok": False, "error": REVOKED_ERRORS.get(method, "token_revoked")})
        wait = None if failure else self._over_tier(method, str(params.get("channel") or ""))
        if wait is not None:
            with self._lock:
                self.rate_limited.append(method)
            return Response(json.dumps({"ok": False, "error": "ratelimited"}), status=429,
                            headers={"Retry-After": str(max(1, math.ceil(wait)))}, mimetype="application/json")
        if failure:
            error, status, headers = failure
            if status != 200:
                return Response(json.dumps({"ok": False, "error": error or "internal_error"}), status=status,
                                headers=headers, mimetype="application/json")
            return self._json({"ok": False, "error": error})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return self._json({"ok": False, "error": "unknown_method"})
        return self._json(handler(params))

    @staticmethod
    def _json(body: dict) -> Response:
        return Response(json.dumps(body), mimetype="application/json")

    def _m_auth_test(self, p: dict) -> dict:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "ledger-bot",
                "team_id": TEAM, "user_id": BOT_USER, "bot_id": BOT_ID}

    def _m_apps_connections_open(self, p: dict) -> dict:
        return {"ok": True, "url": self.socket.url}

    def _m_conversations_replies(self, p: dict) -> dict:
        msgs = self.thread(p["channel"], p["ts"])
        if not msgs:
            return {"ok": False, "error": "thread_not_found"}
        limit = int(p.get("limit") or 1000)
        start = int(p.get("cursor") or 0)
        page = msgs[start:start + limit]
        more = start + limit < len(msgs)
        out = [dict(m) for m in page]
        if not p.get("include_all_metadata"):
            for m in out:
                m.pop("metadata", None)
        return {"ok": True, "messages": out, "has_more": more,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}

    @staticmethod
    def _blocks_ok(blocks: list | None, previous: list | None = None) -> bool:
        """Block ids unique within the message, and new on every update of it."""
        ids = [b.get("block_id") for b in blocks or [] if b.get("block_id")]
        old = {b.get("block_id") for b in previous or [] if b.get("block_id")}
        return len(ids) == len(set(ids)) and not (set(ids) & old)

    def _bot_message(self, channel: str, thread_ts: str | None, **fields: Any) -> dict:
        msg = {"type": "message", "user": BOT_USER, "bot_id": BOT_ID, "ts": self.new_ts(),
               **{k: v for k, v in fields.items() if v is not None}}
        if thread_ts:
            msg["thread_ts"] = thread_ts
        with self._lock:
            self.messages.setdefault(channel, []).append(msg)
        return msg

    def _find(self, channel: str, ts: str) -> dict | None:
        with self._lock:
            return next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)

    def _m_chat_postMessage(self, p: dict) -> dict:
        if not self._blocks_ok(p.get("blocks")):
            return {"ok": False, "error": "invalid_blocks"}
        msg = self._bot_message(p["channel"], p.get("thread_ts"), text=p.get("text"), blocks=p.get("blocks"),
                                markdown_text=p.get("markdown_text"), metadata=p.get("metadata"))
        return {"ok": True, "channel": p["channel"], "ts": msg["ts"], "message": msg}

    def _m_chat_update(self, p: dict) -> dict:
        msg = self._find(p["channel"], p["ts"])
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if msg.get("streaming"):
            return {"ok": False, "error": "streaming_state_conflict"}
        if not self._blocks_ok(p.get("blocks"), msg.get("blocks")):
            return {"ok": False, "error": "invalid_blocks"}
        with self._lock:
            for key in ("text", "blocks", "markdown_text", "metadata"):
                if key in p:
                    msg[key] = p[key]
            if "blocks" in p and "markdown_text" not in p:
                msg.pop("markdown_text", None)
            msg["edited"] = True
            msg["streaming"] = False  # updating a (dead) stream's message finalizes it
        return {"ok": True, "channel": p["channel"], "ts": p["ts"]}

    def _m_chat_postEphemeral(self, p: dict) -> dict:
        with self._lock:
            self.messages.setdefault("ephemeral:" + p["channel"], []).append(
                {"user_only": p.get("user"), "text": p.get("text"), "ts": self.new_ts(), "thread_ts": p.get("thread_ts")})
        return {"ok": True, "message_ts": self.new_ts()}

    def _m_assistant_threads_setStatus(self, p: dict) -> dict:
        if not self.status_supported:
            return {"ok": False, "error": "not_allowed_token_type"}
        return {"ok": True}

    def _m_assistant_threads_setSuggestedPrompts(self, p: dict) -> dict:
        prompts = p.get("prompts") or []
        if not (0 < len(prompts) <= 4 and all(x.get("title") and x.get("message") for x in prompts)):
            return {"ok": False, "error": "invalid_arguments"}
        self.suggested[f"{p['channel_id']}:{p['thread_ts']}"] = prompts
        return {"ok": True}

    def _m_assistant_threads_setTitle(self, p: dict) -> dict:
        if not p.get("title"):
            return {"ok": False, "error": "invalid_arguments"}
        self.titles[f"{p['channel_id']}:{p['thread_ts']}"] = p["title"]
        return {"ok": True}

    @staticmethod
    def _view_ok(view: dict, kind: str) -> bool:
        blocks = view.get("blocks") or []
        texts = [b.get("text", {}).get("text", "") for b in blocks if isinstance(b.get("text"), dict)]
        title = (view.get("title") or {}).get("text", "")
        return (view.get("type") == kind and 0 < len(blocks) <= 100 and all(len(t) <= 3000 for t in texts)
                and len(title) <= 24)

    def _m_views_open(self, p: dict) -> dict:
        view = p.get("view") if isinstance(p.get("view"), dict) else json.loads(p.get("view") or "{}")
        issued = self.triggers.pop(p.get("trigger_id") or "", None)
        if issued is None:
            return {"ok": False, "error": "invalid_trigger_id"}
        if time.monotonic() - issued > 3:
            return {"ok": False, "error": "expired_trigger_id"}
        if not self._view_ok(view, "modal"):
            return {"ok": False, "error": "invalid_arguments"}
        view_id = f"V{uuid.uuid4().hex[:8].upper()}"
        self.views[f"modal:{view_id}"] = {**view, "id": view_id}
        return {"ok": True, "view": {**view, "id": view_id}}

    def _m_views_publish(self, p: dict) -> dict:
        view = p.get("view") if isinstance(p.get("view"), dict) else json.loads(p.get("view") or "{}")
        if not p.get("user_id") or not self._view_ok(view, "home"):
            return {"ok": False, "error": "invalid_arguments"}
        self.views[p["user_id"]] = view
        return {"ok": True}

    def _stream_text(self, p: dict) -> str:
        text = p.get("markdown_text") or ""
        for chunk in p.get("chunks") or []:
            if chunk.get("type") == "markdown_text":
                text += chunk.get("text", "")
        return text

    def _m_chat_startStream(self, p: dict) -> dict:
        if p["channel"].startswith("C") and not (p.get("recipient_user_id") and p.get("recipient_team_id")):
            return {"ok": False, "error": "missing_recipient_user_id"}
        msg = self._bot_message(p["channel"], p.get("thread_ts"), markdown_text=self._stream_text(p), streaming=True)
        with self._lock:
            self.streams[msg["ts"]] = {"channel": p["channel"], "state": "streaming"}
        return {"ok": True, "channel": p["channel"], "ts": msg["ts"]}

    def _stream_msg(self, p: dict) -> dict | None:
        msg = self._find(p["channel"], p["ts"])
        stream = self.streams.get(p["ts"])
        if msg is None or stream is None or stream["state"] != "streaming":
            return None
        return msg

    def _m_chat_appendStream(self, p: dict) -> dict:
        if self.streams.get(p["ts"], {}).get("state") == "stopped_by_user":
            return {"ok": False, "error": "stopped_by_user"}
        msg = self._stream_msg(p)
        if msg is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        with self._lock:
            msg["markdown_text"] += self._stream_text(p)
        return {"ok": True, "channel": p["channel"], "ts": p["ts"]}

    def _m_chat_stopStream(self, p: dict) -> dict:
        msg = self._stream_msg(p)
        if msg is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        if not self._blocks_ok(p.get("blocks")):
            return {"ok": False, "error": "invalid_blocks"}
        with self._lock:
            msg["markdown_text"] += self._stream_text(p)
            msg["streaming"] = False
            if p.get("blocks"):
                msg["blocks"] = p["blocks"]
            if p.get("metadata"):
                msg["metadata"] = p["metadata"]
            self.streams[p["ts"]]["state"] = "stopped"
        return {"ok": True, "channel": p["channel"], "ts": p["ts"]}

    def expire_streams(self) -> None:
        """Make every open stream die, as Slack does after ~5 minutes (chat.update then works)."""
        with self._lock:
            for ts, stream in self.streams.items():
                if stream["state"] == "streaming":
                    stream["state"] = "expired"
                    msg = next(m for m in self.messages.get(stream["channel"], []) if m["ts"] == ts)
                    msg["streaming"] = False


# ── LiteLLM gateway ──────────────────────────────────────────────────────────────────────


@dataclass
class Script:
    """One scripted gateway response."""

    text: str = "The answer is 42."
    status: int = 200
    error_body: dict | None = None
    first_token_delay: float = 0.0
    chunk_delay: float = 0.0
    chunk_size: int = 8
    hang: float = 0.0  # seconds to wait before answering at all
    cut_after_chunks: int | None = None  # drop the connection mid-stream
    pause_after_chunks: int | None = None  # go quiet after this many chunks ...
    pause: float = 0.0  # ... for this long
    prompt_tokens: int = 100
    completion_tokens: int = 20
    release: threading.Event | None = None  # wait for this before the first token
    retry_after: str | None = None  # a retry-after header on an error (the proxy itself never sends one)
    error_after_chunks: int | None = None  # send an SSE error event after this many chunks ...
    error_event: dict | None = None  # ... with this "error" object (the proxy's mid-stream failure)


@dataclass
class GatewayRequest:
    body: dict
    headers: dict
    at: float = field(default_factory=time.monotonic)


GATEWAY_ALIASES = frozenset({"bedrock-claude-4.5-sonnet"})


def gateway_error(message: str, type_: str, code: int) -> dict:
    """An error body the way the LiteLLM proxy writes it."""
    return {"error": {"message": message, "type": type_, "param": None, "code": str(code)}}


# As LiteLLM 1.110.2 answers (see /api/v2 wire notes in tests/proxy/): 422 for a spent key budget.
BUDGET_EXCEEDED = gateway_error("Budget has been exceeded! Current cost: 10.2, Max budget: 10.0",
                                "budget_exceeded", 422)


class FakeGateway:
    """OpenAI-compatible ``/api/v2/chat/completions`` streaming SSE like the LiteLLM proxy.

    As strict as the proxy: a key other than ``keys`` answers 401, a model alias it does not
    serve answers 400; scripts add upstream errors, budgets, slow tokens and mid-stream error
    events (``Script.error_after_chunks``)."""

    def __init__(self, server: HTTPServer, keys: frozenset[str] | None = None) -> None:
        self.server = server
        self.keys = keys
        self._lock = threading.Lock()
        self.requests: list[GatewayRequest] = []
        self.scripts: list[Script] = []
        self.default: Callable[[dict], Script] = lambda body: Script()
        self.shutdown = threading.Event()
        server.expect_request("/api/v2/chat/completions", method="POST").respond_with_handler(self._handle)

    @property
    def base_url(self) -> str:
        return self.server.url_for("/api/v2")

    def script(self, *scripts: Script) -> None:
        with self._lock:
            self.scripts.extend(scripts)

    def _next(self, body: dict) -> Script:
        with self._lock:
            return self.scripts.pop(0) if self.scripts else self.default(body)

    def _handle(self, request: Request) -> Response:
        body = request.get_json()
        with self._lock:
            self.requests.append(GatewayRequest(body, {**request.headers,
                                                       "X-Client-Port": str(request.environ.get("REMOTE_PORT"))}))
        key = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if self.keys is not None and key not in self.keys:
            return Response(json.dumps(gateway_error("Authentication Error, Invalid API key provided.",
                                                     "token_not_found_in_db", 401)), status=401,
                            mimetype="application/json")
        if body.get("model") not in GATEWAY_ALIASES:
            return Response(json.dumps(gateway_error(f"Invalid model name passed in model={body.get('model')}.",
                                                     "invalid_request_error", 400)),
                            status=400, mimetype="application/json")
        s = self._next(body)
        if s.hang:
            self.shutdown.wait(s.hang)
        if s.status != 200:
            return Response(json.dumps(s.error_body or {"error": {"message": "scripted failure", "code": s.status}}),
                            status=s.status, mimetype="application/json",
                            headers={"retry-after": s.retry_after} if s.retry_after else {})
        if not body.get("stream"):
            return Response(json.dumps(_completion(body, s)), mimetype="application/json")
        return Response(self._sse(body, s), mimetype="text/event-stream")

    def _sse(self, body: dict, s: Script):
        if s.release is not None:
            s.release.wait(30)
        if s.first_token_delay:
            self.shutdown.wait(s.first_token_delay)
        pieces = [s.text[i:i + s.chunk_size] for i in range(0, len(s.text), s.chunk_size)] or [""]
        for n, piece in enumerate(pieces):
            if s.cut_after_chunks is not None and n >= s.cut_after_chunks:
                raise ConnectionAbortedError("scripted cut")  # werkzeug drops the connection
            if s.error_after_chunks is not None and n >= s.error_after_chunks:
                yield _sse_line({"error": s.error_event or gateway_error("upstream failed", "internal_server_error", 500)["error"]})
                yield "data: [DONE]\n\n"
                return
            if n and s.chunk_delay:
                self.shutdown.wait(s.chunk_delay)
            if s.pause_after_chunks is not None and n == s.pause_after_chunks:
                self.shutdown.wait(s.pause)
            delta = {"content": piece} if n else {"role": "assistant", "content": piece}
            yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": body.get("model"), "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body.get("model"), "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body.get("model"), "choices": [],
                         "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                                   "total_tokens": s.prompt_tokens + s.completion_tokens}})
        yield "data: [DONE]\n\n"


def _sse_line(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def _completion(body: dict, s: Script) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": s.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                      "total_tokens": s.prompt_tokens + s.completion_tokens}}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


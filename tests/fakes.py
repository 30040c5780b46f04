"""Local stand-ins for the three things ledger-bot talks to, speaking their real protocols.

- FakeSocketMode: a WebSocket server speaking Slack Socket Mode (hello, envelopes, acks,
  disconnect). slack_sdk's real SocketModeClient connects to it over plain ws://.
- FakeSlack: the Slack Web API (auth.test, apps.connections.open, conversations.replies,
  chat.*, assistant.threads.*, streaming, views.*, reactions.*), files.slack.com downloads and
  response URLs on pytest-httpserver, keeping the channel history so tests can assert on what a
  person would see in the thread. It refuses what Slack refuses, with Slack's error codes: Block
  Kit (through slack_sdk's models plus the documented limits they leave out), required
  arguments, text limits, scopes, channel membership (see FakeSlack).
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
    "reactions.add": 50, "reactions.remove": 20,  # Tier 3 and Tier 2 (docs.slack.dev/reference/methods/reactions.*)
}
REVOKED_ERRORS = {"apps.connections.open": "invalid_auth"}

MANIFEST = __import__("pathlib").Path(__file__).resolve().parent.parent / "slack-app-manifest.yaml"


def manifest_bot_scopes(path: Any = MANIFEST) -> list[str]:
    """The bot scopes an app manifest requests (``oauth_config.scopes.bot``), in its order."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return list(yaml.safe_load(f)["oauth_config"]["scopes"]["bot"])


# The bot-token scopes each method needs (docs.slack.dev/reference/methods/<method>, "Scopes"); any
# one of them will do, the first is the one Slack names in ``needed``. conversations.replies needs
# the history scope of the conversation's type (HISTORY_SCOPES). views.* and auth.test need none.
METHOD_SCOPES: dict[str, tuple[str, ...]] = {
    "chat.postMessage": ("chat:write",), "chat.update": ("chat:write",), "chat.postEphemeral": ("chat:write",),
    "chat.startStream": ("chat:write",), "chat.appendStream": ("chat:write",), "chat.stopStream": ("chat:write",),
    "assistant.threads.setStatus": ("chat:write",),
    "assistant.threads.setSuggestedPrompts": ("assistant:write",), "assistant.threads.setTitle": ("assistant:write",),
    "reactions.add": ("reactions:write",), "reactions.remove": ("reactions:write",),
}
HISTORY_SCOPES = {"channel": "channels:history", "group": "groups:history", "im": "im:history",
                  "mpim": "mpim:history"}
CHANNEL_TYPES = {"channel": "channel", "public": "channel", "public_channel": "channel",
                 "group": "group", "private": "group", "private_channel": "group",
                 "im": "im", "dm": "im", "mpim": "mpim"}

# Each method's required arguments (the method reference's "Required arguments"). Slack answers an
# ABSENT required argument invalid_arguments, one present but empty or naming nothing with the
# resolution error (channel_not_found, thread_not_found, ...).
REQUIRED_ARGS: dict[str, tuple[str, ...]] = {
    "chat.postMessage": ("channel",), "chat.update": ("channel", "ts"), "chat.postEphemeral": ("channel", "user"),
    "chat.startStream": ("channel", "thread_ts"), "chat.appendStream": ("channel", "ts"),
    "chat.stopStream": ("channel", "ts"),
    "assistant.threads.setStatus": ("channel_id", "thread_ts", "status"),
    "assistant.threads.setSuggestedPrompts": ("channel_id", "prompts"),
    "assistant.threads.setTitle": ("channel_id", "thread_ts", "title"),
    "views.open": ("view",), "views.publish": ("user_id", "view"),
    "reactions.add": ("channel", "timestamp", "name"), "reactions.remove": ("name",),
    "conversations.replies": ("channel", "ts"),
}

# Documented limits (docs.slack.dev): Block Kit reference and the chat.* method references.
MESSAGE_TEXT_LIMIT = 40_000  # chat.* `text`
MARKDOWN_TEXT_LIMIT = 12_000  # `markdown_text`, a markdown block, and all markdown blocks of a message
MESSAGE_BLOCKS_LIMIT = 50
VIEW_BLOCKS_LIMIT = 100
VIEW_BYTES_LIMIT = 250 * 1024  # views.open / views.publish: view_too_large "greater than 250kb"
TEXT_OBJECT_LIMIT = 3_000
LOADING_MESSAGES_LIMIT, LOADING_MESSAGE_CHARS = 10, 50
# Task chunks of a stream (docs.slack.dev "chunks": task_update): a title and status, details and
# output "limited to 256 characters"; sources are url source elements; a plan's task ids unique.
TASK_STATUSES = frozenset({"pending", "in_progress", "complete", "error"})
TASK_TEXT_LIMIT = 256
TASK_DISPLAY_MODES = frozenset({"timeline", "plan"})
SUGGESTED_PROMPTS_LIMIT = 4
RESPONSE_URL_USES, RESPONSE_URL_SECONDS = 5, 30 * 60
TRIGGER_SECONDS = 3.0


class SlackRefusal(Exception):
    """An ``ok: false`` answer, shaped as Slack shapes it (``errors`` and ``response_metadata``
    messages for Block Kit and argument validation)."""

    def __init__(self, error: str, *messages: str, errors_list: bool = False, **extra: Any) -> None:
        super().__init__(error)
        self.body: dict[str, Any] = {"ok": False, "error": error, **extra}
        if messages:
            if errors_list:
                self.body["errors"] = list(messages)
            self.body["response_metadata"] = {"messages": [f"[ERROR] {m}" for m in messages]}


def _model_types(base: type) -> frozenset[str]:
    """The ``type`` of every slack_sdk model class under ``base`` (Block, BlockElement)."""
    found, todo = set(), [base]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if isinstance(cls.__dict__.get("type"), str):
            found.add(cls.__dict__["type"])
    return frozenset(found)


def _block_types() -> frozenset[str]:
    from slack_sdk.models.blocks import Block

    return _model_types(Block)


_TEXT_OBJECTS = ("plain_text", "mrkdwn")


def _text_object_problems(node: Any, ptr: str, out: list[str]) -> None:
    """Every text object anywhere in ``node``: ``text`` required, 1 to 3,000 characters
    (Block Kit reference, composition objects: text object)."""
    if isinstance(node, dict):
        if node.get("type") in _TEXT_OBJECTS:
            text = node.get("text")
            if not isinstance(text, str):
                out.append(f"missing required field: text [json-pointer:{ptr}]")
            elif not text:
                out.append(f"must be at least 1 characters [json-pointer:{ptr}/text]")
            elif len(text) > TEXT_OBJECT_LIMIT:
                out.append(f"must be less than {TEXT_OBJECT_LIMIT + 1} characters [json-pointer:{ptr}/text]")
        for key, value in node.items():
            _text_object_problems(value, f"{ptr}/{key}", out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _text_object_problems(value, f"{ptr}/{i}", out)


def _plain_text(obj: Any, ptr: str, limit: int, out: list[str]) -> None:
    if not isinstance(obj, dict) or obj.get("type") != "plain_text":
        out.append(f"must be a plain_text text object [json-pointer:{ptr}]")
    elif isinstance(obj.get("text"), str) and len(obj["text"]) > limit:
        out.append(f"must be less than {limit + 1} characters [json-pointer:{ptr}/text]")


def _elements(block: dict, ptr: str, allowed: tuple[str, ...], limit: int, out: list[str]) -> list[dict]:
    elements = block.get("elements")
    if not isinstance(elements, list) or not elements:
        out.append(f"missing required field: elements [json-pointer:{ptr}]")
        return []
    if len(elements) > limit:
        out.append(f"no more than {limit} items allowed [json-pointer:{ptr}/elements]")
    for i, element in enumerate(elements):
        if not isinstance(element, dict) or element.get("type") not in allowed:
            out.append(f"unsupported element type [json-pointer:{ptr}/elements/{i}]")
    return [e for e in elements if isinstance(e, dict)]


def _feedback_buttons(element: dict, ptr: str, out: list[str]) -> None:
    """The feedback_buttons element (docs.slack.dev/reference/block-kit/block-elements/
    feedback-buttons-element): both buttons required; each a plain_text ``text`` of at most 75
    characters, a ``value`` of at most 2,000 and an optional ``accessibility_label`` of 75."""
    if "action_id" in element and not (isinstance(element["action_id"], str) and len(element["action_id"]) <= 255):
        out.append(f"must be a string of at most 255 characters [json-pointer:{ptr}/action_id]")
    for side in ("positive_button", "negative_button"):
        button = element.get(side)
        if not isinstance(button, dict):
            out.append(f"missing required field: {side} [json-pointer:{ptr}]")
            continue
        _plain_text(button.get("text"), f"{ptr}/{side}/text", 75, out)
        value = button.get("value")
        if not isinstance(value, str) or not value:
            out.append(f"missing required field: value [json-pointer:{ptr}/{side}]")
        elif len(value) > 2000:
            out.append(f"must be less than 2001 characters [json-pointer:{ptr}/{side}/value]")
        label = button.get("accessibility_label")
        if label is not None and not (isinstance(label, str) and len(label) <= 75):
            out.append(f"must be less than 76 characters [json-pointer:{ptr}/{side}/accessibility_label]")


def _block_problems(block: Any, ptr: str) -> list[str]:
    """One block against the Block Kit reference: by hand for what slack_sdk's models leave out
    (text objects' 3,000 characters, the markdown block, context_actions and feedback_buttons,
    header and context limits), then through slack_sdk's own model (``Block.parse`` and
    ``to_dict``, which runs every validator of the block and its elements)."""
    from slack_sdk.errors import SlackObjectFormationError
    from slack_sdk.models.blocks import Block

    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return [f"missing required field: type [json-pointer:{ptr}]"]
    kind = block["type"]
    if kind not in BLOCK_TYPES:
        return [f"unsupported type: {kind} [json-pointer:{ptr}/type]"]
    out: list[str] = []
    block_id = block.get("block_id")
    if block_id is not None and not (isinstance(block_id, str) and 0 < len(block_id) <= 255):
        out.append(f"must be a string of 1 to 255 characters [json-pointer:{ptr}/block_id]")
    _text_object_problems(block, ptr, out)
    if kind == "markdown":  # docs.slack.dev/reference/block-kit/blocks/markdown-block
        text = block.get("text")
        if not isinstance(text, str) or not text:
            out.append(f"missing required field: text [json-pointer:{ptr}]")
        elif len(text) > MARKDOWN_TEXT_LIMIT:
            out.append(f"must be less than {MARKDOWN_TEXT_LIMIT + 1} characters [json-pointer:{ptr}/text]")
    elif kind == "header":  # plain_text, at most 150 characters
        _plain_text(block.get("text"), f"{ptr}/text", 150, out)
    elif kind == "section":  # text (3,000) or up to 10 fields (2,000 each)
        fields = block.get("fields")
        if block.get("text") is None and not fields:
            out.append(f"must provide text or fields [json-pointer:{ptr}]")
        if fields is not None:
            if not isinstance(fields, list) or len(fields) > 10:
                out.append(f"no more than 10 items allowed [json-pointer:{ptr}/fields]")
            else:
                for i, f in enumerate(fields):
                    if isinstance(f, dict) and isinstance(f.get("text"), str) and len(f["text"]) > 2000:
                        out.append(f"must be less than 2001 characters [json-pointer:{ptr}/fields/{i}/text]")
    elif kind == "context":  # image elements and text objects, at most 10
        _elements(block, ptr, ("image", "plain_text", "mrkdwn"), 10, out)
    elif kind == "context_actions":  # feedback_buttons and icon_button elements, at most 5
        for i, element in enumerate(_elements(block, ptr, ("feedback_buttons", "icon_button"), 5, out)):
            if element.get("type") == "feedback_buttons":
                _feedback_buttons(element, f"{ptr}/elements/{i}", out)
    elif kind == "actions":
        _elements(block, ptr, tuple(_element_types()), 25, out)
    if out:
        return out
    try:
        model = Block.parse(json.loads(json.dumps(block)))
        if model is None:
            return [f"unsupported type: {kind} [json-pointer:{ptr}/type]"]
        model.validate_json()
        model.to_dict()
    except (SlackObjectFormationError, TypeError, ValueError, KeyError, AttributeError) as e:
        return [f"{e} [json-pointer:{ptr}]"]
    return []


def _element_types() -> frozenset[str]:
    from slack_sdk.models.blocks import BlockElement

    return _model_types(BlockElement)


BLOCK_TYPES = _block_types()


def check_blocks(blocks: Any, *, limit: int = MESSAGE_BLOCKS_LIMIT, where: str = "/blocks",
                 previous: list | None = None, too_many: str = "invalid_blocks",
                 markdown_budget: bool = True) -> None:
    """Raise SlackRefusal the way Slack refuses a message's (or a view's) blocks:
    ``invalid_blocks_format`` (not an array), ``invalid_blocks`` (or ``too_many``) over ``limit``
    blocks, ``msg_blocks_too_long`` when the markdown blocks add up to more than 12,000
    characters (the markdown block reference's cumulative limit; what Slack answers, see
    slackapi/bolt-js#2509), ``invalid_blocks`` for a block Block Kit refuses or a ``block_id`` used
    twice in the message or already used by the version being updated."""
    if not isinstance(blocks, list):
        raise SlackRefusal("invalid_blocks_format", f"must be an array [json-pointer:{where}]", errors_list=True)
    if len(blocks) > limit:
        raise SlackRefusal(too_many, f"no more than {limit} items allowed [json-pointer:{where}]", errors_list=True)
    markdown = sum(len(b["text"]) for b in blocks
                   if isinstance(b, dict) and b.get("type") == "markdown" and isinstance(b.get("text"), str))
    if markdown_budget and markdown > MARKDOWN_TEXT_LIMIT:
        raise SlackRefusal("msg_blocks_too_long")
    problems = [p for i, b in enumerate(blocks) for p in _block_problems(b, f"{where}/{i}")]
    if problems:
        raise SlackRefusal("invalid_blocks", *problems, errors_list=True)
    # block_id: unique per message and per update (markdown blocks' block_id is ignored, not kept).
    ids = [b.get("block_id") for b in blocks if b.get("block_id") and b["type"] != "markdown"]
    old = {b.get("block_id") for b in previous or [] if isinstance(b, dict) and b.get("block_id")}
    repeated = sorted({i for i in ids if ids.count(i) > 1} | (set(ids) & old))
    if repeated:
        raise SlackRefusal("invalid_blocks", *(f"duplicate block_id: {i} [json-pointer:{where}]" for i in repeated),
                           errors_list=True)


def check_view(view: Any, kind: str) -> dict:
    """A view payload (docs.slack.dev/reference/views) as views.open / views.publish take it:
    ``view_too_large`` past 250 KB of JSON, else ``invalid_arguments`` for anything Block Kit or
    slack_sdk's View model refuses (type, title of 1 to 24 characters, 1 to 100 blocks, ...)."""
    from slack_sdk.errors import SlackObjectFormationError
    from slack_sdk.models.views import View

    if isinstance(view, str):
        try:
            view = json.loads(view)
        except ValueError:
            raise SlackRefusal("invalid_arguments", "invalid json [json-pointer:/view]") from None
    if not isinstance(view, dict):
        raise SlackRefusal("invalid_arguments", "must be an object [json-pointer:/view]")
    if len(json.dumps(view, separators=(",", ":"), ensure_ascii=False).encode()) > VIEW_BYTES_LIMIT:
        raise SlackRefusal("view_too_large")
    if view.get("type") != kind:
        raise SlackRefusal("invalid_arguments", f"must be {kind} [json-pointer:/view/type]")
    if kind == "modal" and "title" not in view:
        raise SlackRefusal("invalid_arguments", "missing required field: title [json-pointer:/view]")
    if not view.get("blocks"):
        raise SlackRefusal("invalid_arguments", "missing required field: blocks [json-pointer:/view]")
    problems: list[str] = []
    for key, limit in (("title", 24), ("submit", 24), ("close", 24)):
        if key in view:
            _plain_text(view[key], f"/view/{key}", limit, problems)
            _text_object_problems(view[key], f"/view/{key}", problems)
    if problems:
        raise SlackRefusal("invalid_arguments", *problems)
    try:
        check_blocks(view["blocks"], limit=VIEW_BLOCKS_LIMIT, where="/view/blocks", markdown_budget=False)
    except SlackRefusal as e:
        messages = e.body.get("response_metadata", {}).get("messages") or [e.body["error"]]
        raise SlackRefusal("invalid_arguments", *(m.removeprefix("[ERROR] ") for m in messages)) from None
    try:
        View(**view).validate_json()
    except (SlackObjectFormationError, TypeError, ValueError) as e:
        raise SlackRefusal("invalid_arguments", f"{e} [json-pointer:/view]") from None
    return view


@dataclass
class FileScript:
    """How the fake files.slack.com serves one file."""

    content_type: str
    data: bytes
    redirect_to: str | None = None  # answer 302 to this URL instead of the bytes
    trickle: float | None = None  # serve one byte at a time, this many seconds apart


def _check_task(chunk: dict) -> dict:
    """A task_update chunk as Slack takes it (invalid_chunks otherwise): an ``id``, a ``title``
    and a ``status`` of TASK_STATUSES; ``details`` and ``output`` strings of at most 256
    characters; ``sources`` url source elements (``type`` url, ``url``, ``text``)."""
    ok = (isinstance(chunk.get("id"), str) and chunk["id"]
          and isinstance(chunk.get("title"), str) and 0 < len(chunk["title"]) <= TASK_TEXT_LIMIT
          and chunk.get("status") in TASK_STATUSES
          and all(isinstance(chunk.get(k, ""), str) and len(chunk.get(k, "")) <= TASK_TEXT_LIMIT
                  for k in ("details", "output")))
    sources = chunk.get("sources", [])
    ok = ok and isinstance(sources, list) and all(
        isinstance(s, dict) and s.get("type") == "url" and isinstance(s.get("url"), str)
        and re.match(r"^https?://\S+$", s["url"]) and isinstance(s.get("text"), str) and s["text"]
        for s in sources)
    if not ok:
        raise SlackRefusal("invalid_chunks")
    return chunk


class FakeSlack:
    """The Slack Web API with just enough state: channels hold messages, threads are real.

    As strict as Slack where the bot could get it wrong, by the method reference and the Block Kit
    reference (docs.slack.dev): per-method rate tiers (429 with Retry-After; ``chat.postMessage``
    about one per second per channel); required arguments (``invalid_arguments``); every
    ``blocks`` and ``view`` through Block Kit's rules and slack_sdk's models (``check_blocks``,
    ``check_view``); text and markdown limits (``msg_too_long``, ``msg_blocks_too_long``,
    ``no_text``); the bot's scopes, those of the app manifest unless ``scopes`` says otherwise
    (``missing_scope`` with ``needed`` and ``provided``); conversation types (``add_channel``) and
    the bot's membership (``remove_bot``: ``not_in_channel``); ``chat.update`` on a message still
    streaming (``streaming_state_conflict``), the Stop button (``press_stop``: ``stopped_by_user``
    from then on), block_ids unique per message and per update, triggers valid 3 s and once,
    response URLs (5 uses in 30 minutes), reactions, a token revoked mid-run (``revoke``).

    ``fail(method, error=..., status=..., times=n)`` scripts failures; ``calls`` records every
    request; ``rate_limited`` every call answered 429. ``thread(channel, ts)`` shows the thread
    the way Slack would render it.
    """

    def __init__(self, server: HTTPServer, socket: FakeSocketMode, *, scopes: list[str] | None = None) -> None:
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
        self.used_triggers: set[str] = set()
        self.views: dict[str, dict] = {}  # user -> published Home view; "modal:<id>" -> opened modals
        self.suggested: dict[str, list[dict]] = {}  # "channel:thread_ts" -> prompts
        self.titles: dict[str, str] = {}
        self.statuses: dict[str, dict] = {}  # "channel:thread_ts" -> the last status set
        self.files: dict[str, FileScript] = {}  # file id -> how it is served
        # The bot's scopes: exactly the manifest's bot scopes unless a test chooses others.
        self.scopes: list[str] = list(manifest_bot_scopes() if scopes is None else scopes)
        self.channels: dict[str, dict] = {}  # id -> {"type", "bot_member", "members"} (add_channel)
        self.known_emoji: set[str] | None = None  # None: any well-formed emoji name exists
        self.responses: list[dict] = []  # every payload a response_url accepted
        self.response_urls: dict[str, dict] = {}  # url -> {"issued", "uses"}
        server.expect_request(re.compile(r"^/files/[\w.-]+/[^/]+$")).respond_with_handler(self._file)
        server.expect_request(re.compile(r"^/response/[\w-]+$")).respond_with_handler(self._response_url)
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
        """A trigger_id as an interaction payload carries it ("12345.98765.abcd2358fdea")."""
        trigger = f"{next(self._clock)}.{next(self._clock)}.{uuid.uuid4().hex[:12]}"
        self.triggers[trigger] = time.monotonic()
        return trigger

    def new_response_url(self) -> str:
        """A response_url as a shortcut or block_actions payload carries it: POST JSON to it (up
        to 5 times within 30 minutes); what it accepts lands in ``responses``."""
        url = self.server.url_for(f"/response/{uuid.uuid4().hex}")
        with self._lock:
            self.response_urls[url] = {"issued": time.monotonic(), "uses": 0}
        return url

    def add_channel(self, channel: str, *, type: str | None = None, bot_member: bool = True,
                    members: list[str] | None = None) -> None:
        """Register a conversation: its type (``channel`` public, ``group`` private, ``im``,
        ``mpim``; by default from the id: C public, G private, D im), whether the bot is in it,
        and optionally who else is (then chat.postEphemeral to anyone else: user_not_in_channel)."""
        kind = CHANNEL_TYPES[type] if type else self._type_from_id(channel)
        with self._lock:
            self.channels[channel] = {"type": kind, "bot_member": bot_member or kind == "im",
                                      "members": set(members) if members is not None else None}

    def remove_bot(self, channel: str) -> None:
        """The bot leaves (or is removed from) ``channel``; never a DM."""
        self._channel(channel)["bot_member"] = self._channel(channel)["type"] == "im"

    def add_bot(self, channel: str) -> None:
        self._channel(channel)["bot_member"] = True

    def add_file(self, name: str, content_type: str, data: bytes, *, redirect_to: str | None = None,
                 trickle: float | None = None) -> dict:
        """A file a person uploads; returns the file object Slack puts in the message event.
        ``content_type`` is what Slack declares (and serves), independent of what ``data`` is;
        ``redirect_to`` answers the download with a 302 there; ``trickle`` serves the bytes one at
        a time, that many seconds apart."""
        file_id = f"F{uuid.uuid4().hex[:8].upper()}"
        self.files[file_id] = FileScript(content_type, data, redirect_to, trickle)
        url = self.server.url_for(f"/files/{file_id}/{name}")
        return {"id": file_id, "name": name, "title": name, "mimetype": content_type, "filetype": name.rsplit(".")[-1],
                "size": len(data), "url_private": url, "url_private_download": url + "?download=1"}

    def _file(self, request: Request) -> Response:
        """files.slack.com: the bytes with a valid bot token holding files:read, else Slack's
        login page (HTML)."""
        file_id = request.path.split("/")[2]
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        with self._lock:
            self.calls.append(Call("files.download", {"file": file_id}, token))
        script = self.files.get(file_id)
        if (not token.startswith("xoxb-") or self.revoked or script is None
                or "files:read" not in self.scopes):
            return Response("<!DOCTYPE html><html><body>Sign in to Slack</body></html>", mimetype="text/html")
        if script.redirect_to:
            return Response("", status=302, headers={"Location": script.redirect_to})
        if script.trickle:
            data, pause = script.data, script.trickle

            def trickle():
                for i in range(len(data)):
                    if i:
                        time.sleep(pause)  # the fake's own slowness, byte by byte
                    yield data[i:i + 1]

            return Response(trickle(), mimetype=script.content_type, direct_passthrough=True,
                            headers={"Content-Length": str(len(data))})
        return Response(script.data, mimetype=script.content_type)

    def _response_url(self, request: Request) -> Response:
        """A response_url (docs.slack.dev/interactivity/handling-user-interaction): JSON with
        ``text`` and/or ``blocks``, ``response_type`` in_channel or ephemeral, ``replace_original``,
        ``delete_original``, ``thread_ts``...; usable 5 times within 30 minutes. Errors answer like
        Slack's incoming webhooks: a status and a plain-text code."""

        def answer(status: int, body: str) -> Response:
            return Response(body, status=status, mimetype="text/plain")

        url = self.server.url_for(request.path)
        with self._lock:
            self.calls.append(Call("response_url", {"url": url}, ""))
            record = self.response_urls.get(url)
        if request.method != "POST":
            return answer(405, "invalid_method")
        if record is None:
            return answer(404, "invalid_url")
        if time.monotonic() - record["issued"] > RESPONSE_URL_SECONDS:
            return answer(404, "expired_url")
        if record["uses"] >= RESPONSE_URL_USES:
            return answer(404, "used_url")
        try:
            payload = json.loads(request.get_data(as_text=True) or "null")
        except ValueError:
            return answer(400, "invalid_payload")
        if not isinstance(payload, dict) or payload.get("response_type") not in (None, "in_channel", "ephemeral"):
            return answer(400, "invalid_payload")
        if not payload.get("delete_original"):
            if not (isinstance(payload.get("text"), str) and payload["text"].strip()) and not payload.get("blocks"):
                return answer(400, "invalid_payload")
            if payload.get("blocks") is not None:
                try:
                    check_blocks(payload["blocks"])
                except SlackRefusal as e:
                    return answer(400, e.body["error"])
        with self._lock:
            record["uses"] += 1
            self.responses.append(payload)
        return answer(200, "ok")

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

    # conversations -----------------------------------------------------------------------

    @staticmethod
    def _type_from_id(channel: str) -> str:
        return {"G": "group", "D": "im"}.get(channel[:1], "channel")

    def _channel(self, channel: str) -> dict:
        with self._lock:
            if channel not in self.channels:
                self.add_channel(channel)
            return self.channels[channel]

    def _not_in(self, channel: str) -> None:
        """The bot is not in ``channel``: Slack says not_in_channel for a public channel and
        does not admit a private one exists (channel_not_found)."""
        info = self._channel(channel)
        if not info["bot_member"]:
            raise SlackRefusal("not_in_channel" if info["type"] == "channel" else "channel_not_found")

    def _needed_scope(self, method: str, params: dict) -> str | None:
        if method == "conversations.replies" and params.get("channel"):
            needed: tuple[str, ...] = (HISTORY_SCOPES[self._channel(str(params["channel"]))["type"]],)
        else:
            needed = METHOD_SCOPES.get(method, ())
        if needed and not set(needed) & set(self.scopes):
            return needed[0]
        return None

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
        """What a person sees: a markdown block's text, else the markdown_text, else text (a
        streamed message keeps what was streamed in ``text``, as Slack does)."""
        for block in msg.get("blocks") or []:
            if block.get("type") == "markdown":
                return block["text"]
        return msg.get("markdown_text") or msg.get("text") or ""

    def reply_texts(self, channel: str, thread_ts: str) -> list[str]:
        return [self.shown_text(m) for m in self.bot_replies(channel, thread_ts)]

    # dispatch ----------------------------------------------------------------------------

    _JSON_FIELDS = {"blocks": "invalid_blocks_format", "metadata": "invalid_metadata_format",
                    "chunks": "invalid_chunks", "view": "invalid_arguments", "prompts": "invalid_arguments",
                    "loading_messages": "invalid_arguments"}

    def _dispatch(self, request: Request) -> Response:
        method = request.path.rsplit("/", 1)[-1]
        params: dict[str, Any] = dict(request.args)
        bad_json: str | None = None
        if request.mimetype == "application/json":
            body = request.get_json(silent=True)
            params.update(body if isinstance(body, dict) else {})
        else:
            params.update(request.form.to_dict())
        for key, error in self._JSON_FIELDS.items():
            if isinstance(params.get(key), str):
                try:
                    params[key] = json.loads(params[key])
                except ValueError:
                    bad_json = bad_json or error
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
        try:
            if bad_json:
                raise SlackRefusal(bad_json)
            needed = self._needed_scope(method, params)
            if needed:
                raise SlackRefusal("missing_scope", needed=needed, provided=",".join(self.scopes))
            absent = [a for a in REQUIRED_ARGS.get(method, ()) if params.get(a) is None]
            if absent:
                raise SlackRefusal("invalid_arguments", *(f"missing required field: {a}" for a in absent))
            return self._json(handler(params))
        except SlackRefusal as e:
            return self._json(e.body)

    @staticmethod
    def _json(body: dict) -> Response:
        return Response(json.dumps(body), mimetype="application/json")

    def _m_auth_test(self, p: dict) -> dict:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "ledger-bot",
                "team_id": TEAM, "user_id": BOT_USER, "bot_id": BOT_ID}

    def _m_apps_connections_open(self, p: dict) -> dict:
        return {"ok": True, "url": self.socket.url}

    @staticmethod
    def _public(msg: dict) -> dict:
        """A message as the Web API returns it (without the fake's own bookkeeping)."""
        return {k: v for k, v in msg.items() if k != "streaming"}

    def _m_conversations_replies(self, p: dict) -> dict:
        channel = str(p["channel"])
        info = self._channel(channel)
        if not channel or (not info["bot_member"] and info["type"] != "channel"):
            # conversations.replies documents no not_in_channel: a public channel's history is
            # readable with channels:history; a private one the bot is not in does not exist for it.
            return {"ok": False, "error": "channel_not_found"}
        msgs = self.thread(channel, str(p["ts"]))
        if not msgs:
            return {"ok": False, "error": "thread_not_found"}
        limit = int(p.get("limit") or 1000)
        start = int(p.get("cursor") or 0)
        page = msgs[start:start + limit]
        more = start + limit < len(msgs)
        out = [self._public(m) for m in page]
        if p.get("include_all_metadata") in (None, "", "0", "false", "False", False, 0):
            for m in out:
                m.pop("metadata", None)
        return {"ok": True, "messages": out, "has_more": more,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}

    # posting -----------------------------------------------------------------------------

    @staticmethod
    def _check_metadata(metadata: Any) -> None:
        """Message metadata: an object with a string ``event_type`` and an object ``event_payload``."""
        if metadata is None:
            return
        if not (isinstance(metadata, dict) and isinstance(metadata.get("event_type"), str)
                and isinstance(metadata.get("event_payload"), dict)):
            raise SlackRefusal("invalid_metadata_format")

    def _check_message(self, p: dict, previous: list | None = None) -> None:
        """What chat.postMessage, chat.update and chat.postEphemeral refuse in a message."""
        text, blocks, markdown = p.get("text"), p.get("blocks"), p.get("markdown_text")
        if markdown is not None and (text is not None or blocks is not None):
            raise SlackRefusal("markdown_text_conflict")
        if not (text or blocks or markdown or p.get("attachments")):
            raise SlackRefusal("no_text")
        if isinstance(text, str) and len(text) > MESSAGE_TEXT_LIMIT:
            raise SlackRefusal("msg_too_long")
        if isinstance(markdown, str) and len(markdown) > MARKDOWN_TEXT_LIMIT:
            raise SlackRefusal("msg_too_long")
        if blocks is not None:
            check_blocks(blocks, previous=previous)

    @staticmethod
    def _kept_blocks(blocks: list | None) -> list | None:
        """Blocks as Slack keeps them: a markdown block's block_id is ignored, not retained."""
        if blocks is None:
            return None
        return [{k: v for k, v in b.items() if not (b.get("type") == "markdown" and k == "block_id")}
                for b in blocks]

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
        channel = str(p["channel"])
        if not channel:
            raise SlackRefusal("channel_not_found")
        self._not_in(channel)
        self._check_message(p)
        self._check_metadata(p.get("metadata"))
        msg = self._bot_message(channel, p.get("thread_ts"), text=p.get("text"),
                                blocks=self._kept_blocks(p.get("blocks")),
                                markdown_text=p.get("markdown_text"), metadata=p.get("metadata"))
        return {"ok": True, "channel": channel, "ts": msg["ts"], "message": self._public(msg)}

    def _m_chat_update(self, p: dict) -> dict:
        msg = self._find(str(p["channel"]), str(p["ts"]))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if msg.get("bot_id") != BOT_ID:
            return {"ok": False, "error": "cant_update_message"}
        if msg.get("streaming"):
            return {"ok": False, "error": "streaming_state_conflict"}
        self._check_message(p, previous=msg.get("blocks"))
        self._check_metadata(p.get("metadata"))
        with self._lock:
            for key in ("text", "blocks", "markdown_text", "metadata"):
                if key in p:
                    msg[key] = self._kept_blocks(p[key]) if key == "blocks" else p[key]
            if "blocks" in p and "markdown_text" not in p:
                msg.pop("markdown_text", None)
            msg["edited"] = True
            msg["streaming"] = False  # updating a (dead) stream's message finalizes it
        return {"ok": True, "channel": p["channel"], "ts": p["ts"], "text": msg.get("text", ""),
                "message": self._public(msg)}

    def _m_chat_postEphemeral(self, p: dict) -> dict:
        channel, user = str(p["channel"]), str(p["user"])
        if not channel:
            raise SlackRefusal("channel_not_found")
        self._not_in(channel)
        members = self._channel(channel)["members"]
        if not user or (members is not None and user not in members):
            raise SlackRefusal("user_not_in_channel")
        self._check_message(p)
        with self._lock:
            self.messages.setdefault("ephemeral:" + channel, []).append(
                {"user_only": user, "text": p.get("text"), "blocks": p.get("blocks"), "ts": self.new_ts(),
                 "thread_ts": p.get("thread_ts")})
        return {"ok": True, "message_ts": self.new_ts()}

    # the assistant pane ------------------------------------------------------------------

    def _m_assistant_threads_setStatus(self, p: dict) -> dict:
        """``status`` required (an empty string clears it); ``loading_messages`` 1 to 10 strings
        of 1 to 50 characters (docs.slack.dev/reference/methods/assistant.threads.setStatus)."""
        if not self.status_supported:
            return {"ok": False, "error": "not_allowed_token_type"}
        if not isinstance(p["status"], str):
            raise SlackRefusal("invalid_arguments", "must be a string [json-pointer:/status]")
        loading = p.get("loading_messages")
        if loading is not None:
            if not isinstance(loading, list) or not 0 < len(loading) <= LOADING_MESSAGES_LIMIT:
                raise SlackRefusal("invalid_arguments",
                                   f"must have 1 to {LOADING_MESSAGES_LIMIT} items [json-pointer:/loading_messages]")
            for i, m in enumerate(loading):
                if not (isinstance(m, str) and 0 < len(m) <= LOADING_MESSAGE_CHARS):
                    raise SlackRefusal("invalid_arguments", f"must be 1 to {LOADING_MESSAGE_CHARS} characters "
                                                            f"[json-pointer:/loading_messages/{i}]")
        if not p["channel_id"]:
            raise SlackRefusal("channel_not_found")
        if not p["thread_ts"]:
            raise SlackRefusal("invalid_thread_ts")
        with self._lock:
            key = f"{p['channel_id']}:{p['thread_ts']}"
            if p["status"]:
                self.statuses[key] = {"status": p["status"], "loading_messages": loading}
            else:
                self.statuses.pop(key, None)
        return {"ok": True}

    def _m_assistant_threads_setSuggestedPrompts(self, p: dict) -> dict:
        prompts = p.get("prompts") or []
        if not (isinstance(prompts, list) and 0 < len(prompts) <= SUGGESTED_PROMPTS_LIMIT
                and all(isinstance(x, dict) and x.get("title") and x.get("message") for x in prompts)):
            return {"ok": False, "error": "invalid_arguments"}
        self.suggested[f"{p['channel_id']}:{p.get('thread_ts')}"] = prompts
        return {"ok": True}

    def _m_assistant_threads_setTitle(self, p: dict) -> dict:
        if not p.get("title"):
            return {"ok": False, "error": "invalid_arguments"}
        self.titles[f"{p['channel_id']}:{p['thread_ts']}"] = p["title"]
        return {"ok": True}

    # views -------------------------------------------------------------------------------

    def _m_views_open(self, p: dict) -> dict:
        trigger = p.get("trigger_id") or p.get("interactivity_pointer")
        if trigger is None:
            raise SlackRefusal("invalid_arguments", "missing required field: trigger_id")
        view = check_view(p["view"], "modal")
        with self._lock:
            issued = self.triggers.pop(str(trigger), None)
            if issued is None:
                error = "exchanged_trigger_id" if trigger in self.used_triggers else "invalid_trigger_id"
                return {"ok": False, "error": error}
            self.used_triggers.add(str(trigger))
        if time.monotonic() - issued > TRIGGER_SECONDS:
            return {"ok": False, "error": "expired_trigger_id"}
        view_id = f"V{uuid.uuid4().hex[:8].upper()}"
        self.views[f"modal:{view_id}"] = {**view, "id": view_id}
        return {"ok": True, "view": {**view, "id": view_id}}

    def _m_views_publish(self, p: dict) -> dict:
        if not p["user_id"]:
            raise SlackRefusal("invalid_arguments", "invalid `user_id`")
        view = check_view(p["view"], "home")
        self.views[p["user_id"]] = view
        return {"ok": True, "view": {**view, "id": f"V{uuid.uuid4().hex[:8].upper()}"}}

    # streaming ---------------------------------------------------------------------------

    @staticmethod
    def _stream_content(p: dict) -> tuple[str, list[dict], str | None]:
        """What a stream call carries: its text (``markdown_text``, at most 12,000 characters:
        msg_too_long; or the text of its markdown_text chunks), its task_update chunks, and its
        mode ("markdown_text", "chunks", or None when it carries neither). Both at once:
        cannot_provide_both_markdown_text_and_chunks; a malformed chunk: invalid_chunks."""
        text = p.get("markdown_text") or ""
        if not isinstance(text, str):
            raise SlackRefusal("invalid_arguments", "must be a string [json-pointer:/markdown_text]")
        if len(text) > MARKDOWN_TEXT_LIMIT:
            raise SlackRefusal("msg_too_long")
        chunks = p.get("chunks")
        if chunks is not None and not isinstance(chunks, list):
            raise SlackRefusal("invalid_chunks")
        if text and chunks:
            raise SlackRefusal("cannot_provide_both_markdown_text_and_chunks")
        tasks = []
        for chunk in chunks or []:
            if not isinstance(chunk, dict) or chunk.get("type") not in ("markdown_text", "task_update", "plan_update"):
                raise SlackRefusal("invalid_chunks")
            if chunk["type"] == "markdown_text":
                if not isinstance(chunk.get("text"), str) or len(chunk["text"]) > MARKDOWN_TEXT_LIMIT:
                    raise SlackRefusal("invalid_chunks")
                text += chunk["text"]
            elif chunk["type"] == "task_update":
                tasks.append(_check_task(chunk))
            elif not isinstance(chunk.get("title"), str) or len(chunk["title"]) > TASK_TEXT_LIMIT:
                raise SlackRefusal("invalid_chunks")
        mode = "chunks" if chunks else ("markdown_text" if text else None)
        return text, tasks, mode

    def _stream_mode(self, ts: str, mode: str | None) -> None:
        """A stream keeps the mode it started with: "If you started the stream with
        `markdown_text`, you must append with `markdown_text`..." (streaming_mode_mismatch)."""
        with self._lock:
            stream = self.streams.get(ts)
            if stream is None or mode is None:
                return
            if stream.get("mode") not in (None, mode):
                raise SlackRefusal("streaming_mode_mismatch")
            stream["mode"] = mode

    def _apply_tasks(self, msg: dict, tasks: list[dict]) -> None:
        """Tasks by id, as Slack shows them: title and status replace, output appends."""
        with self._lock:
            shown = msg.setdefault("tasks", {})
            for task in tasks:
                old = shown.get(task["id"], {})
                shown[task["id"]] = {**old, **task, "output": old.get("output", "") + task.get("output", "")}

    def _m_chat_startStream(self, p: dict) -> dict:
        channel = str(p["channel"])
        if not channel:
            raise SlackRefusal("channel_not_found")
        if self._channel(channel)["type"] != "im":  # "Required when streaming to channels."
            if not p.get("recipient_user_id"):
                return {"ok": False, "error": "missing_recipient_user_id"}
            if not p.get("recipient_team_id"):
                return {"ok": False, "error": "missing_recipient_team_id"}
        self._not_in(channel)
        if p.get("task_display_mode") is not None and p["task_display_mode"] not in TASK_DISPLAY_MODES:
            raise SlackRefusal("invalid_arguments", "must be one of timeline, plan [json-pointer:/task_display_mode]")
        text, tasks, mode = self._stream_content(p)
        msg = self._bot_message(channel, p.get("thread_ts"), text=text, streaming=True)
        self._apply_tasks(msg, tasks)
        with self._lock:
            self.streams[msg["ts"]] = {"channel": channel, "state": "streaming", "mode": mode}
        return {"ok": True, "channel": channel, "ts": msg["ts"]}

    def _stream_msg(self, p: dict) -> dict | None:
        msg = self._find(str(p["channel"]), str(p["ts"]))
        stream = self.streams.get(str(p["ts"]))
        if msg is None or stream is None or stream["state"] != "streaming":
            return None
        return msg

    def _m_chat_appendStream(self, p: dict) -> dict:
        if not p.get("markdown_text") and not p.get("chunks"):
            return {"ok": False, "error": "markdown_text_or_chunks_required"}
        text, tasks, mode = self._stream_content(p)
        self._not_in(str(p["channel"]))
        if self.streams.get(p["ts"], {}).get("state") == "stopped_by_user":
            return {"ok": False, "error": "stopped_by_user"}
        msg = self._stream_msg(p)
        if msg is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        self._stream_mode(str(p["ts"]), mode)
        self._apply_tasks(msg, tasks)
        with self._lock:
            msg["text"] = msg.get("text", "") + text
        return {"ok": True, "channel": p["channel"], "ts": p["ts"]}

    def _m_chat_stopStream(self, p: dict) -> dict:
        text, tasks, mode = self._stream_content(p)
        if p.get("blocks") is not None:
            check_blocks(p["blocks"], too_many="msg_blocks_too_many")
        self._check_metadata(p.get("metadata"))
        self._not_in(str(p["channel"]))
        msg = self._stream_msg(p)
        if msg is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        self._stream_mode(str(p["ts"]), mode)
        self._apply_tasks(msg, tasks)
        with self._lock:
            msg["text"] = msg.get("text", "") + text
            msg["streaming"] = False
            if p.get("blocks"):
                msg["blocks"] = self._kept_blocks(p["blocks"])
            if p.get("metadata"):
                msg["metadata"] = p["metadata"]
            self.streams[p["ts"]]["state"] = "stopped"
            message = {k: v for k, v in self._public(msg).items() if k != "metadata"}
        return {"ok": True, "channel": p["channel"], "ts": p["ts"], "message": message}

    def expire_streams(self) -> None:
        """Make every open stream die, as Slack does after ~5 minutes (chat.update then works)."""
        with self._lock:
            for ts, stream in self.streams.items():
                if stream["state"] == "streaming":
                    stream["state"] = "expired"
                    msg = next(m for m in self.messages.get(stream["channel"], []) if m["ts"] == ts)
                    msg["streaming"] = False

    # reactions ---------------------------------------------------------------------------

    _EMOJI_NAME = re.compile(r"^[a-z0-9_+'-]+(::skin-tone-[2-6])?$")

    def _reaction_target(self, p: dict) -> tuple[dict, str]:
        channel, ts = p.get("channel"), p.get("timestamp")
        if not channel or not ts:
            raise SlackRefusal("no_item_specified")
        self._not_in(str(channel))
        name = str(p["name"])
        if not self._EMOJI_NAME.match(name) or (self.known_emoji is not None and name not in self.known_emoji):
            raise SlackRefusal("invalid_name")
        msg = self._find(str(channel), str(ts))
        if msg is None:
            raise SlackRefusal("message_not_found")
        return msg, name

    def _m_reactions_add(self, p: dict) -> dict:
        msg, name = self._reaction_target(p)
        with self._lock:
            reactions = msg.setdefault("reactions", [])
            reaction = next((r for r in reactions if r["name"] == name), None)
            if reaction is None:
                reactions.append({"name": name, "users": [BOT_USER], "count": 1})
            elif BOT_USER in reaction["users"]:
                return {"ok": False, "error": "already_reacted"}
            else:
                reaction["users"].append(BOT_USER)
                reaction["count"] += 1
        return {"ok": True}

    def _m_reactions_remove(self, p: dict) -> dict:
        msg, name = self._reaction_target(p)
        with self._lock:
            reactions = msg.get("reactions") or []
            reaction = next((r for r in reactions if r["name"] == name), None)
            if reaction is None or BOT_USER not in reaction["users"]:
                return {"ok": False, "error": "no_reaction"}
            reaction["users"].remove(BOT_USER)
            reaction["count"] -= 1
            if not reaction["count"]:
                reactions.remove(reaction)
            if not reactions:
                msg.pop("reactions", None)
        return {"ok": True}


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
    # Close the connection as the request arrives, without a byte of answer: what a client sees
    # when a pooled keep-alive connection is closed by the server (uvicorn's 5 s idle timeout, a
    # load balancer's) just as the request goes out.
    drop_connection: bool = False
    # Tool calls the model makes after ``text`` (which may be ""): (name, arguments as a dict,
    # or as the raw string the model wrote). The response then ends with finish_reason
    # "tool_calls", as the proxy streams it from Bedrock (tools_stream below).
    tool_calls: list[tuple[str, dict | str]] = field(default_factory=list)


@dataclass
class GatewayRequest:
    body: dict
    headers: dict
    at: float = field(default_factory=time.monotonic)


GATEWAY_ALIASES = frozenset({"bedrock-claude-4.5-sonnet"})


def gateway_error(message: str, type_: str, code: int) -> dict:
    """An error body the way the LiteLLM proxy writes it."""
    return {"error": {"message": message, "type": type_, "param": None, "code": str(code)}}


# What a LiteLLM proxy in front of Bedrock Converse answers, before any token (HTTP 400), when a
# request breaks Bedrock's rules for tools (litellm 1.110.2, converse_transformation.py; the
# Bedrock text as Bedrock's ValidationException states it).
BEDROCK_NO_TOOL_CONFIG = gateway_error(
    'litellm.BadRequestError: BedrockException - {"message":"The toolConfig field must be defined '
    'when using toolUse and toolResult content blocks."}', "invalid_request_error", 400)
BEDROCK_NO_TOOL_CHOICE_NONE = gateway_error(
    "litellm.UnsupportedParamsError: Bedrock doesn't support tool_choice=none. To drop it from the "
    "call, set `litellm.drop_params = True.", "invalid_request_error", 400)
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def tool_rule_broken(body: dict) -> dict | None:
    """The 400 body a Bedrock-backed proxy answers ``body`` with, if it breaks a rule for tools:
    tool_choice "none"; tool history (assistant tool_calls, tool messages) without ``tools``;
    a tool definition Bedrock refuses; a tool call whose arguments are not a JSON object; a
    call not answered by a ``tool`` message right after it, or a result for no call; a result
    whose content is not a string."""
    if body.get("tool_choice") == "none":
        return BEDROCK_NO_TOOL_CHOICE_NONE
    messages = body.get("messages") or []
    history = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if history and not body.get("tools"):
        return BEDROCK_NO_TOOL_CONFIG
    for tool in body.get("tools") or []:
        fn = tool.get("function") or {}
        if tool.get("type") != "function" or not _TOOL_NAME.match(str(fn.get("name", ""))) \
                or (fn.get("parameters") or {}).get("type") != "object":
            return gateway_error(f"litellm.BadRequestError: BedrockException - invalid tool {fn.get('name')!r}",
                                 "invalid_request_error", 400)
    for n, m in enumerate(messages):
        if m.get("role") == "tool" and (n == 0 or not isinstance(m.get("content"), str)):
            return gateway_error(f"messages.{n}: a tool result must follow a tool call and be text",
                                 "invalid_request_error", 400)
        if not m.get("tool_calls"):
            continue
        wanted = []
        for call in m["tool_calls"]:
            try:
                ok = isinstance(json.loads(call["function"]["arguments"]), dict)
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                return gateway_error(f"messages.{n}: tool call arguments must be a JSON object",
                                     "invalid_request_error", 400)
            wanted.append(call.get("id"))
        answered = [r.get("tool_call_id") for r in itertools.takewhile(
            lambda r: r.get("role") == "tool", messages[n + 1:])]
        if sorted(map(str, answered)) != sorted(map(str, wanted)):
            return gateway_error(
                "litellm.BadRequestError: BedrockException - {\"message\":\"Expected toolResult blocks at "
                f"messages.{n + 1}.content for the following Ids: {', '.join(map(str, wanted))}\"}}",
                "invalid_request_error", 400)
    return None


# As LiteLLM 1.110.2 answers (see /api/v2 wire notes in tests/proxy/): 422 for a spent key budget.
BUDGET_EXCEEDED = gateway_error("Budget has been exceeded! Current cost: 10.2, Max budget: 10.0",
                                "budget_exceeded", 422)


class FakeGateway:
    """OpenAI-compatible ``/api/v2/chat/completions`` streaming SSE like the LiteLLM proxy.

    As strict as the proxy in front of Bedrock: a key other than ``keys`` answers 401, a model
    alias it does not serve answers 400, and so does a request that breaks Bedrock's rules for
    tools (``tool_rule_broken``); scripts add upstream errors, budgets, slow tokens, mid-stream
    error events (``Script.error_after_chunks``) and tool calls (``Script.tool_calls``)."""

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
        broken = tool_rule_broken(body)
        if broken is not None:
            return Response(json.dumps(broken), status=400, mimetype="application/json")
        s = self._next(body)
        if s.drop_connection:
            request.environ["werkzeug.socket"].shutdown(_SHUT_RDWR)
            raise ConnectionAbortedError("scripted: closed before answering")  # werkzeug drops it
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
            if not piece and s.tool_calls:
                break  # no text before the calls: the first chunk is the first call's
            delta = {"content": piece} if n else {"role": "assistant", "content": piece}
            yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": body.get("model"), "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        yield from tools_stream(body, s, first=not s.text)
        finish = "tool_calls" if s.tool_calls else "stop"
        yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body.get("model"), "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body.get("model"), "choices": [],
                         "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                                   "total_tokens": s.prompt_tokens + s.completion_tokens}})
        yield "data: [DONE]\n\n"


def _sse_line(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def tools_stream(body: dict, s: Script, *, first: bool):
    """``s.tool_calls`` as a LiteLLM proxy streams Bedrock Converse tool use (observed with
    litellm 1.110.2 in front of a Bedrock event stream): per call, a start chunk with the id, the
    name and ``"arguments": ""``, then argument fragments with only ``index`` (the proxy's own
    count from 0), ``type`` and ``function.arguments``; ``content`` is "" on every tool chunk and
    ``role`` only on the response's first chunk."""
    for index, (name, arguments) in enumerate(s.tool_calls):
        raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
        start = {"id": f"tooluse_{uuid.uuid4().hex[:22]}", "function": {"arguments": "", "name": name},
                 "type": "function", "index": index}
        pieces = [raw[i:i + max(s.chunk_size, 1) * 2] for i in range(0, len(raw), max(s.chunk_size, 1) * 2)]
        for n, call in enumerate([start, *({"function": {"arguments": p}, "type": "function", "index": index}
                                            for p in pieces)]):
            delta: dict = {"content": "", "tool_calls": [call]}
            if first and not index and not n:
                delta["role"] = "assistant"
            yield _sse_line({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": body.get("model"), "choices": [{"index": 0, "delta": delta}]})


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


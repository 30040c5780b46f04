"""ledger-bot: the BOR Write team's Slack assistant for GL Publisher and the Oracle General Ledger.

People @mention the bot in a channel or DM it; it reads the thread, asks the company LiteLLM
gateway (Claude on Bedrock) with the team's knowledge base as context, and answers in the thread.

Run it with ``python ledger_bot.py`` (configuration comes from the environment, see README.md);
``python ledger_bot.py --check`` validates the configuration and both upstreams and exits 0/1.

Sections, in the order a question travels through them:
  1. Configuration   - environment -> validated ``Config`` (exit 2 naming every bad variable)
  2. Logging         - JSON lines (text on a terminal), secrets redacted from every line
  3. Metrics         - prometheus-client collectors, rendered at /metrics
  4. Health server   - /health, /ready, /metrics on HEALTH_PORT (stdlib http.server)
  5. Slack I/O       - WebClient with retry handlers; every Web API call the bot makes
  6. Conversation    - pure functions: Slack event + thread -> Question -> LLM messages
  7. Knowledge       - the team's documents: load, split by heading, rank, budget
  8. LLM             - litellm, imported off the start-up path; errors -> Failure kinds
  9. Reply delivery  - status/placeholder, streamed or posted answer, long-answer splitting
 10. Answering       - the worker's job: one question -> one reply, every failure mapped
 11. Lifecycle       - Socket Mode listener, bounded worker pool, signals, drain, main()

Threads:
  - main: start-up, then waits for SIGTERM/SIGINT (or a test's stop event), then drains.
  - health-http: ``ThreadingHTTPServer`` answering probes (one short thread per request).
  - slack_sdk's SocketModeClient: a reader thread, a message processor and a listener pool of
    ``concurrency`` threads. Our listener only acks and enqueues; it never waits on I/O.
  - answer-N: ``LEDGER_BOT_WORKERS`` threads taking questions from a bounded queue.
  - litellm-import: imports litellm once in the background (~4 s) so /health is instant.
"""

from __future__ import annotations

import os

# litellm reads these at import time: no model-cost-map fetch from the internet and no
# tokenizer downloads (a hung egress would add seconds to every start). Set before any import
# of litellm, which happens lazily in _litellm().
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_OFFLINE_MODE"] = "true"

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import http.server
import json
import logging
import math
import queue
import random
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

import msgspec
import prometheus_client
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.socket_mode.builtin.client import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse

__version__ = "0.1.0"

log = logging.getLogger("ledger_bot")


# ════════════════════════════════════════════════════════════════════════════════════════
# 1. Configuration
# ════════════════════════════════════════════════════════════════════════════════════════

SECRET_ENV_VARS = ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "LITELLM_DEVELOPER_KEY")
EXIT_CONFIG = 2


def _setting(description: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=description, **constraints)


Seconds = Annotated[float, _setting("a number of seconds > 0", gt=0)]
Count = Annotated[int, _setting("a whole number >= 1", ge=1)]


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the bot reads from the environment; each field is the lower-cased variable.

    Required fields have no default. ``load_config`` validates every variable and reports all
    problems at once; it never echoes a value, because a malformed secret is still a secret.
    """

    slack_bot_token: Annotated[str, _setting("a Slack bot token starting with 'xoxb-'", pattern=r"^xoxb-\S+$")]
    slack_app_token: Annotated[str, _setting("a Slack app-level token starting with 'xapp-'", pattern=r"^xapp-\S+$")]
    litellm_developer_key: Annotated[str, _setting("the LiteLLM gateway key (non-empty, no spaces)", pattern=r"^\S+$")]
    litellm_base_url: Annotated[str, _setting("an http(s) URL of the gateway, e.g. https://llm.example.com/api/v2", pattern=r"^https?://[^\s/]+")]
    ledger_bot_model: Annotated[str, _setting("a gateway model alias", pattern=r"^[\w.:/-]+$")] = "bedrock-claude-4.5-sonnet"
    slack_api_url: Annotated[str, _setting("an http(s) URL ending in /", pattern=r"^https?://\S+/$")] = "https://slack.com/api/"
    health_port: Annotated[int, _setting("a TCP port 0-65535", ge=0, le=65535)] = 8080
    log_level: Annotated[str, _setting("one of DEBUG, INFO, WARNING, ERROR", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"
    log_format: Annotated[str, _setting("one of auto, json, text", pattern=r"^(auto|json|text)$")] = "auto"
    ledger_bot_llm_timeout_seconds: Seconds = 60.0
    ledger_bot_llm_max_retries: Annotated[int, _setting("a whole number 0-5", ge=0, le=5)] = 1
    ledger_bot_workers: Count = 16
    ledger_bot_queue_size: Count = 64
    ledger_bot_shutdown_grace_seconds: Seconds = 20.0
    ledger_bot_history_max_messages: Count = 40
    ledger_bot_history_max_chars: Annotated[int, _setting("a whole number >= 1000", ge=1000)] = 40_000
    ledger_bot_context_tokens: Annotated[int, _setting("a whole number >= 4096", ge=4096)] = 200_000
    ledger_bot_max_output_tokens: Annotated[int, _setting("a whole number >= 256", ge=256)] = 4096
    ledger_bot_git_sha: str = "unknown"


def _env_name(field_name: str) -> str:
    return field_name.upper()


def load_config(environ: dict[str, str] | os._Environ) -> Config:
    """Build a Config from ``environ``; raise ConfigError listing every bad variable.

    Empty strings count as unset. Each variable is converted on its own so one bad value does
    not hide the next; error lines name the variable and what it must be, never its value.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in msgspec.structs.fields(Config):
        name = _env_name(field.name)
        raw = _NORMALISE.get(field.name, str)(environ.get(name, "").strip())
        if not raw:
            if field.required:
                problems.append(f"{name}: required but not set")
            continue
        try:
            values[field.name] = msgspec.convert(raw, field.type, strict=False)
        except msgspec.ValidationError:
            problems.append(f"{name}: invalid, expected {_describe(field.type)}")
    if problems:
        raise ConfigError(problems)
    return Config(**values)


# Case-insensitive settings, so LOG_LEVEL=debug works as people type it.
_NORMALISE: dict[str, Callable[[str], str]] = {"log_level": str.upper, "log_format": str.lower}


def _describe(annotation: Any) -> str:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.description:
            return meta.description
    return getattr(annotation, "__name__", str(annotation))


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


# ════════════════════════════════════════════════════════════════════════════════════════
# 2. Logging
# ════════════════════════════════════════════════════════════════════════════════════════

# Token shapes redacted from every log line as a last line of defence: Slack tokens, Slack
# Socket Mode tickets, bearer headers and OpenAI/LiteLLM-style keys.
_TOKEN_PATTERN = re.compile(
    r"xox[abposre]-[A-Za-z0-9-]+|xapp-[A-Za-z0-9-]+|sk-[A-Za-z0-9_-]{6,}"
    r"|(?<=ticket=)[A-Za-z0-9_-]+|(?i:(?<=bearer )[A-Za-z0-9._~+/=-]{6,})"
)
REDACTED = "[REDACTED]"


class Redactor:
    """Replaces configured secret values and anything token-shaped with [REDACTED]."""

    def __init__(self) -> None:
        self._exact: tuple[str, ...] = ()

    def add_secrets(self, *values: str) -> None:
        # Longest first, so a secret containing another is removed whole.
        self._exact = tuple(sorted({v for v in (*self._exact, *values) if len(v) >= 4}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for value in self._exact:
            text = text.replace(value, REDACTED)
        return _TOKEN_PATTERN.sub(REDACTED, text)


redact = Redactor()

# Keys every JSON log line may carry, in this order; anything else passed as a field follows.
LOG_KEYS = ("ts", "level", "event", "ref", "channel", "user", "latency_ms", "tokens", "cost_usd", "outcome", "error")


def log_event(level: int, event: str, **fields: Any) -> None:
    """Log one structured line: ``event`` is a stable snake_case name, fields become keys."""
    log.log(level, event, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.name != log.name:
            entry["logger"] = record.name
        if record.exc_info:
            entry["error"] = entry.get("error") or self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", None) or {}
        extras = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        name = "" if record.name == log.name else f" [{record.name}]"
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}{name} {extras}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def setup_logging(level: str, fmt: str, stream: Any = None) -> None:
    """Route every logger (ours, slack_sdk, litellm) through one redacting handler on stdout."""
    stream = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # slack_sdk logs every frame at DEBUG; keep it one notch quieter than ours unless DEBUG.
    logging.getLogger("slack_sdk").setLevel(level if level == "DEBUG" else "WARNING")


def _tame_litellm_logging() -> None:
    """litellm's loggers carry their own stderr handler *and* propagate: every line twice and
    unredacted. Drop its handlers so its lines go through ours, once, redacted."""
    for name in ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        # litellm logs a line per call at INFO; only its warnings matter unless debugging.
        lg.setLevel(logging.NOTSET if logging.getLogger().level <= logging.DEBUG else logging.WARNING)


# ════════════════════════════════════════════════════════════════════════════════════════
# 3. Metrics
# ════════════════════════════════════════════════════════════════════════════════════════
# Label values are small fixed sets: never a user id, channel id or message text.

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

EVENTS = prometheus_client.Counter(
    "ledger_bot_events", "Socket Mode events received, by type and what the bot did with them",
    ["type", "outcome"],
)
ANSWERS = prometheus_client.Counter("ledger_bot_answers", "Questions handled, by outcome", ["outcome"])
ACK_LATENCY = prometheus_client.Histogram(
    "ledger_bot_ack_latency_seconds", "Envelope frame received -> ack sent", buckets=_LATENCY_BUCKETS
)
FIRST_FEEDBACK = prometheus_client.Histogram(
    "ledger_bot_first_feedback_seconds", "Event received -> 'thinking' status or placeholder visible",
    buckets=_LATENCY_BUCKETS,
)
FIRST_TOKEN = prometheus_client.Histogram(
    "ledger_bot_first_token_seconds", "Event received -> first answer text visible in Slack", buckets=_LATENCY_BUCKETS
)
ANSWER_DURATION = prometheus_client.Histogram(
    "ledger_bot_answer_duration_seconds", "Event received -> reply complete", buckets=_LATENCY_BUCKETS
)
LLM_TOKENS = prometheus_client.Counter("ledger_bot_llm_tokens", "Tokens reported by the gateway", ["kind"])
LLM_COST = prometheus_client.Counter("ledger_bot_llm_cost_usd", "LLM cost in US dollars")
SOCKET_CONNECTED = prometheus_client.Gauge("ledger_bot_socket_connected", "1 while the Socket Mode connection is up")
SOCKET_RECONNECTS = prometheus_client.Counter("ledger_bot_socket_reconnects", "Socket Mode reconnections after the first connect")
QUEUE_DEPTH = prometheus_client.Gauge("ledger_bot_worker_queue_depth", "Questions waiting for a worker")
WORKERS_BUSY = prometheus_client.Gauge("ledger_bot_workers_busy", "Workers answering a question right now")
FEEDBACK = prometheus_client.Counter("ledger_bot_feedback", "Answer feedback button clicks", ["value"])
BUILD_INFO = prometheus_client.Gauge("ledger_bot_build_info", "Always 1; labels say what is running", ["version", "git_sha"])


# ════════════════════════════════════════════════════════════════════════════════════════
# 4. Health server
# ════════════════════════════════════════════════════════════════════════════════════════


class Health:
    """What the probes report. Written by the lifecycle code, read by the HTTP handler."""

    def __init__(self) -> None:
        self.connected = False
        self.stopping = False
        self.started = time.monotonic()
        self.liveness_checks: list[Callable[[], str | None]] = []  # each returns a problem or None

    def live(self) -> tuple[bool, dict[str, Any]]:
        problems = [p for check in self.liveness_checks if (p := check())]
        return not problems, {"status": "ok" if not problems else "unhealthy", "problems": problems}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        if self.stopping:
            return False, {"status": "stopping", "reason": "shutting down, not taking new questions"}
        if not self.connected:
            return False, {"status": "not_ready", "reason": "not connected to Slack Socket Mode"}
        return True, {"status": "ready"}


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    server: HealthServer
    server_version = "ledger-bot"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            ok, body = self.server.health.live()
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        elif path == "/ready":
            ok, body = self.server.health.ready()
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        elif path == "/metrics":
            self._send(200, prometheus_client.CONTENT_TYPE_LATEST, prometheus_client.generate_latest())
        else:
            self._send(404, "application/json", b'{"status":"not_found"}')

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds: DEBUG only
        log.debug("http " + format, *args)


class HealthServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, health: Health):
        super().__init__(("0.0.0.0", port), _HealthHandler)
        self.health = health

    def start(self) -> HealthServer:
        threading.Thread(target=self.serve_forever, name="health-http", daemon=True).start()
        return self


# ════════════════════════════════════════════════════════════════════════════════════════
# 5. Slack I/O
# ════════════════════════════════════════════════════════════════════════════════════════

# Metadata event types the bot stamps on its messages, so thread context can tell answers
# (kept, as the assistant's turns) from notices such as error and busy replies (dropped).
ANSWER_METADATA = "ledger_bot_answer"
NOTICE_METADATA = "ledger_bot_notice"


def make_web_client(config: Config) -> WebClient:
    """A WebClient that retries connection errors, 5xx and 429 (honouring Retry-After)."""
    return WebClient(
        token=config.slack_bot_token,
        base_url=config.slack_api_url,
        timeout=15,
        retry_handlers=[
            ConnectionErrorRetryHandler(max_retry_count=2),
            ServerErrorRetryHandler(max_retry_count=2),
            RateLimitErrorRetryHandler(max_retry_count=3),
        ],
    )


@dataclasses.dataclass(frozen=True)
class BotIdentity:
    user_id: str
    bot_id: str
    team_id: str


def fetch_identity(web: WebClient) -> BotIdentity:
    """``auth.test``: who the bot is. Raises SlackApiError/SlackClientError as they come."""
    resp = web.auth_test()
    return BotIdentity(user_id=resp["user_id"], bot_id=resp.get("bot_id") or "", team_id=resp.get("team_id") or "")


def fetch_thread(web: WebClient, *, channel: str, thread_ts: str, max_messages: int) -> list[dict]:
    """``conversations.replies`` with metadata, paginated: the root plus the newest messages.

    Returns at most ``max_messages + 1`` messages, oldest first.
    """
    messages: list[dict] = []
    cursor = None
    for _ in range(10):  # 10 pages x 200 = a 2,000-message thread; more is not useful context
        resp = web.conversations_replies(
            channel=channel, ts=thread_ts, limit=200, cursor=cursor, include_all_metadata=True
        )
        messages.extend(resp.get("messages") or [])
        cursor = (resp.get("response_metadata") or {}).get("next_cursor")
        if not resp.get("has_more") or not cursor:
            break
    if len(messages) > max_messages + 1:
        messages = messages[:1] + messages[-max_messages:]
    return messages


def post_message(
    web: WebClient, *, channel: str, thread_ts: str, markdown: str, metadata_type: str, ref: str,
    extra_blocks: list[dict] | None = None,
) -> str:
    """``chat.postMessage`` of one markdown block (plain ``text`` kept for notifications).

    Returns the new message's ts. Raises SlackApiError/SlackClientError.
    """
    resp = web.chat_postMessage(
        channel=channel, thread_ts=thread_ts, text=markdown,
        blocks=[{"type": "markdown", "text": markdown}, *(extra_blocks or [])],
        metadata={"event_type": metadata_type, "event_payload": {"ref": ref}},
        unfurl_links=False, unfurl_media=False,
    )
    return resp["ts"]


def update_message(
    web: WebClient, *, channel: str, ts: str, markdown: str, metadata_type: str, ref: str,
    extra_blocks: list[dict] | None = None,
) -> None:
    """``chat.update`` a message of ours to one markdown block. Raises SlackApiError/SlackClientError."""
    web.chat_update(
        channel=channel, ts=ts, text=markdown,
        blocks=[{"type": "markdown", "text": markdown}, *(extra_blocks or [])],
        metadata={"event_type": metadata_type, "event_payload": {"ref": ref}},
    )


def set_thinking_status(web: WebClient, *, channel: str, thread_ts: str) -> bool:
    """``assistant.threads.setStatus`` "is thinking…"; False if Slack refuses it.

    The status clears itself when the bot replies in the thread.
    """
    try:
        web.assistant_threads_setStatus(channel_id=channel, thread_ts=thread_ts, status="is thinking…")
        return True
    except SlackApiError as e:
        log_event(logging.DEBUG, "status_refused", channel=channel, error=e.response.get("error"))
        return False


def clear_status(web: WebClient, *, channel: str, thread_ts: str) -> None:
    """Clear the "thinking" status (an empty status); failures are logged, never raised."""
    try:
        web.assistant_threads_setStatus(channel_id=channel, thread_ts=thread_ts, status="")
    except SlackClientError as e:
        log_event(logging.DEBUG, "status_clear_failed", channel=channel, error=_slack_error_code(e))


def _slack_error_code(e: BaseException) -> str:
    if isinstance(e, SlackApiError):
        return str(e.response.get("error") or "slack_api_error")
    return type(e).__name__


# ════════════════════════════════════════════════════════════════════════════════════════
# 6. Conversation (pure: no I/O below this line until section 8)
# ════════════════════════════════════════════════════════════════════════════════════════


class SlackEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The parts of an Events API ``event`` the bot uses; parsed once at the edge."""

    type: str
    channel: str = ""
    user: str = ""
    text: str = ""
    ts: str = ""
    thread_ts: str | None = None
    subtype: str | None = None
    bot_id: str | None = None
    channel_type: str | None = None
    team: str | None = None
    user_team: str | None = None


@dataclasses.dataclass(frozen=True)
class Question:
    """One question the bot will answer: where, who, what, and which thread to reply in."""

    event_id: str
    kind: str  # "mention" | "dm"
    channel: str
    user: str
    team: str
    text: str
    ts: str
    thread_ts: str  # where the reply goes: the event's thread, or the message itself
    in_thread: bool  # the message was already inside a thread (so there is history to read)


@dataclasses.dataclass(frozen=True)
class Ignored:
    reason: str  # small fixed set: unsupported_event, subtype, bot, own_message, not_addressed, malformed


_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")


def classify_event(event_type: str, event: SlackEvent, event_id: str, team_id: str, me: BotIdentity) -> Question | Ignored:
    """Decide whether an Events API event is a question for the bot.

    ``app_mention`` -> a question in its thread; ``message`` in a DM (``channel_type: im``) ->
    a question threaded under it. Other bots, the bot itself, edits, deletions and every
    other subtype are ignored, as are channel messages (mentions arrive as ``app_mention``).
    """
    if event_type not in ("app_mention", "message"):
        return Ignored("unsupported_event")
    if event.bot_id or event.subtype == "bot_message":
        return Ignored("own_message" if event.bot_id == me.bot_id or event.user == me.user_id else "bot")
    if event.subtype:
        return Ignored("subtype")
    if event.user == me.user_id:
        return Ignored("own_message")
    if not (event.channel and event.user and event.ts):
        return Ignored("malformed")
    if event_type == "message" and event.channel_type != "im":
        return Ignored("not_addressed")
    return Question(
        event_id=event_id,
        kind="mention" if event_type == "app_mention" else "dm",
        channel=event.channel,
        user=event.user,
        team=event.user_team or event.team or team_id,
        text=event.text,
        ts=event.ts,
        thread_ts=event.thread_ts or event.ts,
        in_thread=bool(event.thread_ts and event.thread_ts != event.ts),
    )


def strip_mention(text: str, bot_user_id: str) -> str:
    """Remove the bot's own ``<@ID>`` / ``<@ID|name>`` mentions; other people's stay."""
    return re.sub(r"\s{2,}", " ", _MENTION.sub(lambda m: "" if m.group(1) == bot_user_id else m.group(0), text)).strip()


SYSTEM_PROMPT = """\
You are ledger-bot, the Slack assistant of Wealthsimple's BOR Write team. You answer questions \
about GL Publisher and the Oracle General Ledger for engineers, in a Slack thread.

How to answer:
- Write for Slack: short paragraphs, bullet lists, `code` and fenced code blocks; standard \
Markdown renders. No top-level headings for short answers.
- Ground answers in the team knowledge below when it covers the question and name the source \
document you used. If the knowledge does not cover it, say so plainly and give your best general \
guidance, marked as such. Never invent table names, job names or configuration values.
- Messages from people arrive prefixed with their Slack mention, e.g. "<@U123>: ...". Several \
people may be in the thread; answer the latest message, using the thread for context.
- Be concise; lead with the answer."""


def build_llm_messages(
    *, question: Question, thread: list[dict], me: BotIdentity, system_prompt: str,
    max_messages: int, max_chars: int,
) -> list[dict]:
    """Turn a Slack thread into chat messages for the model.

    The bot's earlier answers become ``assistant`` turns; everyone else is ``user``, prefixed
    with their mention so the model can tell people apart; the bot's own mention is stripped.
    Notices (error, busy) and messages after the question are left out. The question is always
    the last turn; the oldest messages go first when the thread exceeds ``max_messages`` or
    ``max_chars``. Consecutive turns of one role are merged (Claude wants them alternating).
    """
    turns: list[tuple[str, str]] = []
    for msg in thread:
        if msg.get("ts") == question.ts:
            continue  # the question is appended last from the event itself, which is authoritative
        if _ts_key(msg.get("ts", "0")) > _ts_key(question.ts):
            continue
        turn = _thread_turn(msg, me)
        if turn:
            turns.append(turn)
    question_turn = ("user", f"<@{question.user}>: {strip_mention(question.text, me.user_id)}")
    turns = turns[-max(0, max_messages - 1):] if max_messages > 1 else []
    budget = max_chars - len(question_turn[1])
    kept: list[tuple[str, str]] = []
    for role, text in reversed(turns):
        if len(text) > budget:
            break
        kept.append((role, text))
        budget -= len(text)
    kept.reverse()
    kept.append(question_turn)
    while kept and kept[0][0] == "assistant":  # the conversation must open with a user turn
        kept.pop(0)
    merged: list[dict] = []
    for role, text in kept:
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n\n" + text
        else:
            merged.append({"role": role, "content": text})
    return [{"role": "system", "content": system_prompt}, *merged]


def _thread_turn(msg: dict, me: BotIdentity) -> tuple[str, str] | None:
    text = (msg.get("text") or "").strip()
    mine = (me.bot_id and msg.get("bot_id") == me.bot_id) or msg.get("user") == me.user_id
    if mine:
        if (msg.get("metadata") or {}).get("event_type") == NOTICE_METADATA:
            return None
        return ("assistant", text) if text else None
    if msg.get("subtype") not in (None, "thread_broadcast", "file_share", "bot_message"):
        return None
    if not text:
        return None
    who = msg.get("user") or msg.get("bot_id") or "someone"
    return ("user", f"<@{who}>: {strip_mention(text, me.user_id)}")


def _ts_key(ts: str) -> tuple[int, int]:
    whole, _, frac = ts.partition(".")
    return (int(whole or 0), int(frac or 0)) if (whole + frac).isdigit() else (0, 0)


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` characters, losing nothing.

    Cuts at a paragraph break in the second half of the window if there is one, else at a line
    break, else at a space, else hard. A cut inside a fenced code block closes the fence at the
    end of the piece and reopens it (with its language) at the start of the next, so every piece
    renders on its own; removing those added fence lines gives back the original text.
    """
    if limit < 64:
        raise ValueError("limit too small to carry a code fence")
    pieces: list[str] = []
    rest, reopen = text, ""
    while len(reopen) + len(rest) > limit:
        window = rest[: limit - len(reopen) - len(FENCE_CLOSE)]  # room to close a fence
        cut = _best_cut(window)
        piece, rest = reopen + rest[:cut], rest[cut:]
        fence = _open_fence(piece)
        if fence is None:
            reopen = ""
        else:
            piece += FENCE_CLOSE if piece.endswith("\n") else "\n" + FENCE_CLOSE
            reopen = (fence if len(fence) < limit // 4 else "```") + "\n"
        pieces.append(piece)
    pieces.append(reopen + rest)
    return pieces


FENCE_CLOSE = "```"


def _best_cut(window: str) -> int:
    half = len(window) // 2
    for sep in ("\n\n", "\n", " "):
        at = window.rfind(sep, half)
        if at >= 0:
            return at + len(sep)
    return len(window)


def _open_fence(text: str) -> str | None:
    """The opening fence line (e.g. "```sql") if ``text`` ends inside a code block, else None."""
    fence = None
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped
    return fence


# ════════════════════════════════════════════════════════════════════════════════════════
# 8. LLM
# ════════════════════════════════════════════════════════════════════════════════════════

_litellm_module: Any = None
_litellm_lock = threading.Lock()


def _litellm() -> Any:
    """Import and configure litellm once (~4 s, ~200 MB); every caller after that is free.

    Kept off the start-up path: /health answers before this runs, and a background thread
    warms it so the first question does not pay for it.
    """
    global _litellm_module
    if _litellm_module is None:
        with _litellm_lock:
            if _litellm_module is None:
                import litellm

                _tame_litellm_logging()
                litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
                litellm.disable_streaming_logging = True  # per-chunk logging bookkeeping we never use
                litellm.telemetry = False
                _litellm_module = litellm
    return _litellm_module


class LLMFailure(Exception):
    """A gateway failure, classified. ``kind`` is one of the answer outcomes."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def classify_llm_error(exc: BaseException) -> LLMFailure:
    """Map a litellm/openai exception to an outcome kind. Never includes the exception's text
    in anything user-facing; ``detail`` is for the log only (and redacted there)."""
    lm = _litellm()
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    if isinstance(exc, lm.ContextWindowExceededError):
        kind = "context_too_long"
    elif isinstance(exc, lm.Timeout) or isinstance(exc, TimeoutError) or status == 408:
        kind = "timeout"
    elif isinstance(exc, lm.RateLimitError) or status == 429:
        kind = "rate_limited"
    else:
        kind = "gateway_error"
    return LLMFailure(kind, f"{name} status={status}")


def stream_completion(config: Config, messages: list[dict], usage: Usage) -> Iterator[str]:
    """Stream the answer's text from the gateway, filling ``usage`` when the gateway reports it.

    Every setting is passed per call (litellm's module globals race between threads).
    ``max_retries`` retries connection errors and 429/5xx *before* the first token only.
    Raises LLMFailure.
    """
    lm = _litellm()
    deadline = time.monotonic() + ANSWER_HARD_LIMIT_SECONDS
    try:
        response = lm.completion(
            model=f"litellm_proxy/{config.ledger_bot_model}",
            messages=messages,
            api_base=config.litellm_base_url,
            api_key=config.litellm_developer_key,
            extra_headers={"X-LiteLLM-Dev-Key": config.litellm_developer_key},
            timeout=config.ledger_bot_llm_timeout_seconds,
            max_retries=config.ledger_bot_llm_max_retries,
            max_tokens=config.ledger_bot_max_output_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in response:
            if time.monotonic() > deadline:
                raise LLMFailure("timeout", f"answer exceeded {ANSWER_HARD_LIMIT_SECONDS}s")
            if chunk.choices:
                text = chunk.choices[0].delta.content
                if text:
                    yield text
            chunk_usage = getattr(chunk, "usage", None)
            if chunk_usage:
                usage.prompt_tokens = chunk_usage.prompt_tokens or usage.prompt_tokens
                usage.completion_tokens = chunk_usage.completion_tokens or usage.completion_tokens
    except LLMFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - every gateway error becomes a classified failure
        raise classify_llm_error(exc) from exc


# A stream is never allowed to run longer than this, whatever the per-read timeout: Slack
# streams die after ~5 minutes and nobody waits that long for an answer anyway.
ANSWER_HARD_LIMIT_SECONDS = 240


# ════════════════════════════════════════════════════════════════════════════════════════
# 9. Reply delivery
# ════════════════════════════════════════════════════════════════════════════════════════

# Slack limits: a markdown block holds 12,000 characters.
MARKDOWN_LIMIT = 12_000

PLACEHOLDER_TEXT = "_Thinking…_"


class Reply:
    """One reply in one thread: visible feedback first, then the answer, whole.

    Feedback is the assistant "is thinking…" status when Slack allows it, else a placeholder
    message that the answer's first part later replaces. ``finish`` posts the answer split
    into messages within Slack's limits; ``fail`` posts a short notice. Slack errors escape as
    SlackApiError/SlackClientError for the caller to map.
    """

    def __init__(self, web: WebClient, question: Question, ref: str):
        self.web = web
        self.q = question
        self.ref = ref
        self.placeholder_ts: str | None = None
        self.status_set = False

    def show_feedback(self) -> None:
        self.status_set = set_thinking_status(self.web, channel=self.q.channel, thread_ts=self.q.thread_ts)
        if not self.status_set:
            self.placeholder_ts = post_message(
                self.web, channel=self.q.channel, thread_ts=self.q.thread_ts, markdown=PLACEHOLDER_TEXT,
                metadata_type=NOTICE_METADATA, ref=self.ref,
            )

    def finish(self, answer: str) -> None:
        parts = split_message(answer.strip() or "(the model returned an empty answer)", MARKDOWN_LIMIT)
        for i, part in enumerate(parts):
            self._put(part, ANSWER_METADATA, first=i == 0)

    def fail(self, notice: str) -> None:
        self._put(notice, NOTICE_METADATA, first=True)
        if self.status_set and self.placeholder_ts is None:
            pass  # posting a reply clears the status

    def _put(self, markdown: str, metadata_type: str, *, first: bool) -> None:
        if first and self.placeholder_ts:
            update_message(self.web, channel=self.q.channel, ts=self.placeholder_ts, markdown=markdown,
                           metadata_type=metadata_type, ref=self.ref)
            self.placeholder_ts = None
        else:
            post_message(self.web, channel=self.q.channel, thread_ts=self.q.thread_ts, markdown=markdown,
                         metadata_type=metadata_type, ref=self.ref)


# ════════════════════════════════════════════════════════════════════════════════════════
# 10. Answering
# ════════════════════════════════════════════════════════════════════════════════════════

FAILURE_NOTICES = {
    "timeout": "Sorry, the model took too long to answer and the request timed out. Please try again in a moment.",
    "rate_limited": "Sorry, the LLM gateway is rate limiting me right now. Please try again in a minute.",
    "gateway_error": "Sorry, the LLM gateway is down or returned an error, so I couldn't answer. Please try again shortly.",
    "context_too_long": "Sorry, this question plus the thread is too long for the model. Please start a new thread with a shorter question.",
    "slack_error": "Sorry, Slack returned an error while I was answering, so this reply may be incomplete. Please ask again.",
    "internal_error": "Sorry, something went wrong on my side while answering. Please try again.",
}
BUSY_NOTICE = "I'm busy with other questions right now. Please try again in a minute."


def failure_notice(kind: str, ref: str) -> str:
    return f"{FAILURE_NOTICES[kind]} (ref `{ref}`)"


def new_ref() -> str:
    """A short reference id shown to the user and logged, to find this answer's log lines."""
    return "lb-" + secrets.token_hex(4)


@dataclasses.dataclass
class Job:
    question: Question
    received: float  # time.monotonic() when the envelope arrived
    ref: str = dataclasses.field(default_factory=new_ref)


class Answerer:
    """Turns one Question into one reply in its thread; every failure becomes a notice."""

    def __init__(self, config: Config, web: WebClient, me: BotIdentity):
        self.config = config
        self.web = web
        self.me = me

    def answer(self, job: Job) -> str:
        """Answer ``job``; returns the outcome (also logged and counted)."""
        q = job.question
        usage = Usage()
        reply = Reply(self.web, q, job.ref)
        outcome, error = "ok", None
        try:
            reply.show_feedback()
            FIRST_FEEDBACK.observe(time.monotonic() - job.received)
            thread = (
                fetch_thread(self.web, channel=q.channel, thread_ts=q.thread_ts,
                             max_messages=self.config.ledger_bot_history_max_messages)
                if q.in_thread else []
            )
            messages = build_llm_messages(
                question=q, thread=thread, me=self.me, system_prompt=SYSTEM_PROMPT,
                max_messages=self.config.ledger_bot_history_max_messages,
                max_chars=self.config.ledger_bot_history_max_chars,
            )
            log_event(logging.DEBUG, "llm_request", ref=job.ref, messages=messages)
            parts: list[str] = []
            for text in stream_completion(self.config, messages, usage):
                if not parts:
                    FIRST_TOKEN.observe(time.monotonic() - job.received)
                parts.append(text)
            reply.finish("".join(parts))
        except LLMFailure as e:
            outcome, error = e.kind, e.detail
        except SlackClientError as e:
            outcome, error = "slack_error", _slack_error_code(e)
        except Exception as e:  # noqa: BLE001 - a bug must still produce a reply and a log line
            outcome, error = "internal_error", type(e).__name__
            log.exception("answer_crashed", extra={"fields": {"ref": job.ref}})
        if outcome != "ok":
            with contextlib.suppress(SlackClientError):
                reply.fail(failure_notice(outcome, job.ref))
        self._record(job, outcome, error, usage)
        return outcome

    def _record(self, job: Job, outcome: str, error: str | None, usage: Usage) -> None:
        latency = time.monotonic() - job.received
        ANSWERS.labels(outcome=outcome).inc()
        ANSWER_DURATION.observe(latency)
        LLM_TOKENS.labels(kind="prompt").inc(usage.prompt_tokens)
        LLM_TOKENS.labels(kind="completion").inc(usage.completion_tokens)
        log_event(
            logging.INFO if outcome == "ok" else logging.WARNING, "answer",
            ref=job.ref, event_id=job.question.event_id, channel=job.question.channel, user=job.question.user,
            kind=job.question.kind, outcome=outcome, latency_ms=round(latency * 1000),
            tokens={"prompt": usage.prompt_tokens, "completion": usage.completion_tokens},
            error=error,
        )


# ════════════════════════════════════════════════════════════════════════════════════════
# 11. Lifecycle
# ════════════════════════════════════════════════════════════════════════════════════════


class SeenSet:
    """A bounded, expiring set of keys: what the bot has already taken on (event ids, messages)."""

    def __init__(self, ttl_seconds: float = 3600, max_items: int = 20_000):
        self.ttl = ttl_seconds
        self.max_items = max_items
        self._items: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, *keys: str) -> bool:
        """Record ``keys``; False (recording nothing) if any of them was seen recently."""
        now = time.monotonic()
        with self._lock:
            while self._items and (len(self._items) >= self.max_items or next(iter(self._items.values())) < now - self.ttl):
                self._items.popitem(last=False)
            if any(k in self._items for k in keys):
                return False
            for k in keys:
                self._items[k] = now
            return True


class WorkerPool:
    """A fixed set of worker threads over a bounded queue.

    ``submit`` never blocks: it returns False when the queue is full so the caller can say
    "busy". ``drain`` waits for queued and running jobs until a deadline.
    """

    def __init__(self, handler: Callable[[Job], Any], workers: int, queue_size: int):
        self.handler = handler
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.busy = 0
        self._busy_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.threads = [
            threading.Thread(target=self._run, name=f"answer-{i}", daemon=True) for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            return False
        QUEUE_DEPTH.set(self.queue.qsize())
        return True

    def _run(self) -> None:
        name = threading.current_thread().name
        while True:
            job = self.queue.get()
            if job is None:
                return
            QUEUE_DEPTH.set(self.queue.qsize())
            with self._lock:
                self.busy += 1
                self._busy_since[name] = time.monotonic()
                WORKERS_BUSY.set(self.busy)
            try:
                self.handler(job)
            except BaseException:  # noqa: BLE001 - a worker must outlive any job
                log.exception("worker_job_crashed")
            finally:
                with self._lock:
                    self.busy -= 1
                    self._busy_since.pop(name, None)
                    WORKERS_BUSY.set(self.busy)
                    self._idle.notify_all()
                self.queue.task_done()

    def pending(self) -> int:
        with self._lock:
            return self.busy + self.queue.qsize()

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or running, at most ``timeout`` s; True if drained."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.busy or self.queue.qsize():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def problem(self, stuck_after: float) -> str | None:
        """Why the pool is unhealthy (a dead or wedged worker), or None."""
        dead = [t.name for t in self.threads if not t.is_alive()]
        if dead:
            return f"worker threads died: {', '.join(dead)}"
        now = time.monotonic()
        with self._lock:
            stuck = [n for n, since in self._busy_since.items() if now - since > stuck_after]
        return f"workers stuck on one question for over {stuck_after:.0f}s: {', '.join(stuck)}" if stuck else None


class Bot:
    """Wires Socket Mode to the worker pool and keeps /ready honest about the connection."""

    def __init__(self, config: Config, web: WebClient, me: BotIdentity, health: Health):
        self.config = config
        self.web = web
        self.me = me
        self.health = health
        self.answerer = Answerer(config, web, me)
        self.seen = SeenSet()
        self.pool = WorkerPool(self.answerer.answer, config.ledger_bot_workers, config.ledger_bot_queue_size)
        stuck_after = (config.ledger_bot_llm_timeout_seconds * (config.ledger_bot_llm_max_retries + 1)
                       + ANSWER_HARD_LIMIT_SECONDS + 60)
        health.liveness_checks.append(lambda: self.pool.problem(stuck_after))
        health.liveness_checks.append(self._dispatcher_problem)
        self.client: SocketModeClient | None = None
        self._hellos = 0
        self._frame_arrivals: collections.deque[tuple[str, float]] = collections.deque(maxlen=256)

    # -- Socket Mode ------------------------------------------------------------------------

    def connect(self, stop: threading.Event) -> bool:
        """Connect to Socket Mode, retrying with capped exponential backoff (1 s .. 30 s).

        slack_sdk never retries a failed *first* connect; after one success it reconnects by
        itself. Returns False if ``stop`` was set before a connection was made.
        """
        client = SocketModeClient(
            app_token=self.config.slack_app_token,
            web_client=self.web,
            concurrency=10,
            on_message_listeners=[self._on_frame],
            on_close_listeners=[self._on_close],
        )
        client.socket_mode_request_listeners.append(self._on_request)
        self.client = client
        delay = 1.0
        while not stop.is_set():
            try:
                client.connect()
                return True
            except Exception as e:  # noqa: BLE001 - Slack down, rate limited, DNS: all retried
                log_event(logging.WARNING, "slack_connect_failed", error=_slack_error_code(e),
                          retry_in_s=round(delay, 1))
                if isinstance(e, SlackApiError) and e.response.get("error") in ("invalid_auth", "not_authed", "token_revoked"):
                    raise
            stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 30.0)
        return False

    def _on_frame(self, raw: str) -> None:
        """Runs on the socket's reader thread for every frame: must be cheap and never raise
        (an exception here drops the rest of that read's frames)."""
        try:
            now = time.monotonic()
            if '"envelope_id"' in raw[:200] or '"envelope_id"' in raw:
                m = re.search(r'"envelope_id"\s*:\s*"([^"]+)"', raw)
                if m:
                    self._frame_arrivals.append((m.group(1), now))
            if '"hello"' in raw:
                if json.loads(raw).get("type") == "hello":
                    self._hellos += 1
                    if self._hellos > 1:
                        SOCKET_RECONNECTS.inc()
                    self._set_connected(True)
                    log_event(logging.INFO, "slack_connected", connections=self._hellos)
            elif '"disconnect"' in raw and json.loads(raw).get("type") == "disconnect":
                self._set_connected(False)
                log_event(logging.INFO, "slack_disconnect_requested")
        except Exception:  # noqa: BLE001
            log.debug("frame_inspect_failed", exc_info=True)

    def _on_close(self, code: int, reason: str | None = None) -> None:
        self._set_connected(False)
        log_event(logging.INFO, "slack_socket_closed", code=code)

    def _set_connected(self, value: bool) -> None:
        self.health.connected = value
        SOCKET_CONNECTED.set(1 if value else 0)

    def _dispatcher_problem(self) -> str | None:
        client = self.client
        if client is None:
            return None
        if not client.message_processor.is_alive():
            return "Socket Mode message processor thread died"
        return None

    def _on_request(self, client: SocketModeClient, req: SocketModeRequest) -> None:
        """Ack first, then classify and enqueue. Runs on slack_sdk's listener pool.

        After SIGTERM nothing is acked: Slack then redelivers the event to another connection
        (the other replica, or this bot after its restart), so nothing is lost.
        """
        if self.health.stopping:
            return
        client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
        received = self._arrival(req.envelope_id)
        ACK_LATENCY.observe(time.monotonic() - received)
        try:
            self.dispatch(req.type, req.payload or {}, received, retry_attempt=req.retry_attempt)
        except Exception:  # noqa: BLE001 - a bad event is logged and skipped, never fatal
            EVENTS.labels(type="other", outcome="rejected").inc()
            log.exception("event_rejected", extra={"fields": {"envelope_type": req.type}})

    def _arrival(self, envelope_id: str) -> float:
        for eid, at in reversed(self._frame_arrivals):
            if eid == envelope_id:
                return at
        return time.monotonic()

    def dispatch(self, envelope_type: str, payload: dict, received: float, retry_attempt: int | None = None) -> None:
        if envelope_type != "events_api":
            EVENTS.labels(type="other", outcome="ignored").inc()
            log_event(logging.DEBUG, "envelope_ignored", envelope_type=envelope_type)
            return
        raw_event = payload.get("event") or {}
        event_type = str(raw_event.get("type") or "unknown")
        metric_type = event_type if event_type in ("app_mention", "message") else "other"
        event_id = str(payload.get("event_id") or "")
        try:
            event = msgspec.convert(raw_event, SlackEvent, strict=False)
        except msgspec.ValidationError as e:
            EVENTS.labels(type=metric_type, outcome="rejected").inc()
            log_event(logging.WARNING, "event_rejected", event_id=event_id, reason="malformed", error=str(e))
            return
        verdict = classify_event(event_type, event, event_id, str(payload.get("team_id") or ""), self.me)
        if isinstance(verdict, Ignored):
            EVENTS.labels(type=metric_type, outcome="ignored").inc()
            log_event(logging.DEBUG, "event_ignored", event_id=event_id, reason=verdict.reason)
            return
        # One answer per event id (Slack redelivers) and per message (a mention can also
        # arrive as a `message` event).
        if not self.seen.add(f"event:{event_id}", f"msg:{verdict.channel}:{verdict.ts}"):
            EVENTS.labels(type=metric_type, outcome="duplicate").inc()
            log_event(logging.INFO, "event_duplicate", event_id=event_id, channel=verdict.channel,
                      retry_attempt=retry_attempt)
            return
        job = Job(verdict, received)
        if not self.pool.submit(job):
            EVENTS.labels(type=metric_type, outcome="rejected").inc()
            ANSWERS.labels(outcome="busy").inc()
            log_event(logging.WARNING, "answer", ref=job.ref, event_id=event_id, channel=verdict.channel,
                      user=verdict.user, outcome="busy", latency_ms=0)
            with contextlib.suppress(SlackClientError):
                post_message(self.web, channel=verdict.channel, thread_ts=verdict.thread_ts,
                             markdown=f"{BUSY_NOTICE} (ref `{job.ref}`)", metadata_type=NOTICE_METADATA, ref=job.ref)
            return
        EVENTS.labels(type=metric_type, outcome="accepted").inc()
        log_event(logging.INFO, "event_accepted", ref=job.ref, event_id=event_id, channel=verdict.channel,
                  user=verdict.user, kind=verdict.kind, retry_attempt=retry_attempt)
        log_event(logging.DEBUG, "question_text", ref=job.ref, text=verdict.text)

    # -- shutdown -----------------------------------------------------------------------------

    def shutdown(self, grace: float) -> bool:
        """Stop taking events, finish in-flight answers within ``grace`` s, close the socket.

        Returns True if every accepted question was answered.
        """
        self.health.stopping = True
        closer = None
        if self.client is not None:
            # close() takes 2-3 s; run it alongside the drain. Unacked events go elsewhere.
            client = self.client
            closer = threading.Thread(target=client.close, name="socket-close", daemon=True)
            closer.start()
        pending = self.pool.pending()
        log_event(logging.INFO, "draining", in_flight=pending, grace_s=grace)
        drained = self.pool.drain(grace)
        if not drained:
            log_event(logging.ERROR, "drain_timeout", unfinished=self.pool.pending())
        if closer is not None:
            closer.join(timeout=5)
        self._set_connected(False)
        return drained


def _warm_litellm() -> None:
    try:
        t0 = time.monotonic()
        _litellm()
        log_event(logging.DEBUG, "litellm_imported", latency_ms=round((time.monotonic() - t0) * 1000))
    except Exception:  # noqa: BLE001 - the first answer will report it properly
        log.exception("litellm_import_failed")


def run_check(config: Config, out: Any) -> int:
    """``--check``: Slack auth.test and one tiny gateway call; a PASS/FAIL report, exit 0/1."""
    ok = True

    def report(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {redact(detail)}", file=out)

    report("config", True, "all variables valid")
    web = make_web_client(config)
    try:
        me = fetch_identity(web)
        report("slack auth.test", True, f"bot user {me.user_id} in team {me.team_id}")
    except SlackApiError as e:
        report("slack auth.test", False, f"Slack refused the bot token ({e.response.get('error')})")
    except SlackClientError as e:
        report("slack auth.test", False, f"could not reach Slack at {config.slack_api_url} ({type(e).__name__})")
    except OSError as e:
        report("slack auth.test", False, f"could not reach Slack at {config.slack_api_url} ({type(e).__name__})")
    try:
        usage = Usage()
        text = "".join(stream_completion(
            config, [{"role": "user", "content": "Reply with the single word OK."}], usage))
        report("llm gateway", True, f"model {config.ledger_bot_model} answered ({len(text)} chars)")
    except LLMFailure as e:
        report("llm gateway", False, f"model {config.ledger_bot_model} at {config.litellm_base_url}: {e.kind} ({e.detail})")
    print("RESULT: " + ("PASS" if ok else "FAIL"), file=out)
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ledger_bot.py",
        description="ledger-bot: the BOR Write team's Slack assistant. Configuration comes from the environment (see README.md).",
    )
    parser.add_argument("--check", action="store_true",
                        help="validate configuration, call Slack auth.test and make one tiny gateway call; exit 0 if all pass, 1 otherwise")
    parser.add_argument("--version", action="version", version=f"ledger-bot {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None,
         stop: threading.Event | None = None) -> int:
    """Run the bot until SIGTERM/SIGINT (or ``stop`` is set); returns the process exit code.

    0: clean shutdown (or --check passed); 1: --check failed or Slack rejected a token;
    2: bad configuration.
    """
    args = parse_args(argv)
    environ = os.environ if environ is None else environ
    try:
        config = load_config(environ)
    except ConfigError as e:
        print("ledger-bot: invalid configuration:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        print("See README.md (Configuration) or .env.example.", file=sys.stderr)
        return EXIT_CONFIG
    redact.add_secrets(*(getattr(config, name.lower()) for name in SECRET_ENV_VARS))
    if args.check:
        setup_logging("ERROR", "text", sys.stderr)
        return run_check(config, sys.stdout)

    setup_logging(config.log_level, config.log_format)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    BUILD_INFO.labels(version=__version__, git_sha=config.ledger_bot_git_sha).set(1)
    health = Health()
    server = HealthServer(config.health_port, health).start()
    log_event(logging.INFO, "starting", version=__version__, git_sha=config.ledger_bot_git_sha,
              health_port=server.server_address[1], model=config.ledger_bot_model)
    threading.Thread(target=_warm_litellm, name="litellm-import", daemon=True).start()
    try:
        return _serve(config, health, stop)
    finally:
        server.shutdown()
        server.server_close()


def _serve(config: Config, health: Health, stop: threading.Event) -> int:
    web = make_web_client(config)
    me = None
    delay = 1.0
    while me is None and not stop.is_set():
        try:
            me = fetch_identity(web)
        except SlackApiError as e:
            code = e.response.get("error")
            if code in ("invalid_auth", "not_authed", "token_revoked", "account_inactive"):
                log_event(logging.ERROR, "slack_auth_failed", error=code,
                          hint="SLACK_BOT_TOKEN was rejected by Slack; check the secret")
                return 1
            log_event(logging.WARNING, "slack_auth_test_failed", error=code, retry_in_s=round(delay, 1))
        except (SlackClientError, OSError) as e:
            log_event(logging.WARNING, "slack_unreachable", error=type(e).__name__, retry_in_s=round(delay, 1))
        if me is None:
            stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 30.0)
    if me is None:
        log_event(logging.INFO, "stopped", reason="signal before start-up completed")
        return 0
    log_event(logging.INFO, "identity", user=me.user_id, bot_id=me.bot_id, team=me.team_id)
    bot = Bot(config, web, me, health)
    try:
        if not bot.connect(stop):
            bot.shutdown(config.ledger_bot_shutdown_grace_seconds)
            return 0
    except SlackApiError as e:
        log_event(logging.ERROR, "slack_auth_failed", error=e.response.get("error"),
                  hint="SLACK_APP_TOKEN was rejected by Slack; check the secret and that Socket Mode is enabled")
        return 1
    stop.wait()
    log_event(logging.INFO, "stop_requested")
    drained = bot.shutdown(config.ledger_bot_shutdown_grace_seconds)
    log_event(logging.INFO, "stopped", drained=drained)
    return 0


if __name__ == "__main__":
    sys.exit(main())

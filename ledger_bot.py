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
  - stream-flusher: shows buffered answer text when the model goes quiet (see Flusher).
  - socket-close: started at shutdown, so slack_sdk's slow close() runs alongside the drain.
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
import socket
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

__version__ = "0.1.0"

log = logging.getLogger("ledger_bot")


# ════════════════════════════════════════════════════════════════════════════════════════
# 1. Configuration
# ════════════════════════════════════════════════════════════════════════════════════════

SECRET_ENV_VARS = ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "LITELLM_DEVELOPER_KEY")
EXIT_CONFIG = 2
DEFAULT_KNOWLEDGE = Path(__file__).resolve().parent / "knowledge"


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
    ledger_bot_knowledge: Annotated[str, _setting("a readable .md/.txt file or a directory holding some")] = ""
    ledger_bot_knowledge_share: Annotated[float, _setting("a fraction between 0.05 and 0.9", ge=0.05, le=0.9)] = 0.5
    ledger_bot_streaming: Annotated[bool, _setting("true or false")] = True
    ledger_bot_stream_flush_chars: Count = 400
    ledger_bot_stream_flush_seconds: Seconds = 0.5
    ledger_bot_follow_ups: Annotated[bool, _setting("true or false")] = False
    ledger_bot_allowed_channels: Annotated[tuple[str, ...], _setting("comma-separated Slack channel ids")] = ()
    ledger_bot_allowed_users: Annotated[tuple[str, ...], _setting("comma-separated Slack user ids")] = ()
    ledger_bot_feedback: Annotated[bool, _setting("true or false")] = True
    ledger_bot_user_rate_limit: Annotated[int, _setting("a whole number >= 0 (0 = no limit)", ge=0)] = 10
    ledger_bot_user_rate_window_seconds: Seconds = 60.0
    ledger_bot_daily_budget_usd: Annotated[float, _setting("dollars >= 0 (0 = no limit)", ge=0)] = 50.0
    ledger_bot_user_daily_budget_usd: Annotated[float, _setting("dollars >= 0 (0 = no limit)", ge=0)] = 5.0
    ledger_bot_input_cost_per_mtok: Annotated[float, _setting("dollars per million tokens >= 0", ge=0)] = 3.0
    ledger_bot_output_cost_per_mtok: Annotated[float, _setting("dollars per million tokens >= 0", ge=0)] = 15.0
    ledger_bot_git_sha: str = "unknown"

    @property
    def knowledge_path(self) -> Path:
        """The knowledge file or folder; by default the ``knowledge/`` folder beside this module."""
        return Path(self.ledger_bot_knowledge) if self.ledger_bot_knowledge else DEFAULT_KNOWLEDGE


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
        raw = _normalise(field, environ.get(name, "").strip())
        if not raw:
            if field.required:
                problems.append(f"{name}: required but not set")
            continue
        value: Any = raw
        if getattr(_inner(field.type), "__origin__", None) is tuple:  # comma-separated list
            value = [item.strip() for item in raw.split(",") if item.strip()]
        try:
            values[field.name] = msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError:
            problems.append(f"{name}: invalid, expected {_describe(field.type)}")
    if "ledger_bot_knowledge" in values and not knowledge_files(Path(values["ledger_bot_knowledge"])):
        knowledge_field = next(f for f in msgspec.structs.fields(Config) if f.name == "ledger_bot_knowledge")
        problems.append(f"LEDGER_BOT_KNOWLEDGE: invalid, expected {_describe(knowledge_field.type)}")
    if problems:
        raise ConfigError(problems)
    return Config(**values)


def _normalise(field: msgspec.structs.FieldInfo, raw: str) -> str:
    """Accept settings as people type them: LOG_LEVEL=debug, LOG_FORMAT=JSON, FLAG=True."""
    if field.name == "log_level":
        return raw.upper()
    if field.name == "log_format" or _inner(field.type) is bool:
        return raw.lower()
    return raw


def _inner(annotation: Any) -> Any:
    """The type inside ``Annotated[...]``."""
    return getattr(annotation, "__origin__", annotation)


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


LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router")


def _tame_litellm_logging() -> None:
    """litellm's loggers carry their own stderr handler *and* propagate: every line twice and
    unredacted. Drop its handlers so its lines go through ours, once, redacted."""
    for name in LITELLM_LOGGERS:
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

ANSWER_OUTCOMES = ("ok", "timeout", "rate_limited", "gateway_error", "context_too_long", "slack_error", "busy",
                   "user_rate_limited", "budget_exhausted", "not_allowed", "internal_error")
# Every series exists from the start at 0, so rate() and increase() see the first event.
for _outcome in ANSWER_OUTCOMES:
    ANSWERS.labels(outcome=_outcome)
for _type in ("app_mention", "message", "block_actions", "other"):
    for _event_outcome in ("accepted", "ignored", "duplicate", "rejected"):
        EVENTS.labels(type=_type, outcome=_event_outcome)
for _kind in ("prompt", "completion"):
    LLM_TOKENS.labels(kind=_kind)
for _value in ("up", "down"):
    FEEDBACK.labels(value=_value)


# ════════════════════════════════════════════════════════════════════════════════════════
# 4. Health server
# ════════════════════════════════════════════════════════════════════════════════════════


class Health:
    """What the probes report. Written by the lifecycle code, read by the HTTP handler."""

    def __init__(self) -> None:
        self.connected = False
        self.stopping = False
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
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="health-http",
                         daemon=True).start()
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


# Slack errors that no retry can fix: the token itself was refused.
FATAL_AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "token_revoked", "account_inactive"})


def backoff_delays(first: float = 1.0, cap: float = 30.0) -> Iterator[float]:
    """Capped exponential backoff with ±20 % jitter: about 1, 2, 4, … 30, 30, … seconds."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, cap)


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


def fetch_thread_root(web: WebClient, *, channel: str, thread_ts: str) -> dict | None:
    """The first message of a thread (``conversations.replies`` limit 1), or None if gone."""
    resp = web.conversations_replies(channel=channel, ts=thread_ts, limit=1)
    messages = resp.get("messages") or []
    return messages[0] if messages else None


def message_metadata(metadata_type: str, ref: str) -> dict:
    """What the bot stamps on its messages: answer or notice, and the reference id."""
    return {"event_type": metadata_type, "event_payload": {"ref": ref}}


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
        metadata=message_metadata(metadata_type, ref),
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
        metadata=message_metadata(metadata_type, ref),
    )


def set_thinking_status(web: WebClient, *, channel: str, thread_ts: str) -> bool:
    """``assistant.threads.setStatus`` "is thinking…"; False if Slack refuses it.

    The status clears itself when the bot replies in the thread, so it is never cleared by hand.
    """
    try:
        web.assistant_threads_setStatus(channel_id=channel, thread_ts=thread_ts, status="is thinking…")
        return True
    except SlackApiError as e:
        log_event(logging.DEBUG, "status_refused", channel=channel, error=e.response.get("error"))
        return False


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
    kind: str  # "mention" | "dm" | "followup"
    channel: str
    user: str
    team: str
    text: str
    ts: str
    thread_ts: str  # where the reply goes: the event's thread, or the message itself
    in_thread: bool  # the message was already inside a thread (so there is history to read)


@dataclasses.dataclass(frozen=True)
class Ignored:
    reason: str  # unsupported_event, subtype, bot, own_message, not_addressed, mention_twin, malformed


_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")


def classify_event(event_type: str, event: SlackEvent, event_id: str, team_id: str, me: BotIdentity,
                   *, follow_ups: bool = False) -> Question | Ignored:
    """Decide whether an Events API event is a question for the bot.

    ``app_mention`` -> a question in its thread; ``message`` in a DM (``channel_type: im``) ->
    a question threaded under it. With ``follow_ups``, a channel message inside a thread is a
    "followup" question (the worker checks that the thread started with a mention of the bot).
    Other bots, the bot itself, edits, deletions and every other subtype are ignored, as are
    other channel messages and channel messages that mention the bot (their ``app_mention``
    twin is the one answered).
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
    kind = "mention" if event_type == "app_mention" else "dm"
    if event_type == "message" and event.channel_type != "im":
        if f"<@{me.user_id}" in event.text:
            return Ignored("mention_twin")
        if not (follow_ups and event.thread_ts and event.thread_ts != event.ts):
            return Ignored("not_addressed")
        kind = "followup"
    return Question(
        event_id=event_id,
        kind=kind,
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


class QuestionTooLong(Exception):
    """The question alone (with the system prompt and knowledge) does not fit the context."""


def build_llm_messages(
    *, question: Question, thread: list[dict], me: BotIdentity, system_prompt: str,
    max_messages: int, max_chars: int, knowledge: KnowledgeChoice | None = None,
    token_budget: int | None = None, count_tokens: Callable[[str], int] = len,
) -> list[dict]:
    """Turn a Slack thread into chat messages for the model.

    The bot's earlier answers become ``assistant`` turns; everyone else is ``user``, prefixed
    with their mention so the model can tell people apart; the bot's own mention is stripped.
    Notices (error, busy) and messages after the question are left out. The question is always
    the last turn. History is bounded by ``max_messages``, ``max_chars`` and, when given,
    ``token_budget`` (the whole prompt, counted with ``count_tokens``): the oldest messages go
    first, never the question; if even the question does not fit, QuestionTooLong is raised.
    Consecutive turns of one role are merged (Claude wants them alternating).
    """
    system = _system_message(system_prompt, knowledge)
    asked = ("user", f"<@{question.user}>: {strip_mention(question.text, me.user_id)}")
    history = [t for msg in thread
               if msg.get("ts") != question.ts and _ts_key(msg.get("ts", "0")) < _ts_key(question.ts)
               and (t := _thread_turn(msg, me))]
    history = history[-(max_messages - 1):] if max_messages > 1 else []
    chars_left = max_chars - len(asked[1])
    tokens_left = None
    if token_budget is not None:
        tokens_left = token_budget - count_tokens(system_prompt) - count_tokens(knowledge.text if knowledge else "")
        tokens_left -= count_tokens(asked[1]) + 8
        if tokens_left < 0:
            raise QuestionTooLong()
    kept: list[tuple[str, str]] = []
    for role, text in reversed(history):
        if len(text) > chars_left:
            break
        if tokens_left is not None:
            cost = count_tokens(text) + 4  # + per-message framing
            if cost > tokens_left:
                break
            tokens_left -= cost
        kept.append((role, text))
        chars_left -= len(text)
    kept.reverse()
    kept.append(asked)
    while kept[0][0] == "assistant":  # the conversation must open with a user turn
        kept.pop(0)
    merged: list[dict] = []
    for role, text in kept:
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n\n" + text
        else:
            merged.append({"role": role, "content": text})
    return [system, *merged]


def _system_message(system_prompt: str, knowledge: KnowledgeChoice | None) -> dict:
    """The system turn; knowledge rides in its own block. The whole knowledge base is the same
    for every question, so it is marked for prompt caching; a per-question selection is not."""
    if knowledge is None or not knowledge.text:
        return {"role": "system", "content": system_prompt}
    heading = ("Team knowledge (the whole knowledge base):" if knowledge.whole
               else "Team knowledge (the sections most relevant to this thread):")
    block: dict[str, Any] = {"type": "text", "text": f"{heading}\n\n{knowledge.text}"}
    if knowledge.whole:
        block["cache_control"] = {"type": "ephemeral"}
    return {"role": "system", "content": [{"type": "text", "text": system_prompt}, block]}


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
# 7. Knowledge
# ════════════════════════════════════════════════════════════════════════════════════════
# The team's documents (LEDGER_BOT_KNOWLEDGE). When they fit their share of the context they
# go whole into the system prompt, marked for prompt caching; otherwise each question gets the
# best-matching sections by BM25, each labelled with its file and heading so answers can cite.

KNOWLEDGE_SUFFIXES = (".md", ".txt")


def knowledge_files(path: Path) -> list[Path]:
    """The knowledge files under ``path`` (a file or a folder, searched recursively), sorted."""
    if path.is_file():
        return [path] if path.suffix.lower() in KNOWLEDGE_SUFFIXES else []
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWLEDGE_SUFFIXES)
    return []


@dataclasses.dataclass(frozen=True)
class Section:
    source: str  # file path relative to the knowledge root
    heading: str  # the heading trail, e.g. "Runbook > Restarting"
    text: str

    @property
    def label(self) -> str:
        return f"{self.source} § {self.heading}" if self.heading else self.source

    def render(self) -> str:
        return f"<document source=\"{self.label}\">\n{self.text.strip()}\n</document>"


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def split_sections(source: str, text: str) -> list[Section]:
    """Split a Markdown document at its headings; text before the first heading is a section too.
    Headings inside fenced code blocks are not headings."""
    sections: list[Section] = []
    trail: list[str] = []
    lines: list[str] = []
    in_fence = False

    def close() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(source, " > ".join(trail), body))
        lines.clear()

    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match:
            close()
            level = len(match.group(1))
            trail[:] = trail[: level - 1] + [match.group(2)]
        lines.append(line)
    close()
    return sections


def load_knowledge(path: Path) -> list[Section]:
    """Read every knowledge file under ``path`` into sections (UTF-8, undecodable bytes replaced)."""
    root = path if path.is_dir() else path.parent
    sections: list[Section] = []
    for file in knowledge_files(path):
        text = file.read_text(encoding="utf-8", errors="replace")
        sections.extend(split_sections(str(file.relative_to(root)), text))
    return sections


_WORD = re.compile(r"[a-z0-9_]{2,}")


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rank_sections(sections: list[Section], query: str, *, k1: float = 1.5, b: float = 0.75) -> list[Section]:
    """Sections ordered by BM25 relevance to ``query`` (ties keep document order); sections
    sharing no term with the query are left out."""
    docs = [_terms(s.label + " " + s.text) for s in sections]
    if not docs:
        return []
    avg_len = sum(len(d) for d in docs) / len(docs) or 1.0
    doc_freq: collections.Counter[str] = collections.Counter()
    for d in docs:
        doc_freq.update(set(d))
    query_terms = set(_terms(query))
    scored = []
    for index, d in enumerate(docs):
        counts = collections.Counter(d)
        score = 0.0
        for term in query_terms:
            tf = counts.get(term, 0)
            if tf:
                idf = math.log(1 + (len(docs) - doc_freq[term] + 0.5) / (doc_freq[term] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg_len))
        if score > 0:
            scored.append((-score, index))
    return [sections[i] for _, i in sorted(scored)]


@dataclasses.dataclass(frozen=True)
class KnowledgeChoice:
    """What goes into the system prompt: the text, whether it is the whole (cacheable) base,
    and which sections were chosen."""

    text: str
    whole: bool
    labels: tuple[str, ...]


def choose_knowledge(sections: list[Section], section_tokens: list[int], query: str, budget: int) -> KnowledgeChoice:
    """All sections if they fit ``budget`` tokens; else the most relevant ones that fit."""
    if sum(section_tokens) <= budget:
        return KnowledgeChoice("\n\n".join(s.render() for s in sections), True, tuple(s.label for s in sections))
    tokens_of = {id(s): t for s, t in zip(sections, section_tokens)}
    chosen: list[Section] = []
    left = budget
    for section in rank_sections(sections, query):
        cost = tokens_of[id(section)]
        if cost <= left:
            chosen.append(section)
            left -= cost
    order = {id(s): i for i, s in enumerate(sections)}
    chosen.sort(key=lambda s: order[id(s)])
    return KnowledgeChoice("\n\n".join(s.render() for s in chosen), False, tuple(s.label for s in chosen))


class KnowledgeBase:
    """The loaded sections plus their token counts, counted once on first use (counting needs
    litellm, which is not imported at start-up)."""

    def __init__(self, sections: list[Section]):
        self.sections = sections
        self._tokens: list[int] | None = None
        self._lock = threading.Lock()

    def choose(self, query: str, budget: int, count: Callable[[str], int]) -> KnowledgeChoice:
        with self._lock:
            if self._tokens is None:
                self._tokens = [count(s.render()) for s in self.sections]
        return choose_knowledge(self.sections, self._tokens, query, budget)


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
                # litellm attaches its own stdout handler while importing and logs through it
                # at DEBUG; hold its loggers at WARNING until _tame_litellm_logging reroutes them.
                for name in LITELLM_LOGGERS:
                    logging.getLogger(name).setLevel(logging.WARNING)
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
    cached_tokens: int = 0

    def cost_usd(self, config: Config) -> float:
        """Dollars for this answer at the configured prices; cached prompt tokens are billed
        at a tenth of the input price (Anthropic's cache-read rate)."""
        per_in = config.ledger_bot_input_cost_per_mtok / 1e6
        fresh = max(0, self.prompt_tokens - self.cached_tokens)
        return (fresh * per_in + self.cached_tokens * per_in * 0.1
                + self.completion_tokens * config.ledger_bot_output_cost_per_mtok / 1e6)


def model_id(config: Config) -> str:
    return f"litellm_proxy/{config.ledger_bot_model}"


_registered: set[str] = set()


def register_alias(config: Config) -> None:
    """Tell litellm the gateway alias's real limits and prices, so ``token_counter`` and cost
    bookkeeping know it (an unknown alias also makes litellm do extra work on every chunk)."""
    name = model_id(config)
    if name in _registered:
        return
    per_in = config.ledger_bot_input_cost_per_mtok / 1e6
    _litellm().register_model({name: {
        "max_input_tokens": config.ledger_bot_context_tokens,
        "max_output_tokens": config.ledger_bot_max_output_tokens,
        "input_cost_per_token": per_in,
        "output_cost_per_token": config.ledger_bot_output_cost_per_mtok / 1e6,
        "cache_read_input_token_cost": per_in * 0.1,
        "cache_creation_input_token_cost": per_in * 1.25,
        "litellm_provider": "litellm_proxy",
        "mode": "chat",
    }})
    _registered.add(name)


def token_counter(config: Config) -> Callable[[str], int]:
    """Count tokens of a text the way litellm does for the registered alias."""
    lm = _litellm()
    register_alias(config)
    name = model_id(config)
    return lambda text: lm.token_counter(model=name, text=text) if text else 0


def classify_llm_error(exc: BaseException) -> LLMFailure:
    """Map a litellm/openai exception to an outcome kind. Never includes the exception's text
    in anything user-facing; ``detail`` is for the log only (and redacted there)."""
    import httpx
    import openai

    lm = _litellm()
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    # litellm's exceptions subclass openai's; errors raised mid-stream by the provider's raw
    # stream (see stream_completion) are openai's or httpx's own.
    if isinstance(exc, lm.ContextWindowExceededError):
        kind = "context_too_long"
    elif isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)) or status == 408:
        kind = "timeout"
    elif isinstance(exc, openai.RateLimitError) or status == 429:
        kind = "rate_limited"
    else:
        kind = "gateway_error"
    return LLMFailure(kind, f"{name} status={status}")


def stream_completion(config: Config, messages: list[dict], usage: Usage) -> Iterator[str]:
    """Stream the answer's text from the gateway, filling ``usage`` when the gateway reports it.

    Every setting is passed per call (litellm's module globals race between threads).
    ``max_retries`` retries connection errors and 429/5xx *before* the first token only.
    Raises LLMFailure.

    litellm makes the call (routing, auth, retries, error mapping), but the chunks are read
    from the provider's own stream (``completion_stream``), not through litellm's
    CustomStreamWrapper: measured against the fake gateway, the wrapper costs ~75 ms of CPU per
    200-chunk answer against ~25 ms (per-chunk model rebuilding, logging and cost bookkeeping),
    and it raises InternalServerError when a model legitimately repeats a chunk (table rows,
    repeated code). If a litellm release drops the attribute, the wrapper is used as before.
    """
    lm = _litellm()
    register_alias(config)
    deadline = time.monotonic() + ANSWER_HARD_LIMIT_SECONDS
    try:
        response = lm.completion(
            model=model_id(config),
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
        for chunk in getattr(response, "completion_stream", None) or response:
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
                details = getattr(chunk_usage, "prompt_tokens_details", None)
                usage.cached_tokens = getattr(details, "cached_tokens", None) or usage.cached_tokens
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

# Slack documents 12,000 characters for a markdown block and for markdown_text, but rejects a
# message whose blocks add up to ~13,000 in a way that depends on the content
# (msg_blocks_too_long, slackapi/bolt-js#2509). Messages are therefore cut at 11,000, which
# leaves room for the feedback buttons and for escaping; a streamed message rolls over a
# little earlier still, so a closing code fence always fits.
MARKDOWN_LIMIT = 11_000
_ROLLOVER_RESERVE = 16
_SOFT_ZONE = 2_000  # a streamed message ends at a paragraph break found this close to the limit
PLACEHOLDER_TEXT = "_Thinking…_"
EMPTY_ANSWER = "(The model returned an empty answer. Please try rephrasing the question.)"
FEEDBACK_ACTIONS = {"feedback_up": "up", "feedback_down": "down"}


def feedback_blocks(ref: str) -> list[dict]:
    """👍/👎 buttons; the clicked button's value is the answer's reference id."""
    return [{"type": "actions", "block_id": "ledger_bot_feedback", "elements": [
        {"type": "button", "action_id": "feedback_up", "value": ref,
         "text": {"type": "plain_text", "text": "👍 Helpful", "emoji": True}},
        {"type": "button", "action_id": "feedback_down", "value": ref,
         "text": {"type": "plain_text", "text": "👎 Not helpful", "emoji": True}},
    ]}]


class Reply:
    """One reply in one thread: visible feedback first, then the answer, whole and in order.

    Feedback is the assistant "is thinking…" status, or, when Slack refuses it, a placeholder
    message that the answer then fills in. Text is streamed with chat.startStream /
    appendStream / stopStream, flushed when ``flush_chars`` are buffered or ``flush_seconds``
    have passed since the last flush (the first text goes at once; a shared Flusher thread
    covers the time while the model is silent), and rolled over to a new message before
    Slack's 12,000-character limit. slack_sdk's
    ChatStream helper is not used because it flushes on size only and hides how much text
    reached Slack when a call fails.

    If streaming is off, refused or dies mid-way (``message_not_in_streaming_state`` after
    ~5 minutes, ``method_not_supported…``, any error) the reply continues with chat.update /
    chat.postMessage from exactly the text Slack already shows: nothing lost, nothing doubled,
    no spinner left behind. Slack errors that even the fallback cannot absorb escape as
    SlackClientError.
    """

    def __init__(self, web: WebClient, question: Question, ref: str, *, streaming: bool, flush_chars: int,
                 flush_seconds: float, feedback: bool, received: float):
        self.web = web
        self.q = question
        self.ref = ref
        self.use_stream = streaming
        self.flush_chars = flush_chars
        self.flush_seconds = flush_seconds
        self.feedback = feedback
        self.received = received
        self.visible_ts: str | None = None  # the message being written: a stream or a placeholder
        self.visible_text = ""  # what Slack shows in that message
        self.stream_open = False
        self.pending = ""  # text from the model that Slack does not show yet
        self.last_flush = 0.0
        self.last_update = 0.0
        self.shown_any = False
        self.closed = False
        # The worker adds text; the Flusher thread may flush it when the model goes quiet.
        self.lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------

    def show_feedback(self) -> None:
        """Status if Slack allows it, else a placeholder (then no streaming: the placeholder is
        updated in place instead)."""
        if set_thinking_status(self.web, channel=self.q.channel, thread_ts=self.q.thread_ts):
            return
        self.visible_ts = post_message(self.web, channel=self.q.channel, thread_ts=self.q.thread_ts,
                                       markdown=PLACEHOLDER_TEXT, metadata_type=NOTICE_METADATA, ref=self.ref)
        self.use_stream = False

    def add(self, text: str) -> None:
        with self.lock:
            self.pending += text
            if not self.shown_any or len(self.pending) >= self.flush_chars or self._time_due():
                self._flush(final=False)

    def flush_if_due(self) -> None:
        """Called by the Flusher thread: flush text that has waited ``flush_seconds`` while the
        model is silent. Skips if the worker is busy with this reply right now."""
        if self.lock.acquire(blocking=False):
            try:
                if self.pending and not self.closed and self._time_due():
                    self._flush(final=False)
            except SlackClientError:
                pass  # the worker's next flush meets the same error and falls back
            finally:
                self.lock.release()

    def _time_due(self) -> bool:
        return time.monotonic() - self.last_flush >= self.flush_seconds

    def finish(self) -> None:
        """Deliver everything still pending and close the reply (feedback buttons last)."""
        with self.lock:
            self.closed = True
            if not (self.shown_any or self.pending.strip()):
                self.pending = EMPTY_ANSWER
            self._flush(final=True, metadata_type=ANSWER_METADATA, feedback=self.feedback)

    def fail(self, notice: str) -> None:
        """End the reply with ``notice`` after whatever text was already shown."""
        with self.lock:
            self.closed = True
            self.pending += ("\n\n" if self.shown_any or self.pending else "") + notice
            self._flush(final=True, metadata_type=NOTICE_METADATA, feedback=False)

    # -- flushing ----------------------------------------------------------------------------

    def _flush(self, *, final: bool, metadata_type: str = ANSWER_METADATA, feedback: bool = False) -> None:
        self.last_flush = time.monotonic()
        if self.use_stream:
            try:
                self._flush_stream(final, metadata_type, feedback)
                return
            except SlackClientError as e:
                log_event(logging.WARNING, "stream_fallback", ref=self.ref, channel=self.q.channel,
                          error=_slack_error_code(e))
                self.use_stream = False
                self.stream_open = False
        self._flush_messages(final, metadata_type, feedback)

    def _shown(self, text: str) -> None:
        if text and not self.shown_any:
            self.shown_any = True
            FIRST_TOKEN.observe(time.monotonic() - self.received)

    def _flush_stream(self, final: bool, metadata_type: str, feedback: bool) -> None:
        limit = MARKDOWN_LIMIT - _ROLLOVER_RESERVE
        while (cut := self._rollover_cut(limit)) is not None:
            head, tail = self.pending[:cut], self.pending[cut:]
            fence = _open_fence(self.visible_text + head)
            self._stream_send(head + ("" if fence is None else ("" if head.endswith("\n") else "\n") + FENCE_CLOSE))
            self.pending = ("" if fence is None else fence + "\n") + tail
            self._stream_stop(ANSWER_METADATA, feedback=False)
        if self.pending:
            self._stream_send(self.pending)
            self.pending = ""
        if final and self.stream_open:
            self._stream_stop(metadata_type, feedback)

    def _rollover_cut(self, limit: int) -> int | None:
        """Where in ``pending`` to end the current streamed message, or None to keep going.

        Streamed text cannot be taken back, so the cut is chosen as the message nears the
        limit: at the first paragraph break in its last ``_SOFT_ZONE`` characters, or, if none
        came before the limit, at the best line break or space that still fits."""
        used = len(self.visible_text)
        if used + len(self.pending) <= limit - _SOFT_ZONE:
            return None
        room = max(0, limit - used)
        at = self.pending.find("\n\n", max(0, limit - _SOFT_ZONE - used), room)
        if at >= 0:
            return at + 2
        if used + len(self.pending) > limit:
            return _best_cut(self.pending[:room]) if room > 0 else 0
        return None

    def _stream_send(self, text: str) -> None:
        if not text:
            return
        if not self.stream_open:
            resp = self.web.chat_startStream(
                channel=self.q.channel, thread_ts=self.q.thread_ts, markdown_text=text,
                recipient_user_id=self.q.user, recipient_team_id=self.q.team or None)
            self.visible_ts, self.visible_text, self.stream_open = resp["ts"], "", True
        else:
            self.web.chat_appendStream(channel=self.q.channel, ts=self.visible_ts, markdown_text=text)
        self.visible_text += text
        self._shown(text)

    def _stream_stop(self, metadata_type: str, feedback: bool) -> None:
        self.web.chat_stopStream(
            channel=self.q.channel, ts=self.visible_ts,
            blocks=feedback_blocks(self.ref) if feedback else None,
            metadata=message_metadata(metadata_type, self.ref))
        self.visible_ts, self.visible_text, self.stream_open = None, "", False

    def _flush_messages(self, final: bool, metadata_type: str, feedback: bool) -> None:
        """Without a stream: grow the visible message in place while it fits (chat.update, at
        most once a second), and at the end split what is left into posted messages."""
        if not final:
            combined = self.visible_text + self.pending
            if (self.visible_ts and len(combined) <= MARKDOWN_LIMIT
                    and time.monotonic() - self.last_update >= max(1.0, self.flush_seconds)):
                self.last_update = time.monotonic()
                with contextlib.suppress(SlackClientError):  # the final flush tries again
                    update_message(self.web, channel=self.q.channel, ts=self.visible_ts, markdown=combined,
                                   metadata_type=NOTICE_METADATA, ref=self.ref)
                    self.visible_text, self.pending = combined, ""
                    self._shown(combined)
            return
        rest: list[str]
        if self.visible_ts:
            pieces = split_message(self.visible_text + self.pending, MARKDOWN_LIMIT)
            try:
                update_message(self.web, channel=self.q.channel, ts=self.visible_ts, markdown=pieces[0],
                               metadata_type=metadata_type, ref=self.ref,
                               extra_blocks=feedback_blocks(self.ref) if feedback and len(pieces) == 1 else None)
                self._shown(pieces[0])
                rest = pieces[1:]
            except SlackClientError as e:
                # The message keeps what it shows; post only what it does not show yet.
                log_event(logging.WARNING, "update_failed", ref=self.ref, error=_slack_error_code(e))
                fence = _open_fence(self.visible_text)
                leftover = ("" if fence is None else fence + "\n") + self.pending
                rest = split_message(leftover, MARKDOWN_LIMIT) if self.pending.strip() else []
            self.visible_ts, self.visible_text = None, ""
        else:
            rest = split_message(self.pending, MARKDOWN_LIMIT) if self.pending.strip() else []
        for i, piece in enumerate(rest):
            post_message(self.web, channel=self.q.channel, thread_ts=self.q.thread_ts, markdown=piece,
                         metadata_type=metadata_type, ref=self.ref,
                         extra_blocks=feedback_blocks(self.ref) if feedback and i == len(rest) - 1 else None)
            self._shown(piece)
        self.pending = ""


class Flusher:
    """One thread for all replies: every ``interval`` it flushes replies whose buffered text
    has waited too long because the model went quiet, so a slow model never leaves text
    sitting in a buffer. Replies register while they are being written."""

    def __init__(self, interval: float):
        self.interval = interval
        self._replies: set[Reply] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="stream-flusher", daemon=True).start()

    @contextlib.contextmanager
    def watching(self, reply: Reply) -> Iterator[Reply]:
        with self._lock:
            self._replies.add(reply)
        try:
            yield reply
        finally:
            with self._lock:
                self._replies.discard(reply)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                replies = list(self._replies)
            for reply in replies:
                try:
                    reply.flush_if_due()
                except Exception:  # noqa: BLE001 - the flusher must outlive any one reply
                    log.exception("flush_failed")


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
NOT_ALLOWED_NOTICE = ("Sorry, I'm not enabled here: this channel or user is not on my allow-list. "
                      "The BOR Write team (@bor-write-eng) can enable it.")


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


class Limits:
    """Per-user rate limit and daily dollar budgets (per user and in total), in memory.

    They hold per process: with N replicas the effective limits are N times these (Slack
    spreads events across connections), and a restart forgets today's spend. ``admit`` is
    called before a question is queued; ``spend`` after it is answered.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._asked: dict[str, collections.deque[float]] = {}
        self._day = ""
        self._spent_total = 0.0
        self._spent_by_user: dict[str, float] = {}

    def _today(self) -> str:
        day = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc).date().isoformat()
        if day != self._day:
            self._day, self._spent_total, self._spent_by_user = day, 0.0, {}
        return day

    def admit(self, user: str) -> tuple[str, str] | None:
        """None if ``user`` may ask now (and count it), else (outcome, notice)."""
        c = self.config
        now = self.clock()
        with self._lock:
            self._today()
            if c.ledger_bot_daily_budget_usd and self._spent_total >= c.ledger_bot_daily_budget_usd:
                return "budget_exhausted", ("Sorry, today's LLM budget for ledger-bot is spent. "
                                            "It resets at 00:00 UTC; please ask again then.")
            if c.ledger_bot_user_daily_budget_usd and self._spent_by_user.get(user, 0.0) >= c.ledger_bot_user_daily_budget_usd:
                return "budget_exhausted", ("Sorry, you've used today's per-person LLM budget for ledger-bot. "
                                            "It resets at 00:00 UTC.")
            if c.ledger_bot_user_rate_limit:
                window = c.ledger_bot_user_rate_window_seconds
                asked = self._asked.setdefault(user, collections.deque())
                while asked and asked[0] <= now - window:
                    asked.popleft()
                if len(asked) >= c.ledger_bot_user_rate_limit:
                    wait = max(1, math.ceil(asked[0] + window - now))
                    return "user_rate_limited", (f"You've asked {len(asked)} questions in the last "
                                                 f"{_duration(window)}. Please try again in {_duration(wait)}.")
                asked.append(now)
            if len(self._asked) > 10_000:  # forget idle users so memory stays bounded
                for u in [u for u, q in self._asked.items() if not q or q[-1] <= now - c.ledger_bot_user_rate_window_seconds]:
                    del self._asked[u]
        return None

    def spend(self, user: str, usd: float) -> None:
        with self._lock:
            self._today()
            self._spent_total += usd
            self._spent_by_user[user] = self._spent_by_user.get(user, 0.0) + usd


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{round(seconds / 60)} minutes"


class Answerer:
    """Turns one Question into one reply in its thread; every failure becomes a notice."""

    def __init__(self, config: Config, web: WebClient, me: BotIdentity, knowledge: KnowledgeBase, limits: Limits):
        self.config = config
        self.web = web
        self.me = me
        self.knowledge = knowledge
        self.limits = limits
        self.bot_threads = SeenSet(ttl_seconds=7 * 24 * 3600)  # threads the bot answered in
        self.flusher = Flusher(interval=min(0.1, config.ledger_bot_stream_flush_seconds / 2))

    def answer(self, job: Job) -> str:
        """Answer ``job``; returns the outcome (also logged and counted)."""
        q = job.question
        c = self.config
        if q.kind == "followup":
            if not self._thread_started_with_mention(q):
                log_event(logging.DEBUG, "followup_ignored", ref=job.ref, channel=q.channel)
                return "ignored"
            refusal = self.limits.admit(q.user)
            if refusal is not None:
                self.refuse(job, *refusal)
                return refusal[0]
        usage = Usage()
        reply = Reply(self.web, q, job.ref, streaming=c.ledger_bot_streaming,
                      flush_chars=c.ledger_bot_stream_flush_chars, flush_seconds=c.ledger_bot_stream_flush_seconds,
                      feedback=c.ledger_bot_feedback, received=job.received)
        outcome, error, sections = "ok", None, 0
        try:
            reply.show_feedback()
            FIRST_FEEDBACK.observe(time.monotonic() - job.received)
            thread = (fetch_thread(self.web, channel=q.channel, thread_ts=q.thread_ts,
                                   max_messages=c.ledger_bot_history_max_messages) if q.in_thread else [])
            count = token_counter(c)
            query = " ".join([q.text, *(m.get("text") or "" for m in thread[-4:])])
            choice = self.knowledge.choose(query, int(c.ledger_bot_context_tokens * c.ledger_bot_knowledge_share), count)
            sections = len(choice.labels)
            log_event(logging.DEBUG, "knowledge_chosen", ref=job.ref, whole=choice.whole, sections=list(choice.labels))
            messages = build_llm_messages(
                question=q, thread=thread, me=self.me, system_prompt=SYSTEM_PROMPT,
                max_messages=c.ledger_bot_history_max_messages, max_chars=c.ledger_bot_history_max_chars,
                knowledge=choice, token_budget=c.ledger_bot_context_tokens - c.ledger_bot_max_output_tokens,
                count_tokens=count)
            log_event(logging.DEBUG, "llm_request", ref=job.ref, messages=messages[1:])
            with self.flusher.watching(reply):
                for text in stream_completion(c, messages, usage):
                    reply.add(text)
            reply.finish()
            if c.ledger_bot_follow_ups:  # only follow-ups need to know where the bot answered
                self.bot_threads.add(f"{q.channel}:{q.thread_ts}")
        except QuestionTooLong:
            outcome, error = "context_too_long", "question exceeds the prompt budget"
        except LLMFailure as e:
            outcome, error = e.kind, e.detail
        except SlackClientError as e:
            outcome, error = "slack_error", _slack_error_code(e)
        except Exception as e:  # noqa: BLE001 - a bug must still produce a reply and a log line
            outcome, error = "internal_error", type(e).__name__
            log.exception("answer_crashed", extra={"fields": {"ref": job.ref}})
        if outcome != "ok":
            try:
                reply.fail(failure_notice(outcome, job.ref))
            except SlackClientError as e:
                log_event(logging.ERROR, "failure_notice_undeliverable", ref=job.ref, error=_slack_error_code(e))
        self._record(job, outcome, error, usage, sections)
        return outcome

    def refuse(self, job: Job, outcome: str, notice: str | None) -> None:
        """Turn a question away: count and log it, and post ``notice`` (if any) in its thread."""
        q = job.question
        ANSWERS.labels(outcome=outcome).inc()
        log_event(logging.WARNING if outcome == "busy" else logging.INFO, "answer", ref=job.ref, channel=q.channel,
                  user=q.user, latency_ms=0, outcome=outcome, event_id=q.event_id, kind=q.kind)
        if notice:
            try:
                post_message(self.web, channel=q.channel, thread_ts=q.thread_ts, markdown=f"{notice} (ref `{job.ref}`)",
                             metadata_type=NOTICE_METADATA, ref=job.ref)
            except SlackClientError as e:
                log_event(logging.ERROR, "failure_notice_undeliverable", ref=job.ref, error=_slack_error_code(e))

    def _thread_started_with_mention(self, q: Question) -> bool:
        """Follow-ups: is this channel thread one the bot was mentioned in at its start?"""
        if not self.bot_threads.add(f"{q.channel}:{q.thread_ts}"):
            return True  # the bot has answered in this thread already
        try:
            root = fetch_thread_root(self.web, channel=q.channel, thread_ts=q.thread_ts)
        except SlackClientError:
            root = None
        started = root is not None and f"<@{self.me.user_id}" in (root.get("text") or "")
        if not started:
            self.bot_threads.forget(f"{q.channel}:{q.thread_ts}")
        return started

    def _record(self, job: Job, outcome: str, error: str | None, usage: Usage, sections: int) -> None:
        latency = time.monotonic() - job.received
        cost = usage.cost_usd(self.config)
        self.limits.spend(job.question.user, cost)
        ANSWERS.labels(outcome=outcome).inc()
        ANSWER_DURATION.observe(latency)
        LLM_TOKENS.labels(kind="prompt").inc(usage.prompt_tokens)
        LLM_TOKENS.labels(kind="completion").inc(usage.completion_tokens)
        LLM_COST.inc(cost)
        log_event(
            logging.INFO if outcome == "ok" else logging.WARNING, "answer",
            ref=job.ref, channel=job.question.channel, user=job.question.user,
            latency_ms=round(latency * 1000),
            tokens={"prompt": usage.prompt_tokens, "completion": usage.completion_tokens, "cached": usage.cached_tokens},
            cost_usd=round(cost, 6), outcome=outcome, error=error,
            event_id=job.question.event_id, kind=job.question.kind, knowledge_sections=sections,
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

    def forget(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


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


_ENVELOPE_ID = re.compile(r'"envelope_id"\s*:\s*"([^"]+)"')


class Bot:
    """Wires Socket Mode to the worker pool and keeps /ready honest about the connection."""

    def __init__(self, config: Config, web: WebClient, me: BotIdentity, health: Health, knowledge: KnowledgeBase):
        self.config = config
        self.web = web
        self.me = me
        self.health = health
        self.limits = Limits(config)
        self.answerer = Answerer(config, web, me, knowledge, self.limits)
        self.seen = SeenSet()
        self.told_not_allowed = SeenSet(ttl_seconds=24 * 3600)
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
        delays = backoff_delays()
        while not stop.is_set():
            try:
                client.connect()
                return True
            except Exception as e:  # noqa: BLE001 - Slack down, rate limited, DNS: all retried
                if isinstance(e, SlackApiError) and e.response.get("error") in FATAL_AUTH_ERRORS:
                    raise
                wait = next(delays)
                log_event(logging.WARNING, "slack_connect_failed", error=_slack_error_code(e), retry_in_s=round(wait, 1))
                stop.wait(wait)
        return False

    def _on_frame(self, raw: str) -> None:
        """Runs on the socket's reader thread for every frame: must be cheap and never raise
        (an exception here drops the rest of that read's frames).

        Envelopes are acked here, before anything else: handing the ack to slack_sdk's message
        queue and then its listener pool costs two thread switches, each waiting for the
        interpreter lock while workers stream answers (measured: ack p99 of seconds under
        load). After SIGTERM nothing is acked, so Slack redelivers to another connection.
        """
        try:
            now = time.monotonic()
            m = _ENVELOPE_ID.search(raw)
            if m:
                self._frame_arrivals.append((m.group(1), now))
                if not self.health.stopping and self.client is not None:
                    self.client.send_socket_mode_response({"envelope_id": m.group(1)})
                    ACK_LATENCY.observe(time.monotonic() - now)
            if '"hello"' in raw:
                if json.loads(raw).get("type") == "hello":
                    self._hellos += 1
                    if self._hellos > 1:
                        SOCKET_RECONNECTS.inc()
                    self._set_connected(True)
                    self._no_delay()
                    log_event(logging.INFO, "slack_connected", connections=self._hellos)
            elif '"disconnect"' in raw and json.loads(raw).get("type") == "disconnect":
                self._set_connected(False)
                log_event(logging.INFO, "slack_disconnect_requested")
        except Exception:  # noqa: BLE001
            log.debug("frame_inspect_failed", exc_info=True)

    def _no_delay(self) -> None:
        """TCP_NODELAY on the Socket Mode socket (slack_sdk sets it only behind a proxy): each
        ack is one small write, and Nagle would hold it until Slack ACKs the previous one."""
        sock = getattr(getattr(self.client, "current_session", None), "sock", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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
        """Classify and enqueue an envelope that ``_on_frame`` has already acked. Runs on
        slack_sdk's listener pool. After SIGTERM nothing is taken on (nor acked): Slack then
        redelivers the event to another connection, so nothing is lost."""
        if self.health.stopping:
            return
        received = self._arrival(req.envelope_id)
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
        """Decide what to do with one acked envelope: ignore, drop as duplicate, refuse with a
        notice (not allowed, rate limited, over budget, busy), or queue for a worker."""
        if envelope_type == "interactive" and payload.get("type") == "block_actions":
            self._on_block_actions(payload)
            return
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
        verdict = classify_event(event_type, event, event_id, str(payload.get("team_id") or ""), self.me,
                                 follow_ups=self.config.ledger_bot_follow_ups)
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
        refusal = self._refusal(verdict)
        if refusal is None and not self.pool.submit(job):
            refusal = ("busy", BUSY_NOTICE)
        if refusal is not None:
            outcome, notice = refusal
            EVENTS.labels(type=metric_type, outcome="rejected").inc()
            self.answerer.refuse(job, outcome, notice)
            return
        EVENTS.labels(type=metric_type, outcome="accepted").inc()
        log_event(logging.INFO, "event_accepted", ref=job.ref, event_id=event_id, channel=verdict.channel,
                  user=verdict.user, kind=verdict.kind, retry_attempt=retry_attempt)
        log_event(logging.DEBUG, "question_text", ref=job.ref, text=verdict.text)

    def _refusal(self, q: Question) -> tuple[str, str | None] | None:
        """Why this question is not taken (outcome, notice or None to stay silent), or None."""
        c = self.config
        channel_ok = not c.ledger_bot_allowed_channels or q.kind == "dm" or q.channel in c.ledger_bot_allowed_channels
        user_ok = not c.ledger_bot_allowed_users or q.user in c.ledger_bot_allowed_users
        if not (channel_ok and user_ok):
            # Say it once a day per channel (or per user in DMs), not on every message.
            where = q.user if q.kind == "dm" or channel_ok else q.channel
            return "not_allowed", NOT_ALLOWED_NOTICE if self.told_not_allowed.add(where) else None
        if q.kind == "followup":
            return None  # not yet known to be for the bot: the worker checks, then applies the limits
        return self.limits.admit(q.user)

    def _on_block_actions(self, payload: dict) -> None:
        """👍/👎 clicks: count, log with the answer's ref, thank the clicker ephemerally."""
        actions = payload.get("actions") or []
        action = actions[0] if actions and isinstance(actions[0], dict) else {}
        value = FEEDBACK_ACTIONS.get(str(action.get("action_id")))
        if value is None:
            EVENTS.labels(type="block_actions", outcome="ignored").inc()
            return
        EVENTS.labels(type="block_actions", outcome="accepted").inc()
        FEEDBACK.labels(value=value).inc()
        user = str((payload.get("user") or {}).get("id") or "")
        channel = str((payload.get("channel") or {}).get("id") or (payload.get("container") or {}).get("channel_id") or "")
        message = payload.get("message") or {}
        log_event(logging.INFO, "feedback", ref=str(action.get("value") or ""), value=value, channel=channel, user=user)
        if channel and user:
            try:
                self.web.chat_postEphemeral(channel=channel, user=user, thread_ts=message.get("thread_ts") or None,
                                            text="Thanks for the feedback! It helps the BOR Write team improve my answers.")
            except SlackClientError as e:
                log_event(logging.WARNING, "feedback_thanks_failed", error=_slack_error_code(e))

    # -- shutdown -----------------------------------------------------------------------------

    def shutdown(self, grace: float) -> bool:
        """Stop taking events, finish in-flight answers within ``grace`` s, close the socket.

        Returns True if every accepted question was answered.
        """
        self.health.stopping = True
        closer = None
        if self.client is not None:
            # Close the socket first, so Slack sends new events to other connections. slack_sdk's
            # close() waits for its reader, which sits in recv() for up to 3 s; shutting the raw
            # socket down wakes that recv at once. Then close() joins slack_sdk's timer threads
            # for another 2-3 s: it runs alongside the drain, and those are daemon threads.
            client = self.client
            with contextlib.suppress(Exception):
                client.current_session.sock.shutdown(socket.SHUT_RDWR)
            closer = threading.Thread(target=client.close, name="socket-close", daemon=True)
            closer.start()
        pending = self.pool.pending()
        log_event(logging.INFO, "draining", in_flight=pending, grace_s=grace)
        drained = self.pool.drain(grace)
        if not drained:
            log_event(logging.ERROR, "drain_timeout", unfinished=self.pool.pending())
        if closer is not None:
            # close() drops the socket within milliseconds, then spends 2-3 s joining slack_sdk's
            # timer threads; those are daemons, so only the socket itself is waited for.
            deadline = time.monotonic() + 3.5
            while self.client.is_connected() and closer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
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
    knowledge = KnowledgeBase(load_knowledge(config.knowledge_path))
    log_event(logging.INFO, "knowledge_loaded", path=str(config.knowledge_path), sections=len(knowledge.sections))
    web = make_web_client(config)
    me = None
    delays = backoff_delays()
    while not stop.is_set():
        try:
            me = fetch_identity(web)
            break
        except SlackApiError as e:
            code = e.response.get("error")
            if code in FATAL_AUTH_ERRORS:
                log_event(logging.ERROR, "slack_auth_failed", error=code,
                          hint="SLACK_BOT_TOKEN was rejected by Slack; check the secret")
                return 1
            wait = next(delays)
            log_event(logging.WARNING, "slack_auth_test_failed", error=code, retry_in_s=round(wait, 1))
        except (SlackClientError, OSError) as e:
            wait = next(delays)
            log_event(logging.WARNING, "slack_unreachable", error=type(e).__name__, retry_in_s=round(wait, 1))
        stop.wait(wait)
    if me is None:
        log_event(logging.INFO, "stopped", reason="signal before start-up completed")
        return 0
    log_event(logging.INFO, "identity", user=me.user_id, bot_id=me.bot_id, team=me.team_id)
    bot = Bot(config, web, me, health, knowledge)
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

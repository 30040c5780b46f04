"""ledger-bot: the BOR Write team's Slack assistant for GL Publisher and the Oracle General Ledger.

People @mention the bot in a channel or DM it; it reads the thread, asks the company LiteLLM
gateway (Claude on Bedrock) with the team's knowledge base as context, and answers in the thread;
with LEDGER_BOT_REPO set, the model may also call read-only tools over the GL Publisher
repository.

Run it with ``python ledger_bot.py`` (configuration comes from the environment, see README.md);
``--check`` validates the configuration and both upstreams and exits 0/1; ``--ask "…"``
answers one question in the terminal; ``--eval FILE`` measures retrieval (and, ``--online``,
answers) against a golden set. Each mode reads only the settings it uses.

Sections, in the order a question travels through them:
  1. Configuration   - environment -> validated settings (exit 2 naming every bad variable)
  2. Logging         - JSON lines (text on a terminal); values redacted before serialising
  3. Metrics         - ``Metrics``: every collector, on an injected CollectorRegistry
  4. Health server   - /health, /ready, /metrics on HEALTH_PORT; ``Health``; ``Signals``
  5. Block Kit       - pure: every payload shown in Slack (blocks, modal, Home tab), in limits
  6. Slack I/O       - ``SlackApi`` (one ``call``: rate budgets, 429 waits, error mapping),
                       ``SlackSurfaces``, ``SlackFiles``; ``Notifier``'s lanes
  7. Conversation    - pure: Slack event -> Question -> LLM messages; splitting and fences;
                       the modal's signed metadata; screenshots
  8. Knowledge       - the team's documents: load, split by heading, BM25 index, reload
  9. Repository tools - ``FullText`` (SQLite FTS5), the checkout's commit, ``RepoIndex`` and
                       ``RepoStore`` (rebuilt off the answer path); ``TOOLS``; ``ToolSession``
 10. LLM             - litellm: the model's facts, one deadline, retries, errors -> outcome
                       kinds, cost; ``converse``: the rounds of tool calls
 11. Reply delivery  - ``Reply`` (one state field), its ``Feedback`` and ``Delivery``
                       (``StreamDelivery`` or ``PostDelivery``); the ``Flusher``
 12. Outcomes        - ``OUTCOMES``: every way a question ends -> notice, log level, metric;
                       ``Job``; ``Recorder``, the one place an outcome is recorded
 13. Answering       - limits, follow-up verdicts, the prompt, ``Notices``, and ``Answerer``:
                       the worker's job, one question -> one reply
 14. Dispatch        - ``Dispatcher`` (envelopes, events), ``Interactions``, ``Intake``
                       (once only, allow-lists, the queue)
 15. Socket Mode     - ``SocketLink``: connect when warm, detect dead links; ``Acks``
 16. Terminal        - ``--check``, ``--ask``, ``--eval``: the same pipeline without Slack
 17. Lifecycle       - worker pool, ``Bot``, drain, memory (gc freeze, heap trim), ``main()``

Threads (every one can be stopped; ``Bot.shutdown`` stops them all):
  - main: start-up, then waits for SIGTERM/SIGINT (or a test's stop event), then drains;
    while it waits it returns freed heap memory to the OS (``release_free_memory``).
  - signal-watch: turns SIGTERM/SIGINT into /ready 503 and the stop event the moment they
    arrive, whatever the main thread is doing (``Signals``).
  - health-http: ``ThreadingHTTPServer`` answering probes (one short thread per request; a
    connection that sends nothing is dropped after a few seconds).
  - slack_sdk's SocketModeClient: a reader thread, a message processor, a ping monitor and a
    listener pool. ``Acks.ack`` acks on the reader thread; the listener only classifies and
    enqueues (waiting at most for the ack to be recorded), it never calls Slack.
  - socket-watchdog: notices a dead or refused connection and reconnects with backoff.
  - answer-N: ``LEDGER_BOT_WORKERS`` threads taking questions from a bounded queue.
  - notices-trigger, notices-notices, notices-home: every Slack call the dispatcher needs, off
    the listener, in three lanes so none waits behind another (``NOTICE_LANES``): the
    shortcut's modal; refusals, feedback thanks, suggested prompts and thread titles; the
    Home tab.
  - stream-flusher: shows buffered answer text when the model goes quiet (``Flusher``).
  - litellm-import: imports litellm once (~4 s); the socket opens only after it finished.
  - repo-index (with LEDGER_BOT_REPO): builds the repository index at start-up and again when
    the checkout's commit changes, one build at a time (``RepoStore``).
  - at shutdown only: socket-close (slack_sdk's slow close) and one interrupt thread per
    answer still open when the drain deadline passes.
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
import fnmatch
import functools
import gc
import hashlib
import hmac
import http.server
import io
import itertools
import json
import logging
import math
import posixpath
import queue
import random
import re
import secrets
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
import typing
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
import prometheus_client
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.socket_mode.builtin.client import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest

__version__ = "0.2.0"

log = logging.getLogger("ledger_bot")

# What this module relies on that its dependencies do not promise: private names, or public
# objects whose inner shape matters. One place: tests/test_units.py checks each entry against
# the installed versions, so a dependency update (Renovate moves the pins) that changes one fails
# loudly, naming it, instead of silently turning a guard off.
RELIED_ON = {
    "slack_sdk WebClient._perform_urllib_http_request_internal(url, req)": (
        "PooledWebClient overrides it to keep one connection per thread and host"
    ),
    "slack_sdk WebClient.proxy and .ssl": "PooledWebClient falls back to urllib behind a proxy",
    "slack_sdk SocketModeClient.connect_operation_lock": (
        "the watchdog never starts a connect while slack_sdk's own is in flight"
    ),
    "slack_sdk SocketModeClient.current_session.last_ping_pong_time": (
        "the watchdog's dead-connection check reads the last pong"
    ),
    "slack_sdk SocketModeClient.current_session.sock": (
        "TCP_NODELAY on it, and the shutdown that wakes the reader at close"
    ),
    "slack_sdk SocketModeClient.message_processor": "/health: is its thread alive",
    "litellm streaming response .completion_stream (an openai Stream with .response)": (
        "stream_completion reads the gateway's SSE lines itself (iter_lines)"
    ),
    "litellm.model_cost entries with max_input_tokens and the four prices": (
        "model_facts: the model's context and prices come from litellm's map"
    ),
}


# ════════════════════════════════════════════════════════════════════════════════════════
# 1. Configuration
# ════════════════════════════════════════════════════════════════════════════════════════

SECRET_ENV_VARS = ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "LITELLM_DEVELOPER_KEY")
EXIT_CONFIG = 2
EXIT_SLACK_AUTH = 1
DEFAULT_KNOWLEDGE = Path(__file__).resolve().parent / "knowledge"
# What the AI pane offers a new thread and the Home tab suggests: questions the shipped
# knowledge answers (each is in tests/eval/shipped.yaml, a test holds them there).
DEFAULT_PROMPTS = (
    "How do I create ledger lines for a new activity type?",
    "My activity is stuck in NEW status, what should I check?",
    "What's an idempotency key and why does it matter?",
    "Why did my journal import reject rows in GL_INTERFACE?",
)


def _setting(description: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=description, **constraints)


Seconds = Annotated[float, _setting("a number of seconds > 0", gt=0)]
Count = Annotated[int, _setting("a whole number >= 1", ge=1)]
Flag = Annotated[bool, _setting("true or false")]
Dollars = Annotated[float, _setting("dollars >= 0 (0 = no limit)", ge=0)]

# The settings, one Struct per way of running: each field is the lower-cased variable, required
# fields have no default, and each mode reads only what it uses. ``load_config`` validates every
# variable and reports all problems at once; it never echoes a value (a malformed secret is
# still a secret). What nobody needs to turn is a named constant beside the code that uses it.


class KnowledgeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the offline ``--eval`` reads: the documents, the repository the tools read, and the
    model whose tokens it counts."""

    ledger_bot_knowledge: Annotated[
        str, _setting("a readable .md/.txt file or a directory holding some")
    ] = ""
    ledger_bot_repo: Annotated[
        str, _setting("the path of a checkout of the GL Publisher repository")
    ] = ""
    ledger_bot_repo_url: Annotated[
        str,
        _setting(
            "an https URL of the repository, e.g. https://github.com/wealthsimple/oracle-gl-publisher",
            pattern=r"^https://[^\s/]+(/\S*)?$",
        ),
    ] = ""
    ledger_bot_tool_rounds: Annotated[int, _setting("a whole number from 1 to 8", ge=1, le=8)] = 4
    ledger_bot_model: Annotated[str, _setting("a gateway model alias", pattern=r"^[\w.:/-]+$")] = (
        "bedrock-claude-4.5-sonnet"
    )

    @property
    def knowledge_path(self) -> Path:
        """The knowledge file or folder; by default the ``knowledge/`` folder beside this module."""
        return Path(self.ledger_bot_knowledge) if self.ledger_bot_knowledge else DEFAULT_KNOWLEDGE

    @property
    def repo_path(self) -> Path | None:
        """The repository checkout the tools read; None: no tools."""
        return Path(self.ledger_bot_repo) if self.ledger_bot_repo else None


class GatewaySettings(KnowledgeSettings, frozen=True, kw_only=True):
    """What ``--ask`` and ``--eval --online`` read too: the LiteLLM gateway and its deadlines."""

    litellm_developer_key: Annotated[
        str, _setting("the LiteLLM gateway key (non-empty, no spaces)", pattern=r"^\S+$")
    ]
    litellm_base_url: Annotated[
        str,
        _setting(
            "an http(s) URL of the gateway, e.g. https://llm.example.com/api/v2",
            pattern=r"^https?://[^\s/]+",
        ),
    ]
    ledger_bot_environment: Annotated[
        str, _setting("a short name such as staging or production", pattern=r"^[a-z0-9-]{1,32}$")
    ] = "local"
    ledger_bot_llm_timeout_seconds: Seconds = 60.0
    ledger_bot_answer_max_seconds: Seconds = 240.0


class Config(GatewaySettings, frozen=True, kw_only=True):
    """Everything the bot (and ``--check``) reads from the environment."""

    slack_bot_token: Annotated[
        str, _setting("a Slack bot token starting with 'xoxb-'", pattern=r"^xoxb-\S+$")
    ]
    slack_app_token: Annotated[
        str, _setting("a Slack app-level token starting with 'xapp-'", pattern=r"^xapp-\S+$")
    ]
    slack_api_url: Annotated[
        str, _setting("an http(s) URL ending in /", pattern=r"^https?://\S+/$")
    ] = "https://slack.com/api/"
    health_port: Annotated[int, _setting("a TCP port 0-65535", ge=0, le=65535)] = 8080
    log_level: Annotated[
        str, _setting("one of DEBUG, INFO, WARNING, ERROR", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    ] = "INFO"
    log_format: Annotated[
        str, _setting("one of auto, json, text", pattern=r"^(auto|json|text)$")
    ] = "auto"
    ledger_bot_workers: Count = 16
    ledger_bot_queue_size: Count = 64
    ledger_bot_shutdown_grace_seconds: Seconds | None = None
    ledger_bot_streaming: Flag = True
    ledger_bot_slack_rate_share: Annotated[
        float, _setting("a fraction between 0.05 and 1", ge=0.05, le=1)
    ] = 0.5
    ledger_bot_follow_ups: Flag = False
    ledger_bot_suggested_prompts: Annotated[str, _setting("prompts separated by |, at most 4")] = ""
    ledger_bot_allowed_channels: Annotated[
        tuple[str, ...], _setting("comma-separated Slack channel ids")
    ] = ()
    ledger_bot_allowed_users: Annotated[
        tuple[str, ...], _setting("comma-separated Slack user ids")
    ] = ()
    ledger_bot_feedback: Flag = True
    ledger_bot_user_rate_limit: Annotated[
        int, _setting("questions per minute, a whole number >= 0 (0 = no limit)", ge=0)
    ] = 10
    ledger_bot_daily_budget_usd: Dollars = 50.0
    ledger_bot_user_daily_budget_usd: Dollars = 5.0
    ledger_bot_git_sha: str = "unknown"

    @property
    def suggested_prompts(self) -> list[str]:
        """What the AI pane offers when a thread starts (Slack shows at most four)."""
        given = [p.strip() for p in self.ledger_bot_suggested_prompts.split("|") if p.strip()]
        return (given or list(DEFAULT_PROMPTS))[:4]

    @property
    def drain_seconds(self) -> float:
        """How long SIGTERM waits for answers in flight: LEDGER_BOT_SHUTDOWN_GRACE_SECONDS, or by
        default the longest an answer may take (LEDGER_BOT_ANSWER_MAX_SECONDS) plus 10 s of
        Slack time. Kubernetes' terminationGracePeriodSeconds must exceed it by ~20 s."""
        if self.ledger_bot_shutdown_grace_seconds is not None:
            return self.ledger_bot_shutdown_grace_seconds
        return self.ledger_bot_answer_max_seconds + 10


def _env_name(field_name: str) -> str:
    return field_name.upper()


S = typing.TypeVar("S", bound=KnowledgeSettings)


def load_config(environ: dict[str, str] | os._Environ, kind: type[S] = Config) -> S:  # type: ignore[assignment]
    """Build ``kind`` (Config, or a terminal mode's settings) from ``environ``; raise
    ConfigError listing every bad variable.

    Empty strings count as unset. Each variable is converted on its own so one bad value does
    not hide the next; error lines name the variable and what it must be, never its value.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in _report_order(kind):
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
    if "ledger_bot_knowledge" in values and not knowledge_files(
        Path(values["ledger_bot_knowledge"])
    ):
        problems.append(
            "LEDGER_BOT_KNOWLEDGE: invalid, expected "
            + _describe(_field_type(kind, "ledger_bot_knowledge"))
        )
    if problems:
        raise ConfigError(problems)
    return kind(**values)


def _report_order(kind: type) -> list[msgspec.structs.FieldInfo]:
    """``kind``'s fields in the order problems are reported: the secrets first (as
    SECRET_ENV_VARS lists them), then the other required ones, then the rest, as declared."""
    fields = msgspec.structs.fields(kind)
    secrets = [name.lower() for name in SECRET_ENV_VARS]

    def rank(field: msgspec.structs.FieldInfo) -> tuple[int, int]:
        if field.name in secrets:
            return 0, secrets.index(field.name)
        return (1 if field.required else 2), fields.index(field)

    return sorted(fields, key=rank)


def _field_type(kind: type, name: str) -> Any:
    return next(f.type for f in msgspec.structs.fields(kind) if f.name == name)


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
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        for meta in getattr(arg, "__metadata__", ()):
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
        self._exact = tuple(
            sorted({v for v in (*self._exact, *values) if len(v) >= 4}, key=len, reverse=True)
        )

    def __call__(self, text: str) -> str:
        for value in self._exact:
            text = text.replace(value, REDACTED)
        return _TOKEN_PATTERN.sub(REDACTED, text)

    def deep(self, value: Any) -> Any:
        """Redact every string inside ``value`` (dicts, lists, tuples), before it is serialised:
        serialising first would escape a secret's quotes or backslashes and hide it."""
        if isinstance(value, str):
            return self(clean_text(value))
        if isinstance(value, dict):
            return {
                self.deep(k) if isinstance(k, str) else k: self.deep(v) for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.deep(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self(clean_text(str(value)))


redact = Redactor()


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (which JSON allows and UTF-8 does not) replaced by U+FFFD,
    so no encoder downstream (logs, HTTP bodies) can fail on it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def log_event(level: int, event: str, **fields: Any) -> None:
    """Log one structured line: ``event`` is a stable snake_case name, fields become keys."""
    log.log(level, event, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
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
        return json.dumps(redact.deep(entry), default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = redact.deep(getattr(record, "fields", None) or {})
        extras = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        name = "" if record.name == log.name else f" [{record.name}]"
        message = clean_text(record.getMessage())
        line = f"{stamp} {record.levelname:<7} {message}{name} {extras}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class _PayloadFilter(logging.Filter):
    """slack_sdk logs whole frames ("payload: …", "message: …") in some WARNING/ERROR lines,
    which can carry people's messages: above DEBUG, keep only the part before the payload."""

    _CUT = re.compile(r",?\s*(?:payload|message):.*", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            message = record.getMessage()
            cut = self._CUT.sub(" (payload omitted)", message)
            if cut != message:
                record.msg, record.args = cut, None
        return True


def setup_logging(level: str, fmt: str, stream: Any = None) -> None:
    """Route every logger (ours, slack_sdk, litellm) through one redacting handler on stdout."""
    stream = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # slack_sdk logs every frame at DEBUG, the HTTP clients every request at INFO: keep them one
    # notch quieter than ours unless DEBUG.
    for name in ("slack_sdk", *QUIET_LOGGERS):
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")
    handler.addFilter(_PayloadFilter())


LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router")
QUIET_LOGGERS = ("httpx", "httpx2", "openai")  # a line per HTTP request at INFO


def _tame_litellm_logging() -> None:
    """litellm's loggers carry their own stderr handler *and* propagate: every line twice and
    unredacted. Drop its handlers so its lines go through ours, once, redacted."""
    for name in LITELLM_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        # litellm logs a line per call at INFO; only its warnings matter unless debugging.
        lg.setLevel(
            logging.NOTSET if logging.getLogger().level <= logging.DEBUG else logging.WARNING
        )


# ════════════════════════════════════════════════════════════════════════════════════════
# 3. Metrics
# ════════════════════════════════════════════════════════════════════════════════════════
# Label values are small fixed sets: never a user id, channel id or message text.

# Histogram bounds. The SLO thresholds in workloads/ (first text within 10 s, answer within
# 45 s) are bounds here, so an SLO ratio reads an exact bucket instead of interpolating.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    45,
    60,
    120,
    300,
)
EVENT_TYPES = (
    "app_mention",
    "message",
    "block_actions",
    "assistant",
    "shortcut",
    "app_home",
    "other",
)
EVENT_OUTCOMES = ("accepted", "ignored", "duplicate", "rejected")
TOOL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Every collector the bot exports, registered on ``registry`` (one per bot, so tests read
    absolute values and two bots in one process do not collide). Every labelled series the
    alerts use exists from the start at 0, so rate() and increase() see the first event."""

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry,
        outcomes: tuple[str, ...],
        tools: tuple[str, ...] = (),
    ):
        self.registry = registry
        counter = functools.partial(prometheus_client.Counter, registry=registry)
        gauge = functools.partial(prometheus_client.Gauge, registry=registry)
        latency = functools.partial(
            prometheus_client.Histogram, buckets=LATENCY_BUCKETS, registry=registry
        )
        self.events = counter(
            "ledger_bot_events",
            "Socket Mode events received, by type and what the bot did with them",
            ["type", "outcome"],
        )
        self.answers = counter("ledger_bot_answers", "Questions handled, by outcome", ["outcome"])
        self.ack_latency = latency(
            "ledger_bot_ack_latency_seconds", "Envelope frame received -> ack sent"
        )
        self.first_feedback = latency(
            "ledger_bot_first_feedback_seconds",
            "Event received -> 'thinking' status or placeholder visible",
        )
        self.first_token = latency(
            "ledger_bot_first_token_seconds", "Event received -> first answer text visible in Slack"
        )
        self.answer_duration = latency(
            "ledger_bot_answer_duration_seconds", "Event received -> reply complete"
        )
        self.llm_tokens = counter(
            "ledger_bot_llm_tokens", "Tokens reported (or, for a cut answer, estimated)", ["kind"]
        )
        self.llm_cost = counter("ledger_bot_llm_cost_usd", "LLM cost in US dollars")
        self.socket_connected = gauge(
            "ledger_bot_socket_connected",
            "1 while a Socket Mode connection that said hello is alive",
        )
        self.socket_reconnects = counter(
            "ledger_bot_socket_reconnects", "Socket Mode reconnections after the first connect"
        )
        self.slack_rate_limited = counter(
            "ledger_bot_slack_rate_limited", "Slack 429 answers that reached the bot", ["method"]
        )
        self.queue_depth = gauge("ledger_bot_worker_queue_depth", "Questions waiting for a worker")
        self.workers_busy = gauge(
            "ledger_bot_workers_busy", "Workers answering a question right now"
        )
        self.feedback = counter(
            "ledger_bot_feedback",
            "First feedback votes, one per person per answer (a changed vote is logged)",
            ["value"],
        )
        self.sources = counter(
            "ledger_bot_answer_sources",
            "Answers by whether they cited knowledge sources",
            ["cited"],
        )
        self.build_info = gauge(
            "ledger_bot_build_info", "Always 1; labels say what is running", ["version", "git_sha"]
        )
        self.tool_calls = counter(
            "ledger_bot_tool_calls", "Repository tool calls, by tool and result", ["tool", "result"]
        )
        self.tool_duration = prometheus_client.Histogram(
            "ledger_bot_tool_duration_seconds",
            "Repository tool call duration",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=registry,
        )
        self.repo_info = gauge(
            "ledger_bot_repo_info", "Always 1; the commit the repository tools read", ["commit"]
        )
        self.repo_files = gauge(
            "ledger_bot_repo_files", "Files in the repository index (0: LEDGER_BOT_REPO unindexed)"
        )
        for outcome in outcomes:
            self.answers.labels(outcome=outcome)
        for event_type in EVENT_TYPES:
            for event_outcome in EVENT_OUTCOMES:
                self.events.labels(type=event_type, outcome=event_outcome)
        for kind in ("prompt", "completion"):
            self.llm_tokens.labels(kind=kind)
        for value in ("up", "down"):
            self.feedback.labels(value=value)
        for cited in ("yes", "no"):
            self.sources.labels(cited=cited)
        for tool in tools:
            self.tool_duration.labels(tool=tool)
            for result in ("ok", "error"):
                self.tool_calls.labels(tool=tool, result=result)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def new_registry() -> prometheus_client.CollectorRegistry:
    """A registry with the process collectors (CPU, memory, fds) that the alerts also read."""
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    return registry


# ════════════════════════════════════════════════════════════════════════════════════════
# 4. Health server
# ════════════════════════════════════════════════════════════════════════════════════════


NOT_CONNECTED = "no live Slack Socket Mode connection"


class Health:
    """What the probes report, as one ``state``: "waiting" (no live Socket Mode connection yet,
    or any more; ``reason`` says what for), "ready" (between a ``hello`` on a live connection
    and its loss), or "stopping" (from SIGTERM on, never left). Written through ``waiting``,
    ``ready`` and ``stop`` by the lifecycle code, SocketLink and the signal-watch thread; read
    by the HTTP handler."""

    def __init__(self) -> None:
        self.state, self.reason = "waiting", NOT_CONNECTED
        self.liveness_checks: list[Callable[[], str | None]] = []  # each returns a problem or None
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self.state == "ready"

    @property
    def stopping(self) -> bool:
        return self.state == "stopping"

    def waiting(self, reason: str = NOT_CONNECTED) -> None:
        self._move("waiting", reason)

    def ready(self) -> None:
        self._move("ready", "")

    def stop(self) -> None:
        self._move("stopping", "shutting down, not taking new questions")

    def _move(self, state: str, reason: str) -> None:
        with self._lock:
            if self.state != "stopping":
                self.state, self.reason = state, reason

    def live(self) -> tuple[bool, dict[str, Any]]:
        problems = [p for check in self.liveness_checks if (p := check())]
        return not problems, {"status": "ok" if not problems else "unhealthy", "problems": problems}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        state, reason = self.state, self.reason
        if state == "ready":
            return True, {"status": "ready"}
        return False, {
            "status": "stopping" if state == "stopping" else "not_ready",
            "reason": reason,
        }


class Signals:
    """SIGTERM and SIGINT, turned into ``on_signal()`` by a thread of its own (signal-watch) the
    moment they arrive. Python runs a signal handler only when the main thread next runs Python
    code, which it may not for a while (waiting for the interpreter lock behind busy workers, or
    inside a C call such as ``malloc_trim``), and a handler that sets an Event can deadlock on
    the lock the main thread holds inside ``Event.wait``. Here the C-level handler writes the
    signal to a pipe (``signal.set_wakeup_fd``), the Python-level one does nothing, and the
    watcher wakes on the pipe. ``install`` must run on the main thread; ``close`` stops it."""

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self.on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd's rule: a full pipe drops, never blocks
        self._thread = threading.Thread(target=self._watch, name="signal-watch", daemon=True)

    def install(self) -> None:
        signal.set_wakeup_fd(self._write)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
        self._thread.start()

    def _watch(self) -> None:
        while os.read(self._read, 64):  # b"" once close() closed the writing end
            self.on_signal()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._write)
        self._thread.join(2)
        os.close(self._read)


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    server: HealthServer
    server_version = "ledger-bot"
    # A connection that sends no request within this time is dropped: without it every idle
    # connection to the port holds a thread forever.
    timeout = 5

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            ok, body = self.server.health.live()
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        elif path == "/ready":
            ok, body = self.server.health.readiness()
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        elif path == "/metrics":
            self._send(200, prometheus_client.CONTENT_TYPE_LATEST, self.server.metrics.render())
        else:
            self._send(404, "application/json", b'{"status":"not_found"}')

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format, *args)


class HealthServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, health: Health, metrics: Metrics):
        super().__init__(("0.0.0.0", port), _HealthHandler)
        self.health = health
        self.metrics = metrics

    def start(self) -> HealthServer:
        threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="health-http",
            daemon=True,
        ).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# ════════════════════════════════════════════════════════════════════════════════════════
# 5. Block Kit (pure: no I/O in this section)
# ════════════════════════════════════════════════════════════════════════════════════════
# Every payload the bot shows in Slack, built from plain values, within Slack's limits: the
# answer's blocks (markdown, sources, feedback), the status line, the modal, the Home tab.

# Metadata event types the bot stamps on its messages, so thread context can tell answers
# (kept, as the assistant's turns) from notices such as error and busy replies (dropped).
ANSWER_METADATA = "ledger_bot_answer"
NOTICE_METADATA = "ledger_bot_notice"
# Block Kit limits the bot's payloads stay within (Slack refuses the whole payload otherwise).
TEXT_OBJECT_LIMIT = 3_000  # characters in one text object (a section's text, a context element)
VIEW_BLOCKS_LIMIT = 100  # blocks in a modal or the Home tab
VIEW_BYTES_LIMIT = 250_000  # a view's JSON
FEEDBACK_ACTION = "feedback"
SHORTCUT_CALLBACK = "ask_ledger_bot"  # the message shortcut (slack-app-manifest.yaml)
SHORTCUT_NAME = "Ask about this thread"  # its name in the manifest, as the Home tab quotes it
MODAL_CALLBACK = "ask_ledger_bot_modal"
MODAL_INPUT = ("question_block", "question")  # block_id, action_id of the modal's one field
MODAL_MAX_CHARS = 3_000  # the question field's max_length (Slack's cap for plain_text_input)
LOADING_MESSAGES = (  # each within Slack's 50 characters; promising only what the bot does
    "Reading the thread…",
    "Checking the GL Publisher docs…",
    "Looking through the Oracle GL notes…",
    "Balancing the debits and credits…",
)
LOADING_MESSAGE_CHARS = 50  # Slack's limit per loading message
TASK_TEXT_LIMIT = 256  # Slack's limit for a task's title and output


def task_chunk(
    task_id: str, title: str, status: str, output: str = "", sources: Iterable[tuple[str, str]] = ()
) -> dict:
    """A ``task_update`` chunk of a streamed reply (Slack's task UI): a step's title and
    status (pending, in_progress, complete, error), then a word on its result and links to
    what it found, as (url, text)."""

    def cut(text: str) -> str:
        return text if len(text) <= TASK_TEXT_LIMIT else text[: TASK_TEXT_LIMIT - 1] + "…"

    chunk: dict[str, Any] = {"type": "task_update", "id": task_id, "title": cut(title)}
    chunk["status"] = status
    if output:
        chunk["output"] = cut(output)
    links = [{"type": "url", "url": url, "text": cut(text)} for url, text in sources]
    if links:
        chunk["sources"] = links
    return chunk


def message_metadata(metadata_type: str, ref: str) -> dict:
    """What the bot stamps on its messages: answer or notice, and the reference id."""
    return {"event_type": metadata_type, "event_payload": {"ref": ref}}


def markdown_blocks(markdown: str, extra_blocks: list[dict] | None = None) -> list[dict]:
    return [{"type": "markdown", "text": markdown}, *(extra_blocks or [])]


def feedback_blocks(ref: str, serial: int) -> list[dict]:
    """Slack's native 👍/👎 (``feedback_buttons`` in a ``context_actions`` block). The value
    says the vote and the answer's ref; ``block_id`` is unique per message and per update."""
    button = {"type": "plain_text", "text": "👍"}
    return [
        {
            "type": "context_actions",
            "block_id": f"lb_feedback_{ref}_{serial}",
            "elements": [
                {
                    "type": "feedback_buttons",
                    "action_id": FEEDBACK_ACTION,
                    "positive_button": {
                        "text": button,
                        "value": f"up:{ref}",
                        "accessibility_label": "Helpful",
                    },
                    "negative_button": {
                        "text": {**button, "text": "👎"},
                        "value": f"down:{ref}",
                        "accessibility_label": "Not helpful",
                    },
                }
            ],
        }
    ]


def sources_block(sections: list[Section], ref: str, serial: int) -> dict:
    """A small context line naming the documents an answer cited, in citation order (the most
    relevant first); a link where the document declared ``source_url``. Within Slack's limit
    of TEXT_OBJECT_LIMIT characters per text: labels that do not fit are counted, "+N more"."""
    names = [
        f"<{s.url}|{_mrkdwn_escape(s.label)}>" if s.url else _mrkdwn_escape(s.label)
        for s in sections
    ]
    text, shown = "Sources: ", 0
    for name in names:
        more = f" · +{len(names) - shown - 1} more" if shown + 1 < len(names) else ""
        if len(text) + len(name) + len(" · ") + len(more) > TEXT_OBJECT_LIMIT:
            break
        text += (" · " if shown else "") + name
        shown += 1
    if shown < len(names):
        text += f"{' · ' if shown else ''}+{len(names) - shown} more"
    return {
        "type": "context",
        "block_id": f"lb_sources_{ref}_{serial}",
        "elements": [{"type": "mrkdwn", "text": text}],
    }


def ask_modal(where: str) -> dict:
    """The shortcut's modal: one field, prefilled; ``where`` (``modal_where``)
    travels in ``private_metadata``."""
    block_id, action_id = MODAL_INPUT
    return {
        "type": "modal",
        "callback_id": MODAL_CALLBACK,
        "title": {"type": "plain_text", "text": "Ask ledger-bot"},
        "submit": {"type": "plain_text", "text": "Ask"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": where,
        "blocks": [
            {
                "type": "input",
                "block_id": block_id,
                "label": {"type": "plain_text", "text": "Your question about this thread"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": action_id,
                    "multiline": True,
                    "initial_value": "Summarize this thread",
                    "max_length": MODAL_MAX_CHARS,
                },
            }
        ],
    }


def home_view(sections: list[Section], *, prompts: list[str], limits: list[str]) -> dict:
    """The Home tab: what the bot is for, how to ask, which documents it knows, how to report a
    bad answer, and the limits each person has (limits, not usage: one replica cannot know a
    person's usage across replicas). Within Slack's view limits however many documents there
    are: VIEW_BLOCKS_LIMIT blocks, VIEW_BYTES_LIMIT of JSON, TEXT_OBJECT_LIMIT per text; the
    documents that do not fit are counted in a last line."""

    def text(markdown: str) -> dict:
        return {"type": "section", "text": {"type": "mrkdwn", "text": _cut(markdown)}}

    documents: dict[str, list[str]] = {}
    for section in sections:
        documents.setdefault(section.source, []).append(
            section.heading.split(" > ")[-1] if section.heading else ""
        )
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "ledger-bot"}},
        text(
            "I answer questions about *GL Publisher* and the *Oracle General Ledger* for the "
            "BOR Write team, from the team's documents, and cite the documents I used."
        ),
        text(
            "*How to ask*\n"
            "• @mention me in a channel: I answer in the thread, reading the thread first.\n"
            "• Send me a direct message, or open me in the AI pane.\n"
            f"• On any message: *More actions → {SHORTCUT_NAME}*.\n"
            "• Paste a screenshot of an error with your question: I can read images."
        ),
        text("*Try asking*\n" + "\n".join(f"• {p}" for p in prompts)),
        text(
            "*A wrong or unhelpful answer?* Press 👎 under it (it is logged with the answer's "
            "ref), and tell the BOR Write team in #bor-write-eng with the `lb-…` ref."
        ),
        text("*Your limits*\n" + "\n".join(f"• {line}" for line in limits)),
        {"type": "divider"},
        text(f"*Documents I know* ({len(documents)} files, {len(sections)} sections)"),
    ]
    size = len(json.dumps(blocks))
    room = 200  # for the "…and N more files" line
    for listed_files, (source, headings) in enumerate(documents.items()):
        listed = ", ".join(h for h in headings if h) or "(no headings)"
        block = text(f"*{_mrkdwn_escape(source)}*: {_mrkdwn_escape(listed)}")
        block_size = len(json.dumps(block)) + 2
        if len(blocks) + 2 > VIEW_BLOCKS_LIMIT or size + block_size + room > VIEW_BYTES_LIMIT:
            blocks.append(text(f"…and {len(documents) - listed_files} more files."))
            break
        blocks.append(block)
        size += block_size
    return {"type": "home", "blocks": blocks}


def _cut(text: str, limit: int = TEXT_OBJECT_LIMIT) -> str:
    """``text`` within ``limit`` characters, ending in "…" if cut, never inside an escape."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    if head.rfind("&") > head.rfind(";"):
        head = head[: head.rfind("&")]
    return head + "…"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{round(seconds / 60)} minutes"


def _mrkdwn_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ════════════════════════════════════════════════════════════════════════════════════════
# 6. Slack I/O
# ════════════════════════════════════════════════════════════════════════════════════════

# Slack errors that no retry can fix: the token itself was refused.
FATAL_AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "token_revoked", "account_inactive"})

# Slack's per-workspace rate tiers (calls per minute), from its method reference: the one table
# every budget comes from. LEDGER_BOT_SLACK_RATE_SHARE is the share one replica may use
# (replicas share the workspace's tiers).
TIER_2, TIER_3, TIER_4 = 20, 50, 100
SLACK_RATE_TIERS: dict[str, int] = {
    "auth.test": TIER_4,
    "conversations.replies": TIER_3,
    "chat.postMessage": 60,  # "about one message per second per channel": budgeted per channel
    "chat.postEphemeral": TIER_4,
    "chat.update": TIER_3,
    "chat.startStream": TIER_2,
    "chat.appendStream": TIER_4,
    "chat.stopStream": TIER_2,
    "assistant.threads.setStatus": TIER_3,
    "assistant.threads.setSuggestedPrompts": TIER_4,
    "assistant.threads.setTitle": TIER_4,
    "views.open": TIER_4,
    "views.publish": TIER_4,
    "reactions.add": TIER_3,
}
PER_CHANNEL_METHODS = frozenset({"chat.postMessage"})
JSON_METHOD_PREFIXES = ("chat.", "assistant.", "views.", "reactions.")
RATE_WINDOW_SECONDS = 61.0  # Slack counts per minute; a second of margin for clock and transit


def rate_limits(share: float) -> dict[str, int]:
    """Calls per minute this replica may make, per method (at least one)."""
    return {
        m: max(1, int(n * (1.0 if m in PER_CHANNEL_METHODS else share)))
        for m, n in SLACK_RATE_TIERS.items()
    }


class RateBudget:
    """Sliding-window call budgets, one per key (a method, or method + channel), shared by every
    answer in the process. ``take`` never holds the lock while it waits."""

    def __init__(self, per_minute: dict[str, int], clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._calls: dict[str, collections.deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def take(self, method: str, *, channel: str = "", wait: float = 0.0) -> bool:
        """Spend one call of ``method`` now, waiting up to ``wait`` s for one; False if none."""
        limit = self.per_minute.get(method)
        if limit is None:
            return True
        key, window = method, RATE_WINDOW_SECONDS
        if method in PER_CHANNEL_METHODS:  # n a minute per channel: one every 60/n seconds
            key, window, limit = f"{method}:{channel}", RATE_WINDOW_SECONDS / limit, 1
        deadline = self.clock() + wait
        while True:
            with self._lock:
                now = self.clock()
                calls = self._calls.setdefault(key, collections.deque())
                while calls and calls[0] <= now - window:
                    calls.popleft()
                free_at = max(
                    self._blocked_until.get(method, 0.0),
                    calls[0] + window if len(calls) >= limit else 0.0,
                )
                if free_at <= now:
                    calls.append(now)
                    return True
            if free_at > deadline:
                return False
            time.sleep(min(free_at - now, 1.0))

    def block(self, method: str, seconds: float) -> None:
        """Slack answered 429: spend nothing on ``method`` for ``seconds``."""
        with self._lock:
            self._blocked_until[method] = max(
                self._blocked_until.get(method, 0.0), self.clock() + seconds
            )


class SlackError(Exception):
    """A Web API call failed. ``code`` is Slack's error string (``stopped_by_user``,
    ``ratelimited``, ``streaming_state_conflict``, …) or the transport error's class name;
    ``needed`` the scope Slack named with ``missing_scope``."""

    def __init__(self, method: str, code: str, *, needed: str = ""):
        super().__init__(f"{method}: {code}" + (f" (needs {needed})" if needed else ""))
        self.method = method
        self.code = code
        self.needed = needed


class SlackBusy(SlackError):
    """No call of this method may be made now: the rate budget is spent or Slack said 429."""


class SlackAuthFailed(SlackError):
    """Slack refused a token (revoked, invalid, account inactive): no retry can help."""


class _RateLimited(Exception):
    """Slack answered 429; ``SlackApi.call`` waits ``retry_after`` seconds or gives up."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after


def _seconds(value: Any, *, default: float) -> float:
    """A Retry-After header as seconds (an HTTP date or junk counts as ``default``)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if 0 <= seconds < 3600 else default


def slack_error_code(e: SlackApiError) -> str:
    """Slack's error string from a failed call (``invalid_auth``, ``ratelimited``, …)."""
    return str(e.response.get("error") or "slack_api_error")


def _field(resp: dict, key: str, method: str) -> str:
    """A field an ``ok`` answer must have; SlackError if Slack left it out."""
    value = resp.get(key)
    if not isinstance(value, str) or not value:
        raise SlackError(method, f"missing_{key}")
    return value


class PooledWebClient(WebClient):
    """slack_sdk's WebClient, reusing connections: each thread keeps one open connection per
    host (keep-alive) instead of a new TCP and TLS handshake for every call. Everything above
    the socket is slack_sdk's own: retry handlers, HTTPError for 4xx/5xx, SlackApiError.
    Behind a proxy it falls back to slack_sdk's urllib path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._local = threading.local()
        self._ssl = self.ssl or __import__("ssl").create_default_context()  # honours SSL_CERT_FILE

    def _perform_urllib_http_request_internal(self, url: str, req: Any) -> dict[str, Any]:
        if self.proxy is not None:
            return super()._perform_urllib_http_request_internal(url, req)
        import http.client
        import io
        import urllib.error

        parts = urllib.parse.urlsplit(url)
        conn = self._connection(parts.scheme, parts.netloc)
        # As urllib does: an error while connecting or sending is a URLError, which slack_sdk
        # retries (nothing reached Slack); one while waiting for the answer is raised as it is
        # and not retried, because Slack may have acted on the call (a second startStream or
        # postMessage would show the text twice).
        try:
            conn.request(
                req.get_method(),
                parts.path + (f"?{parts.query}" if parts.query else ""),
                body=req.data,
                headers=dict(req.header_items()),
            )
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise urllib.error.URLError(e) from e
        try:
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        if resp.status >= 400:
            raise urllib.error.HTTPError(
                url, resp.status, resp.reason, resp.headers, io.BytesIO(body)
            )
        return {
            "status": resp.status,
            "headers": resp.headers,
            "body": body.decode(resp.headers.get_content_charset() or "utf-8"),
        }

    def _connection(self, scheme: str, netloc: str) -> Any:
        """This thread's open connection to ``netloc``; a fresh one if the server closed it."""
        import http.client
        import select

        pool: dict[str, Any] = self._local.__dict__.setdefault("pool", {})
        conn = pool.get(netloc)
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            conn.close()  # readable while idle: the server hung up (or said something unasked)
        if conn is None:
            conn = (
                http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
                if scheme == "https"
                else http.client.HTTPConnection(netloc, timeout=self.timeout)
            )
            pool[netloc] = conn
        return conn


def make_web_client(token: str, base_url: str) -> WebClient:
    """A WebClient that keeps connections open and retries connection errors and 5xx; 429s
    are SlackApi's to handle."""
    return PooledWebClient(
        token=token,
        base_url=base_url,
        timeout=15,
        retry_handlers=[
            ConnectionErrorRetryHandler(max_retry_count=2),
            ServerErrorRetryHandler(max_retry_count=2),
        ],
    )


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


class SlackApi:
    """The Slack Web API: one ``call`` that every Web API call of the bot goes through, and the
    calls about threads and messages as small methods over it (SlackSurfaces has the AI pane's
    and the views'; StreamDelivery the streams').

    ``call`` spends the method's rate budget first, then maps every failure to one of three
    exceptions: SlackAuthFailed (the token was refused: ``on_auth_failed`` is told, once per
    token), SlackBusy (no call could be made within ``wait`` seconds: the budget is spent, or
    Slack answered 429 with a Retry-After longer than the caller may wait; a 429 pauses the
    method for every caller, and one that may wait that long tries again once it is free), or
    SlackError (any other Slack error, and every transport error: refused, reset, timed out).
    Nothing else escapes (a field an answer lacks is a SlackError too). Thread-safe; holds no
    lock while it talks to Slack.
    """

    def __init__(
        self,
        web: WebClient,
        budget: RateBudget,
        metrics: Metrics,
        on_auth_failed: Callable[[str, str], None] = lambda token, code: None,
    ):
        self.web = web
        self.budget = budget
        self.metrics = metrics
        self.on_auth_failed = on_auth_failed

    def call(self, method: str, *, wait: float, channel: str = "", **params: Any) -> dict:
        deadline = time.monotonic() + wait
        body = {k: v for k, v in {"channel": channel or None, **params}.items() if v is not None}
        while True:
            if not self.budget.take(
                method, channel=channel, wait=max(0.0, deadline - time.monotonic())
            ):
                raise SlackBusy(method, "rate_budget_spent")
            try:
                return self._send(method, body)
            except _RateLimited as limited:
                # A 429 is a wait, not a failure: the method is paused for its Retry-After, and
                # a caller that may wait that long takes the next free call (``take`` above).
                self.budget.block(method, limited.retry_after)
                if time.monotonic() + limited.retry_after > deadline:
                    raise SlackBusy(method, "ratelimited") from None

    def _send(self, method: str, body: dict) -> dict:
        """One HTTP call of ``method``; every failure mapped as the class docstring says (a 429
        raises _RateLimited, for ``call`` to wait on)."""
        try:
            # Write methods take JSON (blocks, metadata); reading methods only form/query fields.
            resp = (
                self.web.api_call(method, json=body)
                if method.startswith(JSON_METHOD_PREFIXES)
                else self.web.api_call(method, params=body)
            )
            return dict(resp.data) if isinstance(resp.data, dict) else {}
        except SlackApiError as e:
            code = slack_error_code(e)
            if e.response.status_code == 429:
                self.metrics.slack_rate_limited.labels(method=method).inc()
                retry_after = e.response.headers.get("Retry-After")
                log_event(
                    logging.WARNING, "slack_rate_limited", method=method, retry_after_s=retry_after
                )
                raise _RateLimited(_seconds(retry_after, default=1.0)) from None
            if code in FATAL_AUTH_ERRORS:
                self.on_auth_failed("SLACK_BOT_TOKEN", code)
                raise SlackAuthFailed(method, code) from None
            raise SlackError(method, code, needed=str(e.response.get("needed") or "")) from None
        except (SlackClientError, OSError, ValueError) as e:  # refused, reset, timed out, bad JSON
            raise SlackError(method, type(e).__name__) from None

    # -- threads ------------------------------------------------------------------------------

    def auth_test(self) -> BotIdentity:
        """``auth.test``: who the bot is."""
        resp = self.call("auth.test", wait=5)
        return BotIdentity(
            user_id=_field(resp, "user_id", "auth.test"),
            bot_id=resp.get("bot_id") or "",
            team_id=resp.get("team_id") or "",
        )

    def fetch_thread(
        self, *, channel: str, thread_ts: str, max_messages: int, max_pages: int = 50
    ) -> list[dict]:
        """``conversations.replies`` with metadata, paginated: the root plus the newest
        ``max_messages`` replies (of the first ``max_pages`` × 200), oldest first."""
        root: dict | None = None
        newest: collections.deque[dict] = collections.deque(maxlen=max_messages)
        cursor = None
        for _ in range(max_pages):
            resp = self.call(
                "conversations.replies",
                wait=30,
                channel=channel,
                ts=thread_ts,
                limit=200,
                cursor=cursor,
                include_all_metadata=True,
            )
            messages = list(resp.get("messages") or [])
            if root is None and messages:
                root = messages.pop(0)
            newest.extend(messages)
            cursor = (resp.get("response_metadata") or {}).get("next_cursor")
            if not resp.get("has_more") or not cursor:
                break
        return ([root] if root else []) + list(newest)

    def fetch_thread_root(self, *, channel: str, thread_ts: str) -> dict | None:
        """The first message of a thread (``conversations.replies`` limit 1), or None if gone."""
        messages = self.call(
            "conversations.replies", wait=30, channel=channel, ts=thread_ts, limit=1
        ).get("messages")
        return messages[0] if messages else None

    # -- messages -----------------------------------------------------------------------------

    def post_message(
        self,
        *,
        channel: str,
        thread_ts: str,
        markdown: str,
        metadata_type: str,
        ref: str,
        extra_blocks: list[dict] | None = None,
        wait: float = 30,
    ) -> str:
        """``chat.postMessage`` of one markdown block (plain ``text`` kept for notifications);
        returns the new message's ts."""
        resp = self.call(
            "chat.postMessage",
            wait=wait,
            channel=channel,
            thread_ts=thread_ts,
            text=markdown,
            blocks=markdown_blocks(markdown, extra_blocks),
            metadata=message_metadata(metadata_type, ref),
            unfurl_links=False,
            unfurl_media=False,
        )
        return _field(resp, "ts", "chat.postMessage")

    def update_message(
        self,
        *,
        channel: str,
        ts: str,
        markdown: str,
        metadata_type: str,
        ref: str,
        extra_blocks: list[dict] | None = None,
        wait: float = 30,
    ) -> None:
        """``chat.update`` a message of ours to one markdown block (never one still streaming:
        Slack answers ``streaming_state_conflict``)."""
        self.call(
            "chat.update",
            wait=wait,
            channel=channel,
            ts=ts,
            text=markdown,
            blocks=markdown_blocks(markdown, extra_blocks),
            metadata=message_metadata(metadata_type, ref),
        )

    def post_ephemeral(
        self, *, channel: str, user: str, text: str, thread_ts: str | None = None, wait: float = 10
    ) -> None:
        """``chat.postEphemeral``: a line only ``user`` sees."""
        self.call(
            "chat.postEphemeral",
            wait=wait,
            channel=channel,
            user=user,
            text=text,
            thread_ts=thread_ts,
        )

    def add_reaction(self, *, channel: str, ts: str, name: str = "eyes") -> None:
        """``reactions.add`` on a person's message (never waits: it stands in for feedback
        that could not go out at once)."""
        self.call("reactions.add", wait=0, channel=channel, timestamp=ts, name=name)


class SlackSurfaces:
    """The AI pane's thread status, prompts and titles, the modal and the Home tab: Slack calls
    that show something beside the conversation, over SlackApi's ``call``."""

    def __init__(self, api: SlackApi):
        self.api = api

    def set_status(
        self,
        *,
        channel: str,
        thread_ts: str,
        status: str = "is thinking…",
        loading: tuple[str, ...] = LOADING_MESSAGES,
    ) -> bool:
        """``assistant.threads.setStatus`` with ``loading`` messages (ledger-flavoured ones by
        default); False if Slack refuses it. Raises SlackBusy (never waits) when its budget is
        spent. Slack clears it at the next post in the thread, or after two minutes without one
        (the Flusher renews it while the model is silent)."""
        try:
            self.api.call(
                "assistant.threads.setStatus",
                wait=0,
                channel_id=channel,
                thread_ts=thread_ts,
                status=status,
                loading_messages=list(loading),
            )
            return True
        except SlackBusy:
            raise
        except SlackError as e:
            log_event(logging.DEBUG, "status_refused", channel=channel, error=e.code)
            return False

    def set_suggested_prompts(self, *, channel: str, thread_ts: str, prompts: list[str]) -> None:
        """``assistant.threads.setSuggestedPrompts``: what a new AI-pane thread offers."""
        self.api.call(
            "assistant.threads.setSuggestedPrompts",
            wait=5,
            channel_id=channel,
            thread_ts=thread_ts,
            title="Ask about GL Publisher or the Oracle GL",
            prompts=[{"title": p if len(p) <= 75 else p[:74] + "…", "message": p} for p in prompts],
        )

    def set_title(self, *, channel: str, thread_ts: str, title: str) -> None:
        """``assistant.threads.setTitle``: the AI-pane thread's name in the history list."""
        self.api.call(
            "assistant.threads.setTitle",
            wait=5,
            channel_id=channel,
            thread_ts=thread_ts,
            title=title,
        )

    def open_view(self, *, trigger_id: str, view: dict) -> None:
        """``views.open``: a modal (the trigger expires after 3 s, so this never waits)."""
        self.api.call("views.open", wait=0, trigger_id=trigger_id, view=view)

    def publish_home(self, *, user: str, view: dict) -> None:
        """``views.publish``: the person's Home tab."""
        self.api.call("views.publish", wait=10, user_id=user, view=view)


# Where Slack serves files and answers response_urls; a download follows a redirect only to
# these (HTTPS, the domain or a subdomain), at most MAX_REDIRECTS times, so the token and the
# bytes stay Slack's. The whole download of one question's files ends by DOWNLOAD_SECONDS.
SLACK_DOMAINS = ("slack.com", "slack-edge.com", "slack-files.com")
MAX_REDIRECTS = 3
DOWNLOAD_SECONDS = 15.0
DOWNLOAD_CHUNK = 64 * 1024


class SlackFiles:
    """Slack over plain HTTPS, not the Web API: files people attach (with the bot token), and
    a shortcut's ``response_url``; only ever to Slack's own hosts."""

    def __init__(self, web: WebClient):
        self.web = web

    def is_slack_url(self, url: str) -> bool:
        """Is ``url`` one of Slack's own (HTTPS on SLACK_DOMAINS, or the configured API host),
        where the bot token may go?"""
        api, target = urllib.parse.urlsplit(self.web.base_url), urllib.parse.urlsplit(url)
        host = (target.hostname or "").lower()
        return (target.scheme, target.netloc) == (api.scheme, api.netloc) or (
            target.scheme == "https"
            and any(host == d or host.endswith("." + d) for d in SLACK_DOMAINS)
        )

    def download(self, url: str, *, max_bytes: int, finish_by: float) -> bytes:
        """A file Slack hosts (``url_private``), with the bot token (needs ``files:read``): its
        bytes, by monotonic time ``finish_by``. Redirects are followed only
        to Slack's own hosts (the token goes nowhere else). SlackError if it cannot be fetched,
        is not a file (Slack answers a login page when the scope is missing), is larger than
        ``max_bytes``, redirects elsewhere, or is still arriving at ``finish_by``."""
        import http.client

        for _ in range(MAX_REDIRECTS + 1):
            if not self.is_slack_url(url):
                raise SlackError("files", "not_a_slack_file_url")
            target = urllib.parse.urlsplit(url)
            left = finish_by - time.monotonic()
            if left <= 0:
                raise SlackError("files", "too_slow")
            conn = (
                http.client.HTTPSConnection(target.netloc, timeout=left)
                if target.scheme == "https"
                else http.client.HTTPConnection(target.netloc, timeout=left)
            )
            try:
                conn.request(
                    "GET",
                    target.path + (f"?{target.query}" if target.query else ""),
                    headers={"Authorization": f"Bearer {self.web.token}"},
                )
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                    url = urllib.parse.urljoin(url, resp.getheader("Location"))
                    continue
                if resp.status != 200:
                    raise SlackError("files", f"http_{resp.status}")
                if resp.headers.get_content_type() == "text/html":
                    raise SlackError("files", "login_page (is files:read granted?)")
                return _read_by(resp, conn, max_bytes, finish_by)
            except (OSError, http.client.HTTPException) as e:
                raise SlackError("files", type(e).__name__) from None
            finally:
                conn.close()
        raise SlackError("files", "too_many_redirects")

    def respond(self, url: str, text: str) -> None:
        """An ephemeral ``text`` through a shortcut's ``response_url`` (Slack's own host only):
        how the bot reaches a person in a conversation it cannot post in."""
        if not self.is_slack_url(url):
            raise SlackError("response_url", "not_a_slack_url")
        import urllib.request

        request = urllib.request.Request(
            url,
            data=json.dumps({"text": text, "response_type": "ephemeral"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                resp.read()
        except (OSError, ValueError) as e:
            raise SlackError("response_url", type(e).__name__) from None


def _read_by(resp: Any, conn: Any, max_bytes: int, finish_by: float) -> bytes:
    """The body of ``resp``, at most ``max_bytes``, read a chunk at a time so a server that
    trickles bytes cannot hold the reader past ``finish_by``. Raises SlackError."""
    data = bytearray()
    while True:
        left = finish_by - time.monotonic()
        if left <= 0:
            raise SlackError("files", "too_slow")
        if conn.sock is not None:
            conn.sock.settimeout(left)
        chunk = resp.read1(DOWNLOAD_CHUNK)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > max_bytes:
            raise SlackError("files", "too_large")


def quietly(call: Callable[..., Any], **kwargs: Any) -> None:
    """Make a Slack call whose failure only needs a log line (prompts, titles, views, thanks)."""
    try:
        call(**kwargs)
    except SlackError as e:
        log_event(logging.WARNING, "slack_call_failed", method=e.method, error=e.code)


# The notices threads' lanes: each is one thread with its own queue, so a call of one kind never
# waits behind another kind's rate-budget wait. ``Notifier.submit`` names the lane.
NOTICE_LANES = {
    # views.open: Slack voids a trigger_id 3 s after the click, so nothing may queue ahead of it.
    "trigger": 16,
    # refusals (which may wait for chat.postMessage's 1/s per channel), feedback thanks, the AI
    # pane's prompts and titles: things a person is looking at right now.
    "notices": 256,
    # Home tab publishes: one per person at most queued (a newer view replaces nothing a person
    # could miss), so a flood of app_home_opened delays nobody else.
    "home": 256,
}


class Notifier:
    """The Slack calls the dispatcher needs, made off slack_sdk's listener pool, which must never
    wait on Slack (retries, rate budgets) on exactly the overload path. One thread per lane of
    NOTICE_LANES. ``submit`` with a ``key`` drops a task whose key is already queued in that
    lane. ``close`` lets each lane finish what is queued (up to a deadline) and stops them."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue[tuple[str, Callable[[], None]] | None]] = {
            lane: queue.Queue(maxsize=size) for lane, size in NOTICE_LANES.items()
        }
        self._queued_keys: set[str] = set()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"notices-{lane}", daemon=True)
            for lane, q in self._queues.items()
        ]
        for t in self._threads:
            t.start()

    def submit(self, task: Callable[[], None], *, lane: str = "notices", key: str = "") -> bool:
        with self._lock:
            if key and key in self._queued_keys:
                return False
            try:
                self._queues[lane].put_nowait((key, task))
            except queue.Full:
                log_event(logging.WARNING, "notice_dropped", lane=lane, reason="queue full")
                return False
            if key:
                self._queued_keys.add(key)
        return True

    def _run(self, lane: queue.Queue[tuple[str, Callable[[], None]] | None]) -> None:
        while (item := lane.get()) is not None:
            key, task = item
            with self._lock:
                self._queued_keys.discard(key)
            try:
                task()
            except Exception:
                log.exception("notice_failed")

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for lane in self._queues.values():
            with contextlib.suppress(queue.Full):
                lane.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


# ════════════════════════════════════════════════════════════════════════════════════════
# 7. Conversation (pure: no I/O in this section)
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
    files: list[dict] | None = None

    def __post_init__(self) -> None:
        # Normalised on the way in: a lone surrogate would break every encoder downstream.
        if self.text:
            msgspec.structs.force_setattr(self, "text", clean_text(self.text))


@dataclasses.dataclass(frozen=True)
class Question:
    """One question the bot will answer: where, who, what, and which thread to reply in."""

    event_id: str
    kind: str  # "mention" | "dm" | "followup" | "assistant" | "shortcut"
    channel: str
    user: str
    team: str
    text: str
    ts: str
    thread_ts: str  # where the reply goes: the event's thread, or the message itself
    in_thread: bool  # the message was already inside a thread (so there is history to read)
    files: tuple[dict, ...] = ()  # files attached to the question (screenshots)
    response_url: str = ""  # the shortcut's: where to tell the person if the bot cannot post


@dataclasses.dataclass(frozen=True)
class Ignored:
    reason: (
        str  # unsupported_event, subtype, bot, own_message, not_addressed, mention_twin, malformed
    )


_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")


def classify_event(
    event_type: str,
    event: SlackEvent,
    event_id: str,
    team_id: str,
    me: BotIdentity,
    *,
    follow_ups: bool = False,
) -> Question | Ignored:
    """Decide whether an Events API event is a question for the bot.

    ``app_mention`` -> a question in its thread; ``message`` in a DM (``channel_type: im``) ->
    a question threaded under it. With ``follow_ups``, a channel message inside a thread is a
    "followup" question (the worker checks that the thread started with a mention of the bot).
    A message with files (subtype ``file_share``) is a question like any other. Other bots, the
    bot itself, edits, deletions and every other subtype are ignored, as are
    other channel messages and channel messages that mention the bot (their ``app_mention``
    twin is the one answered).
    """
    if event_type not in ("app_mention", "message"):
        return Ignored("unsupported_event")
    if event.bot_id or event.subtype == "bot_message":
        return Ignored(
            "own_message" if event.bot_id == me.bot_id or event.user == me.user_id else "bot"
        )
    if (
        event.subtype and event.subtype != "file_share"
    ):  # a question with a screenshot is file_share
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
        files=tuple(event.files or ()),
    )


def strip_mention(text: str, bot_user_id: str) -> str:
    """Remove the bot's own ``<@ID>`` / ``<@ID|name>`` mentions; other people's stay."""
    return re.sub(
        r"\s{2,}",
        " ",
        _MENTION.sub(lambda m: "" if m.group(1) == bot_user_id else m.group(0), text),
    ).strip()


class QuestionTooLong(Exception):
    """The question alone (with the system prompt and knowledge) does not fit the context."""


SYSTEM_PROMPT = """\
You are ledger-bot, the Slack assistant of Wealthsimple's BOR Write team. You answer questions \
about GL Publisher and the Oracle General Ledger for engineers, in a Slack thread. Most of them \
work on other teams and are connecting their service to GL Publisher: onboarding an activity \
type, writing an Impact Builder, producing to its Kafka topic, reading the Oracle tables, \
finding out why an activity is stuck or failed.

How to answer:
- Write for Slack: short paragraphs, bullet lists, `code` and fenced code blocks; standard \
Markdown renders. No top-level headings for short answers.
- Ground answers in the team knowledge below when it covers the question. If the knowledge does \
not cover it, say so plainly and give your best general guidance, marked as such, with where \
to find out (the document to read, or #bor-write-eng). Never invent table names, job names, \
topics, mutations or configuration values.
- Keep it short: one to three paragraphs for most questions. Point the person to the document \
and section that has the detail instead of repeating it whole, and show code only when it \
answers the question.
- When there is a next step (a query to run, a log to read, a pull request to open, someone to \
ask), give it last, just before the Sources line.
- Cite what you used: end the answer with one last line `Sources: ` followed by the `source` \
labels of the documents you relied on, exactly as written in their tags, separated by " ; ". \
Leave the line out if you used none. Do not mention the labels anywhere else.
- Messages from people arrive prefixed with their Slack mention, e.g. "<@U123>: ...". Several \
people may be in the thread; answer the latest message, using the thread for context.
- Lead with the answer."""

# Added to SYSTEM_PROMPT when the repository tools are on (LEDGER_BOT_REPO).
TOOLS_PROMPT = """\
You can also read the GL Publisher repository (oracle-gl-publisher) itself, with the tools \
provided: its ADRs, its code, its Oracle GL schema reference and its Impact Builders. The team \
knowledge comes first; use the tools for what it does not hold, such as a specific class, file, \
column, ADR or configuration value, instead of guessing. A few targeted calls beat many broad \
ones. When a tool result is what you relied on, put the file's path, exactly as the tool \
printed it, on the Sources line beside any document labels."""


def build_llm_messages(
    *,
    question: Question,
    thread: list[dict],
    me: BotIdentity,
    system_prompt: str,
    max_messages: int,
    max_chars: int,
    knowledge: KnowledgeChoice | None = None,
    token_budget: int | None = None,
    count_tokens: Callable[[str], int] = len,
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
    history = [
        t
        for msg in thread
        if msg.get("ts") != question.ts
        and _ts_key(msg.get("ts", "0")) < _ts_key(question.ts)
        and (t := _thread_turn(msg, me))
    ]
    history = history[-(max_messages - 1) :] if max_messages > 1 else []
    chars_left = max_chars - len(asked[1])
    tokens_left = None
    if token_budget is not None:
        tokens_left = (
            token_budget
            - count_tokens(system_prompt)
            - count_tokens(knowledge.text if knowledge else "")
        )
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
    heading = (
        "Team knowledge (the whole knowledge base):"
        if knowledge.whole
        else "Team knowledge (the sections most relevant to this thread):"
    )
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
        window = rest[: limit - len(reopen) - _FENCE_RESERVE]  # room to close a fence
        cut = _best_cut(window)
        piece, rest = reopen + rest[:cut], rest[cut:]
        close, reopen = fence_seam(piece)
        pieces.append(piece + close)
    pieces.append(reopen + rest)
    return pieces


def next_piece(shown: str, pending: str, *, limit: int, soft_zone: int) -> tuple[str, str, bool]:
    """The rollover planner for a message that grows (a stream, or a message being updated).

    The message shows ``shown``; ``pending`` waits. Returns ``(send, rest, end)``: append
    ``send`` to the message; if ``end``, the message is full after it and ``rest`` (with any
    open code fence reopened) starts the next one; else ``rest`` is empty. Sent text cannot be
    taken back, so the cut is chosen as the message nears ``limit``: at the first paragraph
    break in its last ``soft_zone`` characters, or, once it would overflow, at the best line
    break or space that still leaves room to close a fence.
    """
    used = len(shown)
    if used + len(pending) <= limit - soft_zone:
        return pending, "", False
    room = max(0, limit - used - _FENCE_RESERVE)
    at = pending.find("\n\n", max(0, limit - soft_zone - used), room)
    if at >= 0:
        cut = at + 2
    elif used + len(pending) > limit - _FENCE_RESERVE:
        cut = _best_cut(pending[:room]) if room > 0 else 0
    else:
        return pending, "", False
    head, tail = pending[:cut], pending[cut:]
    close, reopen = fence_seam(shown + head)
    return head + close, reopen + tail, True


FENCE_CLOSE = "```"
_FENCE_RESERVE = len(FENCE_CLOSE) + 1  # a newline and the closing fence
_MAX_REOPEN = 64  # a longer "fence line" is reopened as a bare ```


def fence_seam(text: str) -> tuple[str, str]:
    """Where a message ending with ``text`` is cut: what closes it and what opens the next.
    ``("", "")`` unless ``text`` ends inside a fenced code block. The one home of fence repair."""
    fence = _open_fence(text)
    if fence is None:
        return "", ""
    return ("" if text.endswith("\n") else "\n") + FENCE_CLOSE, (
        fence if len(fence) <= _MAX_REOPEN else "```"
    ) + "\n"


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


# Anything that would notify a crowd: <!here>, <!channel>, <!everyone> (with or without a
# |label), <!subteam^ID> / <!subteam^ID|@group>, and the bare @here / @channel / @everyone.
_BROADCAST = re.compile(
    r"<!(here|channel|everyone)(?:\|[^>]*)?>|<!subteam\^[A-Za-z0-9]+(?:\|@?([^>]*))?>"
    r"|(?<![\w@])@(here|channel|everyone)\b",
    re.I,
)
_WORD_JOINER = "\u2060"


def neutralise_broadcasts(text: str) -> str:
    """``text`` with every crowd mention made inert: it still reads "@here" but a word joiner
    after the @ means Slack notifies no one. Idempotent."""

    def inert(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3) or m.group(2) or "group"
        return "@" + _WORD_JOINER + name.lstrip("@")

    # Any other special command (<!date…>, an unclosed <!here…) is made plain text too: the
    # bot never needs one, and a label split across chunks must not close into a mention.
    return _BROADCAST.sub(inert, text).replace("<!", "<" + _WORD_JOINER + "!")


def _unsafe_tail(text: str) -> int:
    """How many trailing characters of ``text`` could still become a crowd mention once more
    text arrives (an unclosed ``<!…``, a lone ``<``, or a bare ``@her``), and so must not be
    sent yet."""
    lt = text.rfind("<")
    if lt >= 0 and ">" not in text[lt:] and (text[lt : lt + 2] == "<!" or len(text) - lt == 1):
        return len(text) - lt
    at = re.search(r"@[A-Za-z]{0,8}$", text)
    return len(text) - at.start() if at else 0


SOURCES_MARK = "Sources:"


def _unemphasised(line: str) -> str:
    """``line`` without surrounding blanks and leading markdown emphasis (``**Sources:**``)."""
    return line.strip().lstrip("*_ ")


def _sources_line(line: str) -> str | None:
    """The labels part of a ``Sources:`` line (markdown emphasis allowed), else None."""
    stripped = _unemphasised(line)
    return stripped[len(SOURCES_MARK) :].strip("*_ ") if stripped.startswith(SOURCES_MARK) else None


class AnswerText:
    """The model's streamed text on its way to Slack (pure). ``feed`` returns what may be shown
    now; ``end`` returns the rest and the source labels cited on the answer's last
    ``Sources:`` line (see SYSTEM_PROMPT), which is never shown. A ``Sources:`` line followed
    by more text was ordinary text after all, and is shown. Crowd mentions are made inert;
    text that could still turn into one, into the last line, or be the blank space before it,
    is held back until more text decides."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        self._held += text
        held = self._held
        body = held.rstrip()
        last = body[body.rfind("\n") + 1 :]
        stripped = _unemphasised(last)
        if stripped and (stripped.startswith(SOURCES_MARK) or SOURCES_MARK.startswith(stripped)):
            upto = len(body) - len(last)  # the last line may be (or become) the Sources line
        else:
            upto = len(held) - _unsafe_tail(held)
        upto = len(held[:upto].rstrip())  # blank space waits: it may precede the Sources line
        out, self._held = held[:upto], held[upto:]
        return neutralise_broadcasts(out)

    def end(self) -> tuple[str, list[str]]:
        body = self._held.rstrip()
        self._held = ""
        start = body.rfind("\n") + 1
        labels = _sources_line(body[start:])
        if labels is None:
            return neutralise_broadcasts(body), []
        cited = [label.strip().strip("`[]*") for label in labels.split(";") if label.strip()]
        return neutralise_broadcasts(body[:start].rstrip()), cited


# -- the AI pane, the shortcut's modal, screenshots -----------------------------------------

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# Screenshots per question, and bytes per screenshot, that reach the model: Claude reads a few
# images per turn, each scaled to ~1.15 megapixels, so more or larger only costs memory.
IMAGE_MAX_COUNT = 4
IMAGE_MAX_BYTES = 5_000_000


def names_pane_thread(q: Question, thread: list[dict], me: BotIdentity) -> bool:
    """Does ``q`` name an AI-pane thread: is it a DM inside a thread (how Slack's assistant
    template knows a pane thread from the event alone, so any replica can tell) and the first
    message a person wrote in it?"""
    return (
        q.kind == "dm"
        and q.in_thread
        and not any(
            _ts_key(m.get("ts", "0")) < _ts_key(q.ts)
            and not m.get("bot_id")
            and m.get("user") not in (None, me.user_id)
            for m in thread
        )
    )


def thread_title(text: str, me: BotIdentity) -> str:
    """An AI-pane thread's title: its first question, on one line, at most 60 characters."""
    line = " ".join(strip_mention(text, me.user_id).split())
    return line if len(line) <= 60 else line[:59] + "…"


MODAL_TTL_SECONDS = 24 * 3600  # how long an opened modal may wait before it is submitted


def modal_where(
    key: bytes, *, channel: str, thread_ts: str, user: str, response_url: str, now: float
) -> str:
    """The modal's ``private_metadata``: where to answer, who may submit, where to tell them if
    the bot cannot post there, and when it was opened, signed with ``key`` (HMAC-SHA256; every
    replica derives the same key) so that a submission can only name a thread the bot offered
    that person."""
    fields = {"c": channel, "t": thread_ts, "u": user, "r": response_url, "at": int(now)}
    return json.dumps({**fields, "sig": _modal_signature(key, fields)})


def _modal_signature(key: bytes, fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def modal_key(bot_token: str) -> bytes:
    """The key that signs the shortcut modal's private_metadata: derived from the bot token,
    which every replica has, so any replica can check what another wrote."""
    return hmac.new(bot_token.encode(), b"ledger-bot modal", hashlib.sha256).digest()


@dataclasses.dataclass(frozen=True)
class ModalRejected:
    """A modal submission that asks nothing: ``errors`` (block_id -> message) are shown in the
    modal; with none, nothing is shown (the submission was not one this bot wrote for them)."""

    reason: str
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


def read_modal(view: dict, user: dict, key: bytes, *, now: float) -> Question | ModalRejected:
    """The question a submitted modal asks, to be answered in the thread it came from; its ts
    is "now", so the whole thread counts as history. A blank or over-long question is rejected
    with the modal's own error; a submission whose ``private_metadata`` this bot did not sign
    for the person submitting it is rejected silently."""
    block_id, action_id = MODAL_INPUT
    try:
        where = json.loads(view.get("private_metadata") or "{}")
        signature = str(where.pop("sig"))
        value = view["state"]["values"][block_id][action_id]["value"]
        text = str(value or "").strip()
        channel, thread_ts, signed_for = str(where["c"]), str(where["t"]), str(where["u"])
        opened = float(where["at"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return ModalRejected("malformed")
    expected = _modal_signature(key, where)
    if not hmac.compare_digest(signature, expected) or signed_for != str(user.get("id") or ""):
        return ModalRejected("not signed for this person")
    if now - opened > MODAL_TTL_SECONDS:
        return ModalRejected(
            "expired", {block_id: "This form has expired: use the shortcut again."}
        )
    if not text:
        return ModalRejected("blank", {block_id: "Please type a question."})
    if len(text) > MODAL_MAX_CHARS:
        return ModalRejected(
            "too long",
            {block_id: f"Please keep the question under {MODAL_MAX_CHARS:,} characters."},
        )
    return Question(
        event_id=f"view:{view.get('id', '')}",
        kind="shortcut",
        channel=channel,
        user=signed_for,
        team=str(user.get("team_id") or ""),
        text=clean_text(text),
        ts=f"{now:.6f}",
        thread_ts=thread_ts,
        in_thread=True,
        response_url=str(where.get("r") or ""),
    )


def choose_images(
    files: tuple[dict, ...], *, max_count: int, max_bytes: int
) -> tuple[list[dict], list[str]]:
    """Which attached files go to the model as images (PNG/JPEG/GIF/WebP within the caps), and
    the names of the others, which the answer mentions it skipped."""
    images: list[dict] = []
    skipped: list[str] = []
    for f in files:
        name = str(f.get("name") or f.get("title") or f.get("id") or "a file")
        url = f.get("url_private_download") or f.get("url_private")
        fits = isinstance(f.get("size"), int) and 0 < f["size"] <= max_bytes
        if f.get("mimetype") in IMAGE_TYPES and url and fits and len(images) < max_count:
            images.append(f)
        else:
            skipped.append(name)
    return images, skipped


def image_type(data: bytes) -> str | None:
    """The image type ``data`` really is, from its first bytes (PNG, JPEG, GIF, WebP), else
    None: what a file claims to be is not trusted, and the model rejects a mislabelled image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def with_images(messages: list[dict], images: list[tuple[str, bytes]]) -> list[dict]:
    """``messages`` with ``images`` (content type, bytes) added to the question, the last turn,
    as OpenAI-style ``image_url`` parts the gateway hands to Claude."""
    if not images:
        return messages
    import base64

    last = messages[-1]
    parts: list[dict] = (
        [{"type": "text", "text": last["content"]}]
        if isinstance(last["content"], str)
        else list(last["content"])
    )
    for kind, data in images:
        parts.append(
            {
                "type": "image_url",
                "image_url": {"url": f"data:{kind};base64,{base64.b64encode(data).decode()}"},
            }
        )
    return [*messages[:-1], {**last, "content": parts}]


# What Claude bills for one image at most: (width x height) / 750 tokens, and larger images are
# scaled down to about 1.15 megapixels first (Anthropic's vision docs).
IMAGE_TOKENS = 1_600


def without_images(messages: list[dict]) -> tuple[list[dict], int]:
    """``messages`` without the image parts ``with_images`` added, and how many there were."""
    out: list[dict] = []
    images = 0
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            kept = [p for p in content if p.get("type") != "image_url"]
            images += len(content) - len(kept)
            m = {**m, "content": kept}
        out.append(m)
    return out, images


def skipped_files_note(skipped: list[str], unreadable: list[str]) -> str:
    notes = []
    if skipped:
        notes.append(
            "I can read images only (PNG, JPEG, GIF, WebP, within size limits), so I skipped "
            + ", ".join(f"`{n}`" for n in skipped)
            + "."
        )
    if unreadable:
        notes.append("I couldn't open " + ", ".join(f"`{n}`" for n in unreadable) + ".")
    return ("\n\n_" + " ".join(notes) + "_") if notes else ""


# ════════════════════════════════════════════════════════════════════════════════════════
# 8. Knowledge
# ════════════════════════════════════════════════════════════════════════════════════════
# The team's documents (LEDGER_BOT_KNOWLEDGE). When they fit their share of the context they
# go whole into the system prompt, marked for prompt caching; otherwise each question gets the
# best-matching sections by BM25, each labelled with its file and heading so answers can cite.
# KnowledgeStore reloads the files when they change, swapping the index whole.

KNOWLEDGE_SUFFIXES = (".md", ".txt")
# How often a question may look at the files for a change: cheap (a stat per file), and a
# document change is live within seconds without anyone waiting for it.
KNOWLEDGE_RELOAD_SECONDS = 10.0
# The share of the model's context the knowledge may fill; the rest is the thread, the question
# and the answer.
KNOWLEDGE_SHARE = 0.5


def knowledge_files(path: Path) -> list[Path]:
    """The knowledge files under ``path`` (a file or a folder, searched recursively), sorted."""
    if path.is_file():
        return [path] if path.suffix.lower() in KNOWLEDGE_SUFFIXES else []
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWLEDGE_SUFFIXES
        )
    return []


@dataclasses.dataclass(frozen=True)
class Section:
    source: str  # file path relative to the knowledge root
    heading: str  # the heading trail, e.g. "Runbook > Restarting"
    text: str
    url: str = ""  # the document's source_url front matter, if any

    @property
    def label(self) -> str:
        return f"{self.source} § {self.heading}" if self.heading else self.source

    def render(self) -> str:
        return f'<document source="{self.label}">\n{self.text.strip()}\n</document>'


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)


def front_matter(text: str) -> tuple[dict[str, str], str]:
    """A document's ``---``-fenced ``key: value`` header (e.g. ``source_url:``) and the rest."""
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    fields = {}
    for line in m.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip().lower()] = value.strip().strip("\"'")
    return fields, text[m.end() :]


def split_sections(source: str, text: str) -> list[Section]:
    """Split a Markdown document at its headings; text before the first heading is a section too.
    Headings inside fenced code blocks are not headings. Front matter is read, not indexed."""
    meta, text = front_matter(text)
    url = meta.get("source_url", "")
    url = url if re.match(r"^https?://\S+$", url) else ""
    sections: list[Section] = []
    trail: list[str] = []
    lines: list[str] = []
    in_fence = False

    def close() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(source, " > ".join(trail), body, url))
        lines.clear()

    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match:
            close()
            level = len(match.group(1))
            trail[:] = [*trail[: level - 1], match.group(2)]
        lines.append(line)
    close()
    return sections


def load_knowledge(path: Path) -> list[Section]:
    """Read every knowledge file under ``path`` into sections. Raises OSError or
    UnicodeDecodeError for a file that cannot be read as UTF-8: a broken file is an error."""
    root = path if path.is_dir() else path.parent
    sections: list[Section] = []
    for file in knowledge_files(path):
        text = file.read_text(encoding="utf-8")
        sections.extend(split_sections(str(file.relative_to(root)), text))
    return sections


_WORD = re.compile(r"[a-z0-9_]{2,}")
# Words that match every section and rank none: without them "what does EU02 mean" ranks by
# "what" and "does" as much as by "eu02" (measured with --eval, see README › Retrieval).
STOPWORDS = frozenset(
    (
        "a an and any are as at be but by can could did do does for from has have how if in into "
        "is it its me my no not of on or our should so that the their them then there these they "
        "this to was we were what when where which who why will with would you your"
    ).split()
)
# A section scoring under this share of the best one is noise, however much budget is left.
RELEVANCE_CUTOFF = 0.3


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


class BM25:
    """A BM25 index over sections, built once: documents are tokenised at load, not per question."""

    def __init__(self, sections: list[Section], *, k1: float = 1.2, b: float = 0.75):
        self.sections = sections
        self.k1, self.b = k1, b
        docs = [_terms(s.label + " " + s.text) for s in sections]
        self._counts = [collections.Counter(d) for d in docs]
        self._lengths = [len(d) for d in docs]
        self._avg = (sum(self._lengths) / len(docs) or 1.0) if docs else 1.0
        self._norms = [self.k1 * (1 - self.b + self.b * n / self._avg) for n in self._lengths]
        df: collections.Counter[str] = collections.Counter()
        for counts in self._counts:
            df.update(counts.keys())
        n = len(docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def rank(self, query: str) -> list[Section]:
        """Sections by relevance to ``query`` (ties keep document order); sections sharing no
        term with the query, or scoring under RELEVANCE_CUTOFF of the best, are left out."""
        scored = self.scores(query)
        best = scored[0][0] if scored else 0.0
        return [self.sections[i] for score, i in scored if score >= RELEVANCE_CUTOFF * best]

    def scores(self, query: str) -> list[tuple[float, int]]:
        """(score, section index) for every section sharing a term with ``query``, best first."""
        terms = set(_terms(query)) & self._idf.keys()
        scored = []
        for index, counts in enumerate(self._counts):
            score = 0.0
            for term in terms:
                tf = counts.get(term, 0)
                if tf:
                    score += self._idf[term] * tf * (self.k1 + 1) / (tf + self._norms[index])
            if score > 0:
                scored.append((score, index))
        return sorted(scored, key=lambda pair: (-pair[0], pair[1]))


@dataclasses.dataclass(frozen=True)
class KnowledgeChoice:
    """What goes into the system prompt: the text, whether it is the whole (cacheable) base,
    and which sections were chosen."""

    text: str
    whole: bool
    sections: tuple[Section, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.sections)


def choose_knowledge(
    index: BM25, section_tokens: list[int], query: str, budget: int
) -> KnowledgeChoice:
    """All sections if they fit ``budget`` tokens; else the most relevant ones that fit."""
    sections = index.sections
    if sum(section_tokens) <= budget:
        return KnowledgeChoice("\n\n".join(s.render() for s in sections), True, tuple(sections))
    position = {id(s): i for i, s in enumerate(sections)}
    chosen: list[Section] = []
    left = budget
    for section in index.rank(query):
        cost = section_tokens[position[id(section)]]
        if cost <= left:
            chosen.append(section)
            left -= cost
    chosen.sort(key=lambda s: position[id(s)])
    return KnowledgeChoice("\n\n".join(s.render() for s in chosen), False, tuple(chosen))


class KnowledgeBase:
    """One loaded version of the knowledge: sections, their BM25 index and their token counts
    (counted once on first use: counting needs litellm, which is not imported at start-up)."""

    def __init__(self, sections: list[Section]):
        self.sections = sections
        self.index = BM25(sections)
        self._tokens: list[int] | None = None
        self._lock = threading.Lock()

    def rank(self, query: str) -> list[Section]:
        """Every section sharing a term with ``query``, best first, with no cut-off: the
        ranking the eval's ranked measures read."""
        return [self.sections[i] for _, i in self.index.scores(query)]

    def choose(self, query: str, budget: int, count: Callable[[str], int]) -> KnowledgeChoice:
        with self._lock:
            if self._tokens is None:
                self._tokens = [count(s.render()) for s in self.sections]
        return choose_knowledge(self.index, self._tokens, query, budget)


class KnowledgeStore:
    """The current KnowledgeBase, reloaded when the files under ``path`` change (checked at most
    every ``check_every`` s, by whoever asks for ``current()``). A reload that fails keeps the
    old knowledge and logs one ``knowledge_reload_failed`` line per broken version."""

    def __init__(self, path: Path):
        self.path = path
        self.check_every = KNOWLEDGE_RELOAD_SECONDS
        self._lock = threading.Lock()
        self._fingerprint = self._scan()
        self._base = KnowledgeBase(load_knowledge(path))
        self._checked = time.monotonic()
        self._failed: tuple | None = None

    def _scan(self) -> tuple:
        out = []
        for file in knowledge_files(self.path):
            with contextlib.suppress(OSError):
                st = file.stat()
                out.append((str(file), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def current(self) -> KnowledgeBase:
        now = time.monotonic()
        if (self.check_every and now - self._checked < self.check_every) or not self._lock.acquire(
            blocking=False
        ):
            return self._base
        try:
            self._checked = now
            fingerprint = self._scan()
            if fingerprint != self._fingerprint and fingerprint != self._failed:
                try:
                    base = KnowledgeBase(load_knowledge(self.path))
                    if not base.sections:
                        raise ValueError("no sections: every knowledge file is empty or gone")
                except (OSError, UnicodeDecodeError, ValueError) as e:
                    self._failed = fingerprint
                    log_event(
                        logging.ERROR,
                        "knowledge_reload_failed",
                        path=str(self.path),
                        error=f"{type(e).__name__}: {e}",
                        kept_sections=len(self._base.sections),
                    )
                else:
                    self._base, self._fingerprint, self._failed = base, fingerprint, None
                    log_event(
                        logging.INFO,
                        "knowledge_reloaded",
                        path=str(self.path),
                        sections=len(base.sections),
                    )
        finally:
            self._lock.release()
        return self._base


# ════════════════════════════════════════════════════════════════════════════════════════
# 9. Repository tools
# ════════════════════════════════════════════════════════════════════════════════════════
# Read-only tools over a checkout of the GL Publisher repository (LEDGER_BOT_REPO), for the
# detail the curated knowledge cannot hold: its ADRs, code and schema reference. The checkout is
# indexed once per commit, off the answer path, into SQLite FTS5 (FullText), and every tool reads
# the index, never the disk a sync may be rewriting: each result, and each link, is of the
# indexed commit. A tool is a plain function over a RepoIndex with a msgspec argument type (its
# JSON schema comes from the type), so the same set could be served over MCP.

# FTS5's trigram tokenizer needs SQLite 3.34; Python's sqlite3 links whatever the image has.
FTS5_MIN_SQLITE = (3, 34, 0)


class RetrievalUnavailable(Exception):
    """This Python's SQLite lacks FTS5 or its trigram tokenizer."""


@functools.cache
def check_fts5() -> str:
    """The SQLite version, if it has FTS5 (``pragma compile_options``) and the trigram
    tokenizer; raises RetrievalUnavailable saying what is missing."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        options = {row[0] for row in db.execute("PRAGMA compile_options")}
    if "ENABLE_FTS5" not in options or sqlite3.sqlite_version_info < FTS5_MIN_SQLITE:
        raise RetrievalUnavailable(
            f"the repository tools need SQLite 3.34+ with FTS5; this Python has SQLite "
            f"{sqlite3.sqlite_version}{'' if 'ENABLE_FTS5' in options else ' without FTS5'}"
        )
    return sqlite3.sqlite_version


def fts_match(terms: Iterable[str]) -> str:
    """An FTS5 MATCH expression for any of ``terms``, each a quoted string (so no term is read
    as FTS5 syntax); "" when there are none."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in dict.fromkeys(terms) if t)


@dataclasses.dataclass(frozen=True)
class Hit:
    row: int  # the row's position among the rows as given, from 0
    score: float  # -bm25(): higher is better


class FullText:
    """An SQLite FTS5 table in memory, ranked by ``bm25()`` (k1 1.2, b 0.75); standard library.

    Rows are indexed once, in the order given, then only read: threads share the connection
    under a lock (a query takes a millisecond or two). The repository's files go to the
    ``trigram`` tokenizer, so any three or more characters of an identifier find it
    (``ImpactBuild`` matches ``TradeBuyImpactBuilder``), case-insensitively. (The knowledge
    stays on its own BM25: on this engine the eval measured a small loss, README › Retrieval.)"""

    def __init__(
        self, columns: tuple[str, ...], rows: Iterable[tuple[str, ...]], *, tokenizer: str
    ):
        check_fts5()
        self.columns = columns
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        names = ", ".join(columns)
        self._db.execute(f'CREATE VIRTUAL TABLE doc USING fts5({names}, tokenize="{tokenizer}")')
        marks = ", ".join("?" * len(columns))
        self._db.executemany(f"INSERT INTO doc({names}) VALUES ({marks})", rows)
        self._db.commit()

    def search(
        self,
        match: str,
        *,
        where: str = "",
        params: tuple = (),
        limit: int = -1,
        weights: tuple[float, ...] = (),
    ) -> list[Hit]:
        """Rows matching ``match`` (``fts_match``) and the SQL condition ``where`` on the
        columns (with ``params``), best first (``weights`` per column), ties in row order."""
        if not match:
            return []
        rank = f"bm25(doc{''.join(f', {w}' for w in weights)})"
        condition = f" AND ({where})" if where else ""
        sql = (
            f"SELECT rowid, -{rank} FROM doc WHERE doc MATCH ?{condition} "
            f"ORDER BY {rank}, rowid LIMIT ?"
        )
        with self._lock:
            found = self._db.execute(sql, (match, *params, limit)).fetchall()
        return [Hit(rowid - 1, score) for rowid, score in found]

    def rows(self, where: str, params: tuple = ()) -> list[tuple]:
        """``(position, *columns)`` of the rows meeting ``where``, in row order."""
        names = ", ".join(self.columns)
        with self._lock:
            return self._db.execute(
                f"SELECT rowid - 1, {names} FROM doc WHERE {where} ORDER BY rowid", params
            ).fetchall()


# -- the checkout ---------------------------------------------------------------------------

# Never indexed, so never returned: folders of build output and tooling, files over
# REPO_FILE_MAX_BYTES, binaries, anything but a regular file (a symlink could point anywhere,
# a pipe would never end), names that are not UTF-8, and anything secret-shaped by name
# (any case) or by content.
REPO_SKIP_DIRS = frozenset({".git", "target", "build", "node_modules", ".gradle", ".idea"})
REPO_FILE_MAX_BYTES = 1_000_000
SECRET_DIRS = frozenset({".aws", ".ssh", ".gnupg", ".docker", ".kube", "secrets"})
SECRET_NAMES = (
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk",
    "*.p8", "*.kdbx", "*.tfvars", "*.tfstate", "*.tfstate.*", "id_rsa*", "id_dsa*",
    "id_ecdsa*", "id_ed25519*", ".netrc", ".npmrc", ".pypirc", ".pgpass", ".htpasswd",
    "credentials", "credentials.*", "kubeconfig",
)  # fmt: skip
_CREDENTIAL_KEY = r"[\w.-]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|token)"
SECRET_CONTENT = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY(?: BLOCK)?-----|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\bxox[abposre]-[A-Za-z0-9-]{10,}|\bxapp-[A-Za-z0-9-]{10,}|\bsk-[A-Za-z0-9_-]{20,}"
    r"|\b[sr]k_live_[A-Za-z0-9]{16,}|\bAIza[0-9A-Za-z_-]{35}"
    r"|\bgh[pousr]_[A-Za-z0-9]{36}\b|\bgithub_pat_[A-Za-z0-9_]{22,}"
    # A literal credential, quoted (a ${PLACEHOLDER} is fine) ...
    rf"|(?i:{_CREDENTIAL_KEY}[\"']?\s*[:=]\s*[\"'][^\"'\s$]{{12,}}[\"'])"
    # ... or bare at the end of a line, as properties and ini files write one: a token of
    # letters and digits, not a call or an expression.
    rf"|(?im:{_CREDENTIAL_KEY}\s*[:=][ \t]*(?=[\w+/=-]*\d)(?=[\w+/=-]*[a-z])[\w+/=-]{{12,}}[ \t]*$)"
)
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# How often an answer may look at the checkout for a new commit: a few small file reads.
REPO_CHECK_SECONDS = 10.0
# How often a version whose build failed is tried again (a folder that is not a git checkout
# has no commit to change: missing or empty at start-up, it would otherwise never be indexed).
REPO_RETRY_SECONDS = 300.0


def secret_shaped(path: str) -> bool:
    """Is ``path`` (relative, with /) named like a secret, or in a folder of them?"""
    *folders, name = path.lower().split("/")
    return not SECRET_DIRS.isdisjoint(folders) or any(
        fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_NAMES
    )


def checkout_commit(root: Path) -> str | None:
    """The commit checked out at ``root``, read from git's own files (the image has no git):
    ``.git`` a folder, or a file naming one (a worktree, as git-sync makes); HEAD detached or a
    branch, its ref loose or packed. None if it cannot be told."""
    try:
        git = root / ".git"
        gitdir = git
        if git.is_file():
            pointer = git.read_text(encoding="utf-8").strip()
            if not pointer.startswith("gitdir:"):
                return None
            gitdir = root / pointer[len("gitdir:") :].strip()
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head if _SHA.fullmatch(head) else None
        ref = head[len("ref:") :].strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()
        for base in (gitdir, common):
            if (base / ref).is_file():
                sha = (base / ref).read_text(encoding="utf-8").strip()
                return sha if _SHA.fullmatch(sha) else None
        if (common / "packed-refs").is_file():
            for line in (common / "packed-refs").read_text(encoding="utf-8").splitlines():
                sha, _, name = line.partition(" ")
                if name.strip() == ref and _SHA.fullmatch(sha):
                    return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def repo_files(root: Path) -> tuple[list[tuple[str, str]], collections.Counter[str]]:
    """The files under ``root`` worth indexing, as (path with /, text), sorted by path; and
    how many were left out, by reason."""
    kept: list[tuple[str, str]] = []
    left_out: collections.Counter[str] = collections.Counter()

    def unreadable(_: OSError) -> None:
        left_out["unreadable"] += 1

    # Symlinked folders are listed, never entered; one that cannot be listed is counted.
    for folder, dirs, names in os.walk(root, onerror=unreadable):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d not in REPO_SKIP_DIRS)
        for name in names:
            if name == ".git":  # git-sync's worktree: a file pointing at the repository
                continue
            file = here / name
            path = file.relative_to(root).as_posix()
            try:
                reason, text = _read_indexable(file, path)
            except OSError:
                reason, text = "unreadable", ""
            if reason:
                left_out[reason] += 1
            else:
                kept.append((path, text))
    kept.sort()
    return kept, left_out


def _read_indexable(file: Path, path: str) -> tuple[str, str]:
    """("", text) for a file worth indexing, else (why not, "")."""
    info = file.lstat()
    if stat.S_ISLNK(info.st_mode):
        return "symlink", ""
    if not stat.S_ISREG(info.st_mode):
        return "special", ""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a name git allows and SQLite refuses
        return "name", ""
    if secret_shaped(path):
        return "secret", ""
    if info.st_size > REPO_FILE_MAX_BYTES:
        return "large", ""
    data = file.read_bytes()
    if b"\0" in data[:8192]:
        return "binary", ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", ""
    if SECRET_CONTENT.search(text):
        return "secret", ""
    return "", text


RENDERED_SUFFIXES = (".md", ".markdown", ".rst", ".adoc")


class RepoIndex:
    """One indexed commit of the repository: its files in a FullText (trigram; path and text),
    served to the tools. ``url`` (LEDGER_BOT_REPO_URL) makes links; the files' text is only
    ever read from here."""

    def __init__(self, files: list[tuple[str, str]], *, commit: str | None, url: str):
        self.commit, self.url = commit, url.rstrip("/")
        self.paths = {path: i for i, (path, _) in enumerate(files)}
        self.text = FullText(("path", "text"), files, tokenizer="trigram")
        self.left_out: collections.Counter[str] = collections.Counter()

    @classmethod
    def build(cls, root: Path, url: str) -> RepoIndex:
        """Index the checkout at ``root`` (raises OSError if it cannot be read)."""
        files, left_out = repo_files(root)
        index = cls(files, commit=checkout_commit(root), url=url)
        index.left_out = left_out
        return index

    def read_row(self, position: int) -> tuple[str, str]:
        """(path, text) of the file at ``position``."""
        _, path, text = self.text.rows("rowid = ?", (position + 1,))[0]
        return path, text

    def read(self, path: str) -> str | None:
        """The indexed text of ``path``, or None."""
        position = self.paths.get(path)
        return None if position is None else self.read_row(position)[1]

    def link(self, path: str, lines: tuple[int, int] | None = None) -> str:
        """The web address of ``path`` at the indexed commit (and ``lines``); "" without a
        LEDGER_BOT_REPO_URL."""
        if not self.url:
            return ""
        anchor = f"#L{lines[0]}-L{lines[1]}" if lines else ""
        if anchor and path.lower().endswith(RENDERED_SUFFIXES):
            anchor = "?plain=1" + anchor  # GitHub numbers a rendered file's lines only as source
        return f"{self.url}/blob/{self.commit or 'HEAD'}/{urllib.parse.quote(path)}{anchor}"


class RepoStore:
    """The current RepoIndex of the checkout at ``root``, rebuilt in a background thread when
    its commit (or the folder the path resolves to) changes; ``current()`` looks at most every
    REPO_CHECK_SECONDS. A build that fails, or whose checkout changed under it, keeps the old
    index and logs one ``repo_index_failed`` line per broken version; that version is tried
    again every REPO_RETRY_SECONDS. A folder that is not a git checkout is indexed once."""

    def __init__(self, root: Path, url: str, metrics: Metrics | None = None):
        self.root, self.url, self.metrics = root, url, metrics
        self.built = threading.Event()  # set when the first build has ended, either way
        self._index: RepoIndex | None = None
        self._version: tuple[str, str | None] | None = None
        self._failed: tuple[str, str | None] | None = None
        self._failed_at = 0.0
        self._checked = 0.0
        self._building: threading.Thread | None = None
        self._lock = threading.Lock()

    def version(self) -> tuple[str, str | None]:
        real = os.path.realpath(self.root)
        return real, checkout_commit(Path(real))

    def start(self) -> None:
        """Build the first index, in the background (``built`` says when it has ended)."""
        self._checked = time.monotonic()
        self._rebuild_if_changed()

    def current(self) -> RepoIndex | None:
        now = time.monotonic()
        if now - self._checked >= REPO_CHECK_SECONDS:
            self._checked = now
            self._rebuild_if_changed()
        return self._index

    def wait_building(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for a build under way (tests, shutdown)."""
        building = self._building
        if building is not None:
            building.join(timeout)

    def _rebuild_if_changed(self) -> None:
        with self._lock:
            if self._building is not None and self._building.is_alive():
                return
            version = self.version()
            retry_due = time.monotonic() - self._failed_at >= REPO_RETRY_SECONDS
            if version == self._version or (version == self._failed and not retry_due):
                return
            self._building = threading.Thread(
                target=self._build, args=(version,), name="repo-index", daemon=True
            )
            self._building.start()

    def _build(self, version: tuple[str, str | None]) -> None:
        started = time.monotonic()
        try:
            index = RepoIndex.build(Path(version[0]), self.url)
            if not index.paths:
                raise ValueError("no text files to index")
            if self.version() != version:
                raise ValueError("the checkout changed while it was being indexed")
        except (OSError, ValueError, sqlite3.Error, RetrievalUnavailable) as e:
            again = version == self._failed
            self._failed, self._failed_at = version, time.monotonic()
            if again:
                return  # said once already
            log_event(
                logging.ERROR,
                "repo_index_failed",
                path=str(self.root),
                commit=version[1],
                error=f"{type(e).__name__}: {e}",
                kept_commit=self._index.commit if self._index else None,
            )
        else:
            self._index, self._version, self._failed = index, version, None
            if self.metrics is not None:
                self.metrics.repo_info.clear()
                self.metrics.repo_info.labels(commit=index.commit or "unknown").set(1)
                self.metrics.repo_files.set(len(index.paths))
            log_event(
                logging.INFO,
                "repo_indexed",
                path=str(self.root),
                commit=index.commit,
                files=len(index.paths),
                left_out=dict(index.left_out),
                seconds=round(time.monotonic() - started, 2),
            )
        finally:
            self.built.set()


# -- the tools ------------------------------------------------------------------------------

# What a tool result may hold: about 1,500 tokens, so four rounds of a few calls stay small
# beside the knowledge; a result that is cut says so and how to get the rest.
TOOL_RESULT_MAX_CHARS = 6_000
SEARCH_FILES = 8  # files a search returns, best first
LINES_PER_FILE = 2  # matching lines shown per file, each with CONTEXT_LINES around it
CONTEXT_LINES = 2
ADR_GLOB = "docs/adr/*.md"
SCHEMA_FILE = "docs/oracle-gl-schema-reference.md"
IMPACT_BUILDER_GLOB = "queue-processor/*/glrecordbuilders/*ImpactBuilder.kt"
_CODE_WORD = re.compile(r"\w[\w.]*\w")
_ACCEPTED_TYPE = re.compile(r"acceptedType\b[^=]*=\s*([\w.]+)::class")


class ToolFailure(Exception):
    """A tool cannot do what it was asked; the message is for the model."""


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a tool call gives the model (``text``), and the repository files it showed, each
    with the lines shown (None: the file as a whole), for links."""

    text: str
    files: tuple[tuple[str, tuple[int, int] | None], ...] = ()
    ok: bool = True


def code_terms(query: str) -> list[str]:
    """The words of ``query`` worth searching for: identifiers and words of 3+ characters
    (dots kept: ``original.externalSourceId``), not stop words."""
    return [w for w in _CODE_WORD.findall(query) if len(w) >= 3 and w.lower() not in STOPWORDS]


def _quoted(value: str | None, limit: int = 60) -> str:
    value = " ".join((value or "").split())
    return f"“{value[:limit]}{'…' if len(value) > limit else ''}”"


def capped(text: str, limit: int = TOOL_RESULT_MAX_CHARS) -> str:
    """``text``, cut at a line break before ``limit`` characters with a note saying so."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit - 200)
    cut = cut if cut > limit // 2 else limit - 200
    return (
        text[:cut] + f"\n[cut: {len(text) - cut:,} more characters not shown; narrow the query, or "
        "read_file a line range]"
    )


def source_lines(text: str) -> list[str]:
    """``text``'s lines as GitHub numbers them: split at newlines only (``splitlines`` also
    splits at form feeds and Unicode separators, and the numbers would drift)."""
    if not text:
        return []
    return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]


def numbered(lines: list[str], first: int) -> str:
    return "\n".join(f"{n:>5}  {line}" for n, line in enumerate(lines, first))


def _line_hits(text: str, terms: list[str]) -> list[tuple[int, int]]:
    """Windows (first, last line, 1-based) around the lines of ``text`` that hold the most
    ``terms``, at most LINES_PER_FILE, merged where they touch."""
    lowered = [t.lower() for t in terms]
    lines = source_lines(text)
    scored = [(-sum(t in line.lower() for t in lowered), n) for n, line in enumerate(lines, 1)]
    best = sorted(s for s in scored if s[0] < 0)[:LINES_PER_FILE]
    windows: list[tuple[int, int]] = []
    for _, n in sorted(best, key=lambda s: s[1]):
        a, b = max(1, n - CONTEXT_LINES), min(len(lines), n + CONTEXT_LINES)
        if windows and a <= windows[-1][1] + 1:
            windows[-1] = (windows[-1][0], b)
        else:
            windows.append((a, b))
    return windows


def _title_and_status(text: str) -> tuple[str, str]:
    """An ADR's first heading and its status (a ``Status:`` line, or a ``## Status`` section's
    first line)."""
    title = next((ln[2:].strip() for ln in text.splitlines() if ln.startswith("# ")), "")
    found = re.search(r"^\W*Status\W*:\s*(.+)$", text, re.M | re.I) or re.search(
        r"^#+\s*Status\s*\n+\s*(\S.*)$", text, re.M | re.I
    )
    return title, (found.group(1).strip(" *_") if found else "unknown")


class ToolArgs(msgspec.Struct, forbid_unknown_fields=True):
    """A tool's arguments; ``step()`` says what the call is doing, for a person."""

    def step(self) -> str:
        raise NotImplementedError


class SearchAdrs(ToolArgs):
    """Search the Architecture Decision Records (docs/adr/*.md): each match with its file,
    title, status and the passage that matched. Words, not sentences: e.g. "reversal",
    "idempotency key". A query with no searchable words lists every ADR."""

    query: Annotated[str, msgspec.Meta(max_length=200)]

    def step(self) -> str:
        return f"Searching ADRs for {_quoted(self.query)}"


def search_adrs(index: RepoIndex, args: SearchAdrs) -> ToolResult:
    where, params = "path GLOB ? AND path NOT GLOB '*README.md'", (ADR_GLOB,)
    terms = code_terms(args.query)
    if terms:
        hits = index.text.search(fts_match(terms), where=where, params=params)
        found = [index.read_row(h.row) for h in hits]
        # An ADR whose title names what was asked comes first; bm25 orders the rest.
        found.sort(
            key=lambda f: -sum(t.lower() in _title_and_status(f[1])[0].lower() for t in terms)
        )
        found = found[:SEARCH_FILES]
    else:
        found = [(path, text) for _, path, text in index.text.rows(where, params)]
    if not found:
        return ToolResult(f"No ADR mentions {args.query!r}.")
    out = []
    for path, text in found:
        title, status = _title_and_status(text)
        out.append(f"{path}\n  {title} (status: {status})")
        lines = source_lines(text)
        for a, b in _line_hits(text, terms)[:1]:
            out.append(numbered(lines[a - 1 : b], a))
    return ToolResult("\n".join(out), tuple((path, None) for path, _ in found))


class SearchCode(ToolArgs):
    """Search the repository's code and documents (*.kt, *.java, *.sql, *.md, *.yaml, ...)
    for identifiers or words, e.g. "ReversalImpactBuilder" or "attribute6 tradeId"; any 3+
    characters of an identifier match. Returns path:line with the lines around each match.
    ``path_glob`` narrows it, e.g. "queue-processor/*.kt" (* matches across folders)."""

    query: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    path_glob: Annotated[str, msgspec.Meta(max_length=200)] | None = None

    def step(self) -> str:
        return f"Searching the code for {_quoted(self.query)}" + (
            f" in {_quoted(self.path_glob)}" if self.path_glob else ""
        )


def search_code(index: RepoIndex, args: SearchCode) -> ToolResult:
    terms = code_terms(args.query)
    if not terms:
        raise ToolFailure("the query has no searchable words (3+ characters, not stop words)")
    where, params = ("path GLOB ?", (args.path_glob,)) if args.path_glob else ("", ())
    hits = index.text.search(
        fts_match(terms), where=where, params=params, limit=SEARCH_FILES, weights=(2.0, 1.0)
    )
    if not hits:
        glob = f" in {args.path_glob}" if args.path_glob else ""
        return ToolResult(f"Nothing matches {args.query!r}{glob}.")
    out: list[str] = []
    files = []
    for hit in hits:
        path, text = index.read_row(hit.row)
        lines = source_lines(text)
        windows = _line_hits(text, terms) or [(1, min(len(lines), 1 + 2 * CONTEXT_LINES))]
        for a, b in windows:
            out.append(f"{path}:{a}\n{numbered(lines[a - 1 : b], a)}")
        files.append((path, (windows[0][0], windows[-1][1])))
    return ToolResult("\n\n".join(out), tuple(files))


class ReadFile(ToolArgs):
    """Read one file of the repository by its path (as the searches print it), numbered; or
    the lines ``start_line`` to ``end_line`` of it (1-based, inclusive)."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    start_line: Annotated[int, msgspec.Meta(ge=1)] | None = None
    end_line: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def step(self) -> str:
        lines = f", lines {self.start_line or 1}–{self.end_line or 'end'}"
        return f"Reading {_quoted(self.path, 120)}" + (
            lines if self.start_line or self.end_line else ""
        )


def read_file(index: RepoIndex, args: ReadFile) -> ToolResult:
    path = posixpath.normpath(args.path.strip().removeprefix("./"))
    if path.startswith(("/", "../")) or path == "..":
        raise ToolFailure(f"{args.path} is outside the repository")
    if secret_shaped(path):
        raise ToolFailure(f"{path} is secret-shaped; it is never read")
    text = index.read(path)
    if text is None:
        raise ToolFailure(
            f"{path} is not in the repository's index (no such file, or a binary, "
            "generated, oversized or secret-shaped file)"
        )
    lines = source_lines(text)
    first = args.start_line or 1
    last = min(args.end_line or len(lines), len(lines))
    if first > max(len(lines), 1) or first > last:
        raise ToolFailure(f"{path} has {len(lines)} lines; lines {first}-{last} do not exist")
    body = numbered(lines[first - 1 : last], first)
    whole = first == 1 and last == len(lines)
    return ToolResult(
        f"{path} (lines {first}-{last} of {len(lines)})\n{body}",
        ((path, None if whole else (first, last)),),
    )


class GetSchemaInfo(ToolArgs):
    """The Oracle GL schema reference (docs/oracle-gl-schema-reference.md): the section on one
    table, e.g. "GL_INTERFACE" (its columns and how GL Publisher fills them); without a
    table, the list of tables it describes."""

    table: Annotated[str, msgspec.Meta(max_length=64)] | None = None

    def step(self) -> str:
        if self.table:
            return f"Looking up {_quoted(self.table)} in the schema reference"
        return "Listing the tables in the schema reference"


def get_schema_info(index: RepoIndex, args: GetSchemaInfo) -> ToolResult:
    text = index.read(SCHEMA_FILE)
    if text is None:
        raise ToolFailure(f"the repository has no {SCHEMA_FILE}")
    sections = {
        m.group(1).upper(): m for m in re.finditer(r"^## (GL_\w+).*?(?=^## |\Z)", text, re.M | re.S)
    }
    if not args.table:
        return ToolResult(
            "Tables in the schema reference: " + ", ".join(sections), ((SCHEMA_FILE, None),)
        )
    found = sections.get(args.table.strip().upper())
    if found is None:
        raise ToolFailure(f"no section on {args.table}; the tables are: {', '.join(sections)}")
    first = text.count("\n", 0, found.start()) + 1
    lines = (first, first + found.group(0).rstrip().count("\n"))
    return ToolResult(found.group(0).rstrip(), ((SCHEMA_FILE, lines),))


class FindImpactBuilders(ToolArgs):
    """The Impact Builders (queue-processor/.../glrecordbuilders/*ImpactBuilder.kt): each
    class with the payload type it accepts (acceptedType) and its file; ``query`` (e.g. a
    payload or activity name: "TradeBuy", "reversal") keeps the ones that mention it, best
    first, with their class comment."""

    query: Annotated[str, msgspec.Meta(max_length=200)] | None = None

    def step(self) -> str:
        if self.query:
            return f"Finding Impact Builders for {_quoted(self.query)}"
        return "Listing the Impact Builders"


def find_impact_builders(index: RepoIndex, args: FindImpactBuilders) -> ToolResult:
    where, params = "path GLOB ?", (IMPACT_BUILDER_GLOB,)
    terms = code_terms(args.query or "")
    if terms:
        match = fts_match(terms)
        hits = index.text.search(match, where=where, params=params, weights=(3.0, 1.0))
        rows = [index.read_row(hit.row) for hit in hits[:SEARCH_FILES]]
    else:
        rows = [(path, text) for _, path, text in index.text.rows(where, params)]
        rows.sort(key=lambda row: row[0].rsplit("/", 1)[-1])  # by class name
    out: list[str] = []
    files = []
    for path, text in rows:
        name = re.search(r"\bclass\s+(\w+ImpactBuilder)\b", text)
        if name is None:
            continue  # the interface, or a helper
        accepted = _ACCEPTED_TYPE.search(text)
        comment = _class_comment(text) if terms and len(out) < 3 else ""
        out.append(
            f"{name.group(1)} accepts {accepted.group(1) if accepted else '(not stated)'}"
            f"\n  {path}{comment}"
        )
        files.append((path, None))
    if not out:
        return ToolResult(f"No Impact Builder mentions {args.query!r}.")
    return ToolResult("\n".join(out), tuple(files))


def _class_comment(text: str) -> str:
    """The KDoc comment before the class, indented, at most 600 characters."""
    found = re.search(r"/\*\*(.*?)\*/\s*(?:@\w+(?:\([^)]*\))?\s*)*(?:\w+\s+)*class\s", text, re.S)
    if not found:
        return ""
    body = "\n".join(ln.strip().removeprefix("*").strip() for ln in found.group(1).splitlines())
    return "\n  " + body.strip()[:600].replace("\n", "\n  ")


@dataclasses.dataclass(frozen=True)
class Tool:
    """One tool: its argument type (the JSON schema the model sees, the validation, and in
    ``step()`` what a person sees while the call runs) and the function."""

    args: type[ToolArgs]
    run: Callable[[RepoIndex, Any], ToolResult]


# The tools, by the names the team chose (the prototype's MCP server).
TOOLS: dict[str, Tool] = {
    "search_adrs": Tool(SearchAdrs, search_adrs),
    "search_code": Tool(SearchCode, search_code),
    "read_file": Tool(ReadFile, read_file),
    "get_schema_info": Tool(GetSchemaInfo, get_schema_info),
    "find_impact_builders": Tool(FindImpactBuilders, find_impact_builders),
}


def tool_schema(name: str, tool: Tool) -> dict:
    """The OpenAI ``tools`` entry for ``tool``: the argument type's JSON schema (an optional
    argument is simply not required), its docstring as the description."""
    _, defs = msgspec.json.schema_components([tool.args])
    schema = defs[tool.args.__name__]
    for prop in schema.get("properties", {}).values():
        options = prop.pop("anyOf", None)
        if options:
            prop.update(next(o for o in options if o.get("type") != "null"))
        prop.pop("default", None)
    description = " ".join(schema.pop("description", "").replace("``", "`").split())
    schema.pop("title", None)
    schema["additionalProperties"] = False
    function = {"name": name, "description": description, "parameters": schema}
    return {"type": "function", "function": function}


TOOL_SCHEMAS = [tool_schema(name, tool) for name, tool in TOOLS.items()]


def run_tool(index: RepoIndex, name: str, arguments: str) -> ToolResult:
    """Run the model's call of ``name`` with ``arguments`` (JSON; "" means none): validated
    before anything runs, capped at TOOL_RESULT_MAX_CHARS. Never raises: a failure is a result
    whose text tells the model what went wrong (``ok`` False)."""
    tool = TOOLS.get(name)
    if tool is None:
        known = ", ".join(TOOLS)
        return ToolResult(f"Error: there is no tool {name!r}; the tools are {known}.", ok=False)
    try:
        args = msgspec.json.decode(arguments.strip() or "{}", type=tool.args)
        result = tool.run(index, args)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return ToolResult(f"Error: invalid arguments for {name}: {e}", ok=False)
    except ToolFailure as e:
        return ToolResult(f"Error: {e}.", ok=False)
    except Exception:
        log.exception("tool_crashed", extra={"fields": {"tool": name}})
        return ToolResult(f"Error: {name} failed unexpectedly; answer without it.", ok=False)
    return dataclasses.replace(result, text=capped(result.text))


def tool_step_title(name: str, arguments: str) -> str:
    """What the reply shows while the call runs: the tool's own words, if its arguments parse."""
    tool = TOOLS.get(name)
    if tool is not None:
        # ValueError: a lone surrogate in the model's arguments cannot be encoded
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError, ValueError):
            return msgspec.json.decode(arguments.strip() or "{}", type=tool.args).step()
    return f"Calling {name[:60]}"


@dataclasses.dataclass
class ToolCall:
    """One tool call as the model streamed it, assembled from its fragments."""

    id: str = ""
    name: str = ""
    arguments: str = ""


def gather_tool_calls(fragments: list[dict], calls: dict[int, ToolCall]) -> None:
    """Add one chunk's ``tool_calls`` fragments to ``calls``, by index: a call's id and name
    come once, on its first fragment (the gateway renumbers calls from 0 per response); its
    arguments arrive in pieces, "" meaning none."""
    for fragment in fragments:
        call = calls.setdefault(int(fragment.get("index") or 0), ToolCall())
        function = fragment.get("function") or {}
        call.id = fragment.get("id") or call.id
        call.name = function.get("name") or call.name
        call.arguments += function.get("arguments") or ""


@dataclasses.dataclass(frozen=True)
class ToolStep:
    """A tool call as a person sees it: ``in_progress``, then ``complete`` or ``error`` with a
    word on the result and links to the files it found, as (url, path)."""

    id: str
    title: str
    status: str
    output: str = ""
    sources: tuple[tuple[str, str], ...] = ()

    def chunk(self) -> dict:
        """The step as a streamed reply shows it: a task_update chunk."""
        return task_chunk(self.id, self.title, self.status, self.output, self.sources)


TASK_SOURCES = 5  # links a finished task shows
# A task still running when its message is stopped can never be updated there again.
TASK_CONTINUED = "continued in the next message"  # a rollover: it goes on below
TASK_NOT_SHOWN = "its end is not shown here"  # shutdown, or the reply went on as posts


class ToolSession:
    """One answer's tools: the index it reads (one commit for the whole answer); each call
    shown as ToolSteps through ``show`` (which raises StoppedByUser or Interrupted once the
    person pressed Stop or shutdown ended the reply), timed and counted; and the files the
    calls showed, which the answer may cite."""

    def __init__(
        self, index: RepoIndex, show: Callable[[ToolStep], None], metrics: Metrics | None = None
    ):
        self.index, self.show, self.metrics = index, show, metrics
        self.shown: dict[str, tuple[int, int] | None] = {}  # path -> the lines last shown
        self.calls = 0

    def call(self, call: ToolCall) -> str:
        """Run ``call``, showing it while it runs; what the model reads back."""
        self.calls += 1
        step, title = f"tool-{self.calls}", tool_step_title(call.name, call.arguments)
        self.show(ToolStep(step, title, "in_progress"))
        started = time.monotonic()
        result = run_tool(self.index, call.name, call.arguments)
        seconds = time.monotonic() - started
        name = call.name if call.name in TOOLS else "unknown"
        if self.metrics is not None:
            self.metrics.tool_calls.labels(tool=name, result="ok" if result.ok else "error").inc()
            self.metrics.tool_duration.labels(tool=name).observe(seconds)
        log_event(
            logging.INFO,
            "tool_call",
            tool=name,
            ok=result.ok,
            files=len(result.files),
            latency_ms=round(seconds * 1000, 1),
        )
        self.shown.update(result.files)
        links = [(self.index.link(path, lines), path) for path, lines in result.files]
        found = len(result.files)
        said = f"{found} file{'' if found == 1 else 's'}" if result.ok else result.text[:200]
        sources = tuple((url, path) for url, path in links if url)[:TASK_SOURCES]
        self.show(ToolStep(step, title, "complete" if result.ok else "error", said, sources))
        return result.text

    def cited(self, labels: list[str]) -> list[Section]:
        """The repository files among an answer's cited ``labels`` (a path, perhaps with a
        line suffix) that its calls showed, as sources linked at the indexed commit."""
        paths = dict.fromkeys(  # `path` (lines 1-20), [path](url), path:12, path#L3
            re.split(r"[\s:#(]", label.strip(), maxsplit=1)[0].strip("`[]*") for label in labels
        )
        return [
            Section(path, "", "", self.index.link(path, self.shown[path]))
            for path in paths
            if path in self.shown
        ]


# ════════════════════════════════════════════════════════════════════════════════════════
# 10. LLM
# ════════════════════════════════════════════════════════════════════════════════════════

_litellm_module: Any = None
_litellm_lock = threading.Lock()


def _litellm() -> Any:
    """Import and configure litellm once (~4 s, ~200 MB); every caller after that is free.

    Kept off the /health path: the litellm-import thread warms it at start-up, and the Socket
    Mode connection opens only once it is done, so no question waits for it.
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
                litellm.suppress_debug_info = (
                    True  # no "Give Feedback / Get Help" banners on stdout
                )
                litellm.disable_streaming_logging = (
                    True  # per-chunk logging bookkeeping we never use
                )
                litellm.telemetry = False
                _litellm_module = litellm
    return _litellm_module


class LLMFailure(Exception):
    """A gateway failure, classified. ``kind`` is one of OUTCOMES; ``detail`` is for the log."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass
class Usage:
    """Tokens of one answer, as the gateway reported them (or as estimated for a cut answer)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prompt cache
    cache_creation_tokens: int = 0  # prompt tokens written to it
    estimated: bool = False

    def add(self, other: Usage) -> None:
        """Count ``other`` (another round of the same answer) in too."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cache_creation_tokens += other.cache_creation_tokens
        self.estimated = self.estimated or other.estimated


# The longest answer the model may write: a Slack thread reply, not an essay.
ANSWER_MAX_TOKENS = 4_096
# The model behind a gateway alias that litellm's own model map does not know (the company
# gateway's aliases are its own names), by litellm's name for it: Claude Sonnet 4.5. Its context
# window and prices come from litellm's map (pinned with litellm), not from settings.
FALLBACK_MODEL = "claude-sonnet-4-5"
MODEL_FACTS = (
    "max_input_tokens",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
)


def model_id(model: str) -> str:
    return f"litellm_proxy/{model}"


@functools.cache
def model_facts(model: str) -> dict[str, float]:
    """The context window and prices (dollars per token, in litellm's field names) of the
    gateway alias ``model``: litellm's own entry for it if litellm knows the name, else
    FALLBACK_MODEL's. What ``register_alias`` tells litellm and ``cost_usd`` charges."""
    known = _litellm().model_cost
    entry = known.get(model) or known[FALLBACK_MODEL]
    return {name: float(entry[name]) for name in MODEL_FACTS}


def context_tokens(model: str) -> int:
    """How many tokens the model reads: the whole prompt must fit."""
    return int(model_facts(model)["max_input_tokens"])


_registered: set[str] = set()


def register_alias(model: str) -> None:
    """Tell litellm the gateway alias's real limits and prices, so ``token_counter`` knows it
    (an unknown alias also makes litellm do extra work on every call)."""
    name = model_id(model)
    if name in _registered:
        return
    _litellm().register_model(
        {
            name: {
                **model_facts(model),
                "max_output_tokens": ANSWER_MAX_TOKENS,
                "litellm_provider": "litellm_proxy",
                "mode": "chat",
            }
        }
    )
    _registered.add(name)


def cost_usd(model: str, usage: Usage) -> float:
    """Dollars for ``usage`` at the model's prices: the one cost computation. ``prompt_tokens``
    includes the cached and cache-written ones, as the gateway reports them; the same sum as
    litellm's ``cost_per_token`` for the registered alias (a test holds them equal), without its
    ~0.3 ms of model lookups per answer."""
    p = model_facts(model)
    fresh = max(usage.prompt_tokens - usage.cached_tokens - usage.cache_creation_tokens, 0)
    return (
        fresh * p["input_cost_per_token"]
        + usage.cached_tokens * p["cache_read_input_token_cost"]
        + usage.cache_creation_tokens * p["cache_creation_input_token_cost"]
        + usage.completion_tokens * p["output_cost_per_token"]
    )


def token_counter(model: str) -> Callable[[str], int]:
    """Count tokens of a text the way litellm does for the registered alias. Texts of 1,000
    characters and over are remembered, the last 16 of them: the system prompt and a whole
    knowledge base are the same for every question, and tokenizing them again was ~4 % of an
    answer's CPU (bench profile). Shorter texts (most messages) are cheap to count, and the
    bound keeps one-off long texts (a partial knowledge selection can be ~400 KB) from piling
    up."""
    register_alias(model)
    name = model_id(model)

    def count(text: str) -> int:
        if len(text) >= REMEMBER_COUNT_CHARS:
            return _count_remembered(name, text)
        return int(_litellm().token_counter(model=name, text=text)) if text else 0

    return count


REMEMBER_COUNT_CHARS = 1_000


@functools.lru_cache(maxsize=16)
def _count_remembered(model: str, text: str) -> int:
    return int(_litellm().token_counter(model=model, text=text))


def make_llm_client(gateway: GatewaySettings) -> Any:
    """One OpenAI-compatible client for the gateway, shared by every answer: its connection pool
    keeps connections (TLS in production) open between questions. It never retries by itself
    (``stream_completion`` decides), so the gateway's own retries are the only ones stacked."""
    import openai

    return openai.OpenAI(
        base_url=gateway.litellm_base_url,
        api_key=gateway.litellm_developer_key,
        max_retries=0,
        default_headers={"X-LiteLLM-Dev-Key": gateway.litellm_developer_key},
    )


def gateway_user(key: str, team: str, user: str) -> str:
    """The OpenAI ``user`` field: stable across replicas and restarts, not reversible to a Slack
    id (an HMAC keyed with the gateway key), so gateway spend tracking works per person."""
    digest = hmac.new(key.encode(), f"{team}:{user}".encode(), hashlib.sha256)
    return "lb-" + digest.hexdigest()[:32]


# Phrases by which the gateway and providers say what went wrong, when the status alone
# cannot (LiteLLM answers a spent budget with 400 or 422; context errors come as 400).
_BUDGET_WORDS = (
    "budget_exceeded",
    "budget has been exceeded",
    "exceeded budget",
    "exceeded your budget",
)
_CONTEXT_WORDS = (
    "context_length_exceeded",
    "context window",
    "maximum context length",
    "prompt is too long",
    "too many tokens",
    "input is too long",
)
_POLICY_WORDS = (
    "content_policy",
    "content policy",
    "content_filter",
    "content filter",
    "responsible ai",
)


def _error_facts(exc: BaseException) -> tuple[int | None, str]:
    """The HTTP status (from the exception, or the code inside a streamed error event) and the
    error's text, lower-cased, for classification."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if status is None and isinstance(body, dict):
        code = body.get("code")
        status = int(code) if isinstance(code, (int, str)) and str(code).isdigit() else None
    text = f"{exc} {json.dumps(body, default=str) if body else ''}".lower()
    return (int(status) if isinstance(status, int) else None), text


def classify_llm_error(exc: BaseException) -> LLMFailure:
    """Map a litellm/openai exception (raised by the call, or by the stream as an SSE error
    event) to an outcome kind. The exception's text never reaches a person; ``detail`` is for
    the log only (and redacted there)."""
    import httpx2
    import openai

    lm = _litellm()
    status, text = _error_facts(exc)
    if any(w in text for w in _BUDGET_WORDS):
        kind = "gateway_budget_exhausted"
    elif isinstance(exc, lm.ContextWindowExceededError) or any(w in text for w in _CONTEXT_WORDS):
        kind = "context_too_long"
    elif isinstance(exc, lm.ContentPolicyViolationError) or any(w in text for w in _POLICY_WORDS):
        kind = "content_policy"
    elif status in (401, 403) or isinstance(
        exc, (openai.AuthenticationError, openai.PermissionDeniedError)
    ):
        kind = "gateway_auth_error"
    elif (
        isinstance(exc, (openai.APITimeoutError, TimeoutError, httpx2.TimeoutException))
        or status == 408
    ):
        kind = "timeout"
    elif status == 429 or isinstance(exc, openai.RateLimitError):
        kind = "rate_limited"
    elif status in (400, 404, 422):
        kind = "gateway_config_error"
    else:
        kind = "gateway_error"
    return LLMFailure(kind, f"{type(exc).__name__} status={status}")


# Retries of what the gateway could not have retried itself (``_retry_delay``), and the longest
# Retry-After worth waiting for before the first token (longer: "rate limited" at once).
LLM_RETRIES = 1
RETRY_AFTER_MAX_SECONDS = 5.0


def _retry_delay(exc: BaseException, failure: LLMFailure, attempt: int) -> float | None:
    """Seconds to wait before trying again, or None to give up. Only what the gateway could
    not have retried itself: a connection that failed before an answer began (refused, or a
    pooled connection the gateway closed as the request went out; never a read timeout: the
    upstream may be generating already), and a 429 whose Retry-After is short."""
    if attempt >= LLM_RETRIES:
        return None
    if _connection_failed(exc):
        return 0.5 * 2**attempt
    if failure.kind == "rate_limited":
        headers = getattr(getattr(exc, "response", None), "headers", None) or {}
        wait = _seconds(headers.get("retry-after"), default=-1.0)
        return wait if 0 <= wait <= RETRY_AFTER_MAX_SECONDS else None
    return None


def _connection_failed(exc: BaseException) -> bool:
    """Did the request never get an answer because the connection failed? litellm wraps the
    openai client's APIConnectionError (refused, reset, closed without a response) as an
    InternalServerError (status 500), so the cause chain is where it shows."""
    import openai

    seen: BaseException | None = exc
    for _ in range(10):  # a cause chain is short; a cycle must not loop forever
        if seen is None:
            return False
        if isinstance(seen, openai.APITimeoutError):
            return False
        if isinstance(seen, openai.APIConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def stream_completion(
    gateway: GatewaySettings,
    messages: list[dict],
    usage: Usage,
    *,
    client: Any = None,
    user: str | None = None,
    tools: list[dict] | None = None,
    calls: dict[int, ToolCall] | None = None,
    answer_by: float | None = None,
) -> Generator[str, None, None]:
    """Stream the answer's text from the gateway, filling ``usage`` when the gateway reports it
    and, when ``tools`` are offered, ``calls`` with the tool calls the model makes.

    One deadline to the first token, across every attempt: LEDGER_BOT_LLM_TIMEOUT_SECONDS from
    the call; the whole answer ends by ``answer_by`` (default: LEDGER_BOT_ANSWER_MAX_SECONDS
    from the call). Retries follow
    ``_retry_delay``. Every setting is passed per call (litellm's module globals race between
    threads). Closing the generator closes the HTTP stream, so the gateway stops generating
    (and billing). Raises LLMFailure.

    litellm makes the call (routing, auth, error mapping), but the chunks are read from the
    provider's own stream (``completion_stream``), not through litellm's CustomStreamWrapper:
    measured against the fake gateway, the wrapper costs ~75 ms of CPU per 200-chunk answer
    against ~25 ms, and it raises InternalServerError when a model legitimately repeats a chunk
    (table rows, repeated code).
    """
    lm = _litellm()
    register_alias(gateway.ledger_bot_model)
    start = time.monotonic()
    first_token_by = start + gateway.ledger_bot_llm_timeout_seconds
    answer_by = answer_by or start + gateway.ledger_bot_answer_max_seconds
    first_token_by = min(first_token_by, answer_by)
    extra_body = {"metadata": {"tags": ["ledger-bot", f"env:{gateway.ledger_bot_environment}"]}}
    attempt = 0
    while True:
        left = first_token_by - time.monotonic()
        if left <= 0:
            raise LLMFailure(
                "timeout", f"no answer within {gateway.ledger_bot_llm_timeout_seconds}s"
            )
        try:
            response = lm.completion(
                model=model_id(gateway.ledger_bot_model),
                messages=messages,
                api_base=gateway.litellm_base_url,
                api_key=gateway.litellm_developer_key,
                client=client,
                extra_headers={"X-LiteLLM-Dev-Key": gateway.litellm_developer_key},
                timeout=left,
                max_retries=0,
                max_tokens=ANSWER_MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                user=user,
                extra_body=extra_body,
                **({"tools": tools} if tools else {}),
            )
            break
        except Exception as exc:
            failure = classify_llm_error(exc)
            delay = _retry_delay(exc, failure, attempt)
            if delay is None or time.monotonic() + delay >= first_token_by:
                raise failure from exc
            attempt += 1
            log_event(
                logging.INFO,
                "llm_retry",
                attempt=attempt,
                after_s=round(delay, 2),
                error=failure.detail,
            )
            time.sleep(delay)
    raw = getattr(response, "completion_stream", None) or response
    try:
        for chunk in _sse_chunks(raw, answer_by, gateway.ledger_bot_answer_max_seconds):
            choices = chunk.get("choices") or []
            if choices:
                delta = choices[0].get("delta") or {}
                if delta.get("tool_calls") and calls is not None:
                    gather_tool_calls(delta["tool_calls"], calls)
                if text := delta.get("content"):
                    yield text
            if chunk.get("usage"):
                _read_usage(chunk["usage"], usage)
    except LLMFailure:
        raise
    except Exception as exc:
        raise classify_llm_error(exc) from exc
    finally:
        close = getattr(raw, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def _check_deadline(answer_by: float, limit: float) -> None:
    if time.monotonic() > answer_by:
        raise LLMFailure("timeout", f"answer exceeded {limit}s")


class StreamedError(Exception):
    """An error event inside the gateway's SSE stream (the proxy's mid-stream failure). Its
    ``body`` carries the ``code`` that ``_error_facts`` reads as the status, so it classifies
    like the same error before the stream."""

    def __init__(self, body: dict):
        super().__init__(str(body.get("message") or "error event in the stream"))
        self.body = body


def _sse_chunks(raw: Any, answer_by: float, limit: float) -> Iterator[dict]:
    """The stream's chunks as plain dicts, read from the HTTP response itself: reading on past
    ``[DONE]`` to the end of the body lets the connection go back to the pool (the openai
    client's own iterator stops at ``[DONE]`` and closes it), and skips building a pydantic
    object per chunk. An error event raises StreamedError; a stream still going at
    ``answer_by`` (keep-alive comments count) raises LLMFailure("timeout")."""
    response = getattr(raw, "response", None)
    if response is None or not hasattr(response, "iter_lines"):
        for chunk in raw:  # another client shape: its own objects, as dicts
            _check_deadline(answer_by, limit)
            yield chunk.model_dump() if hasattr(chunk, "model_dump") else dict(chunk)
        return
    for line in response.iter_lines():
        _check_deadline(answer_by, limit)
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            raise StreamedError(error if isinstance(error, dict) else {"message": str(error)})
        if isinstance(chunk, dict):
            yield chunk


def _read_usage(reported: dict, usage: Usage) -> None:
    usage.prompt_tokens = reported.get("prompt_tokens") or usage.prompt_tokens
    usage.completion_tokens = reported.get("completion_tokens") or usage.completion_tokens
    details = reported.get("prompt_tokens_details") or {}
    usage.cached_tokens = (
        details.get("cached_tokens")
        or reported.get("cache_read_input_tokens")
        or usage.cached_tokens
    )
    usage.cache_creation_tokens = (
        reported.get("cache_creation_input_tokens") or usage.cache_creation_tokens
    )


# After LEDGER_BOT_TOOL_ROUNDS rounds of tool calls the model must answer. Bedrock has no
# tool_choice "none" (the gateway answers 400 UnsupportedParamsError) and rejects tool history
# without the tools, so the last round keeps them, and the last tool result says so instead.
LAST_ROUND_NOTE = "\n\n(No more tool calls are possible now: answer from what you have.)"
TOOL_ROUNDS_SPENT = (
    "(I ran out of repository lookups before I could answer. Please ask a narrower question.)"
)
TOOL_RESULT_DROPPED = "(Tool result removed: the conversation no longer fits the model's context.)"


def converse(
    gateway: GatewaySettings,
    messages: list[dict],
    usage: Usage,
    *,
    tools: ToolSession | None,
    budget: int,
    count: Callable[[str], int],
    client: Any = None,
    user: str | None = None,
) -> Generator[str, None, None]:
    """The answer's text, streamed. Without ``tools``: one ``stream_completion``, as ever.
    With them, as many rounds as the model's tool calls take: at most LEDGER_BOT_TOOL_ROUNDS
    rounds of calls, then one in which it must answer. Between rounds the calls run
    (``ToolSession.call``: Stop and shutdown raise from there) and ``messages`` grows by the
    assistant's calls and one ``tool`` message per call. Every request carries the same
    ``tools``, never ``tool_choice`` or ``parallel_tool_calls``; each round has its own
    first-token deadline, the whole answer one LEDGER_BOT_ANSWER_MAX_SECONDS. ``usage`` sums
    every round (a cut round estimated). Before a round, tool results are cut, oldest first,
    until the prompt fits ``budget`` tokens; the question never is."""
    if tools is None:
        yield from stream_completion(gateway, messages, usage, client=client, user=user)
        return
    answer_by = time.monotonic() + gateway.ledger_bot_answer_max_seconds
    rounds, said = 0, False
    while True:
        if rounds:
            fit_tool_results(messages, count, budget)
        calls: dict[int, ToolCall] = {}
        part, text = Usage(), list[str]()
        try:
            for piece in stream_completion(
                gateway,
                messages,
                part,
                client=client,
                user=user,
                tools=TOOL_SCHEMAS,
                calls=calls,
                answer_by=answer_by,
            ):
                if said and not text:
                    yield "\n\n"  # a new round's text is a new paragraph
                text.append(piece)
                yield piece
        finally:
            written = "".join(text) + "".join(c.arguments for c in calls.values())
            if not part.completion_tokens and written:
                estimate_usage(part, messages, written, count)
            usage.add(part)
        said_before, said = said, said or bool(text)
        if not calls:
            return
        if rounds >= gateway.ledger_bot_tool_rounds:
            if not text:  # still calling tools: an opening line alone would read as the answer
                yield ("\n\n" if said_before else "") + TOOL_ROUNDS_SPENT
            return
        ordered = [calls[i] for i in sorted(calls)]
        for n, call in enumerate(ordered):
            call.id = call.id or f"call_{rounds}_{n}"
        messages.append(assistant_tool_turn("".join(text), ordered))
        messages.extend(
            {"role": "tool", "tool_call_id": call.id, "content": tools.call(call)}
            for call in ordered
        )
        rounds += 1
        if rounds >= gateway.ledger_bot_tool_rounds:
            messages[-1]["content"] += LAST_ROUND_NOTE


def assistant_tool_turn(text: str, calls: list[ToolCall]) -> dict:
    """The assistant's turn that asked for ``calls``, as the next request must repeat it. An
    argument string that is not a JSON object (a call cut by the output limit) is sent as
    ``{}``: the tool result already told the model its arguments were invalid."""
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _json_object(call.arguments)},
            }
            for call in calls
        ],
    }


def _json_object(arguments: str) -> str:
    try:
        return arguments if isinstance(json.loads(arguments), dict) else "{}"
    except ValueError:
        return "{}"


def message_tokens(message: dict, count: Callable[[str], int]) -> int:
    """One chat message's tokens: its text, images at IMAGE_TOKENS each, its tool calls'
    arguments, and a few for the framing."""
    content = message.get("content")
    if isinstance(content, list):
        tokens = sum(
            count(part.get("text") or "") if part.get("type") == "text" else IMAGE_TOKENS
            for part in content
        )
    else:
        tokens = count(content or "")
    calls = message.get("tool_calls") or []
    return tokens + sum(count(c["function"]["arguments"]) for c in calls) + 4


def fit_tool_results(messages: list[dict], count: Callable[[str], int], budget: int) -> None:
    """Replace tool results with TOOL_RESULT_DROPPED, oldest first, until ``messages`` fit
    ``budget`` tokens (if they cannot, the gateway's context error ends the answer)."""
    total = sum(message_tokens(m, count) for m in messages)
    for message in messages:
        if total <= budget:
            return
        if message.get("role") == "tool" and message["content"] != TOOL_RESULT_DROPPED:
            total -= count(message["content"]) - count(TOOL_RESULT_DROPPED)
            message["content"] = TOOL_RESULT_DROPPED


def estimate_usage(
    usage: Usage, messages: list[dict], text: str, count: Callable[[str], int]
) -> None:
    """A cut answer's tokens, counted because the gateway never reported them: the whole
    prompt was read, and what arrived of the answer was generated. Images count IMAGE_TOKENS
    each, not as the characters of their base64 (a 1 MB screenshot would otherwise count
    ~950,000 tokens against the person's budget)."""
    if not usage.prompt_tokens:
        text_only, images = without_images(messages)
        usage.prompt_tokens = (
            count(json.dumps(text_only, ensure_ascii=False)) + images * IMAGE_TOKENS
        )
    usage.completion_tokens = count(text)
    usage.estimated = True


# ════════════════════════════════════════════════════════════════════════════════════════
# 11. Reply delivery
# ════════════════════════════════════════════════════════════════════════════════════════

# Slack documents 12,000 characters for a markdown block and for markdown_text, but rejects a
# message whose blocks add up to ~13,000 in a way that depends on the content
# (msg_blocks_too_long, slackapi/bolt-js#2509). Messages are therefore cut at 11,000, which
# leaves room for the feedback and sources blocks and for escaping; a growing message ends at
# a paragraph break found in its last _SOFT_ZONE characters (see next_piece).
MARKDOWN_LIMIT = 11_000
_SOFT_ZONE = 2_000
MESSAGE_UPDATE_INTERVAL = 1.0  # a message that grows by chat.update changes at most once a second
STATUS_RENEW_SECONDS = 100.0  # Slack clears a thread status after 120 s without a post
# Buffered answer text goes out every STREAM_FLUSH_CHARS characters or STREAM_FLUSH_SECONDS
# after the last flush, whichever comes first (the first text at once): steady steps for the
# reader, and appends that stay inside Tier 4 with many answers streaming at once.
STREAM_FLUSH_CHARS = 400
STREAM_FLUSH_SECONDS = 0.5
FINAL_WAIT_SECONDS = 60.0  # how long the end of a reply may wait for rate budget
INTERRUPT_WAIT_SECONDS = 5.0  # ... at shutdown, whose grace period is short
PLACEHOLDER_TEXT = "_Thinking…_"
HEARD_TEXT = "Looking into it: the answer will appear in the thread."  # burst feedback, ephemeral
EMPTY_ANSWER = "(The model returned an empty answer. Please try rephrasing the question.)"
STOPPED_CODES = frozenset({"stopped_by_user"})
STREAM_GONE_CODES = frozenset({"message_not_in_streaming_state", "stopped_by_user"})


class StoppedByUser(Exception):
    """The person pressed Stop on the streamed answer."""


class Interrupted(Exception):
    """The bot is shutting down and this question could not be finished."""


@dataclasses.dataclass
class _Visible:
    """The message a reply is writing into: its ts, what it shows, and whether it streams."""

    ts: str
    shown: str = ""
    streaming: bool = False


@dataclasses.dataclass
class Outbox:
    """The text a delivery is writing right now. The delivery removes from ``text`` what Slack
    accepted, as it goes, so after a failure ``text`` is exactly what is not shown."""

    text: str = ""
    tasks: list[dict] = dataclasses.field(default_factory=list)  # task_update chunks

    def __bool__(self) -> bool:
        return bool(self.text or self.tasks)

    def then(self, later: Outbox) -> Outbox:
        """This Outbox's content, then ``later``'s."""
        return Outbox(self.text + later.text, self.tasks + later.tasks)


@dataclasses.dataclass(frozen=True)
class Ending:
    """How a reply ends: the state it ends in, the metadata of its last message, and what goes
    under it (the sources it cited, the feedback buttons), made by ``blocks()`` when sent."""

    state: str  # finished | failed | interrupted
    metadata_type: str
    ref: str
    serials: Iterator[int]  # the reply's: block_ids new on every message and every update
    feedback: bool = False
    sources: tuple[Section, ...] = ()

    def blocks(self) -> list[dict] | None:
        """The blocks under the reply's last message, with new block_ids (Slack requires)."""
        serial = next(self.serials)
        blocks = [sources_block(list(self.sources), self.ref, serial)] if self.sources else []
        blocks += feedback_blocks(self.ref, serial) if self.feedback else []
        return blocks or None


class StreamDelivery:
    """A reply written as Slack streams it: ``chat.startStream``, ``appendStream`` and
    ``stopStream`` (the bot's only stream calls), rolling over to a new message before Slack's
    size limit (``next_piece``). With ``chunks`` (a reply that may show tool calls) every call
    sends ``chunks``, the text as markdown_text chunks beside the Outbox's task updates (Slack
    refuses a stream that mixes the two ways: ``streaming_mode_mismatch``); without, the text
    goes as ``markdown_text``. Used by the holder of the reply's ``_turn`` only.

    ``send`` raises SlackBusy when a call's budget is spent (the text waits, and goes with the
    next, larger append), SlackError when Slack refuses (``stopped_by_user`` once the person
    pressed Stop); the Outbox then holds what is not shown."""

    name = "streaming"

    def __init__(
        self,
        api: SlackApi,
        q: Question,
        ref: str,
        on_shown: Callable[[str], None],
        chunks: bool = False,
    ):
        self.api, self.q, self.ref, self.on_shown = api, q, ref, on_shown
        self.chunks = chunks
        self.visible: _Visible | None = None
        self.running: dict[str, dict] = {}  # task id -> its in_progress chunk, in ``visible``

    def send(self, box: Outbox, ending: Ending | None, wait: float) -> None:
        """Write ``box.text`` into the open stream and its successors; with an ``ending``, all
        of it, ``ending.blocks()`` under the last message, waiting up to ``wait`` s."""
        while True:
            shown = self.visible.shown if self.visible else ""
            send, rest, end = next_piece(
                shown, box.text, limit=MARKDOWN_LIMIT, soft_zone=_SOFT_ZONE
            )
            last = ending is not None and not end
            if self.visible is None:
                if not (send or box.tasks):
                    return
                ts = self._start(send, box, wait=wait / 2 if ending else 0)
                self.visible = _Visible(ts, send, streaming=True)
                self.on_shown(send)
                box.text = rest
                if not (end or last):
                    return
                send = ""
            elif not (end or last):
                if send or box.tasks:
                    self._append(send, box)
                    self.visible.shown += send
                    self.on_shown(send)
                    box.text = rest
                return
            # This message ends here, with ``send`` as its last text.
            self._stop(
                send,
                box,
                metadata_type=ending.metadata_type if last and ending else ANSWER_METADATA,
                blocks=ending.blocks() if last and ending else None,
                wait=wait if ending else 5,
                carry=not last,
            )
            self.on_shown(send)
            self.visible = None
            box.text = rest
            if last:
                return

    def close(self, wait: float) -> tuple[_Visible | None, bool]:
        """Stop streaming: end the open stream (so chat.update may edit it), waiting up to
        ``wait`` s. Returns the message a post delivery continues from exactly what it shows,
        and whether the stream could be ended (if not, Slack ends it itself after ~5 minutes
        and the rest goes into new messages)."""
        v = self.visible
        if v is None or not v.streaming:
            return v, True
        try:
            self._stop("", Outbox(), metadata_type=NOTICE_METADATA, blocks=None, wait=wait)
        except SlackError as e:
            if e.code not in STREAM_GONE_CODES:
                log_event(logging.WARNING, "stream_stop_failed", ref=self.ref, error=e.code)
                self.visible = None
                return None, False
        v.streaming = False
        return v, True

    def stopped(self) -> None:
        """The person pressed Stop: end the stream as Slack expects; what it shows stays."""
        if self.visible is not None and self.visible.streaming:
            with contextlib.suppress(SlackError):
                self._stop("", Outbox(), metadata_type=ANSWER_METADATA, blocks=None, wait=5)
            self.visible.streaming = False

    def _start(self, markdown: str, box: Outbox, *, wait: float) -> str:
        """``chat.startStream`` with the first text; the streaming message's ts."""
        resp = self.api.call(
            "chat.startStream",
            wait=wait,
            channel=self.q.channel,
            thread_ts=self.q.thread_ts,
            recipient_user_id=self.q.user,
            recipient_team_id=self.q.team or None,
            **self._content(markdown, box),
        )
        self._tasks_sent(box)
        return _field(resp, "ts", "chat.startStream")

    def _append(self, markdown: str, box: Outbox) -> None:
        """``chat.appendStream`` (never waits: the text goes with the next append instead)."""
        assert self.visible is not None
        self.api.call(
            "chat.appendStream",
            wait=0,
            channel=self.q.channel,
            ts=self.visible.ts,
            **self._content(markdown, box),
        )
        self._tasks_sent(box)

    def _stop(
        self,
        markdown: str,
        box: Outbox,
        *,
        metadata_type: str,
        blocks: list | None,
        wait: float,
        carry: bool = False,
    ) -> None:
        """``chat.stopStream``: the last text, then the message is final (blocks, metadata).
        A task still running in it is closed there: with ``carry`` (a rollover) as continued,
        and shown running again in the next message; else as not shown to its end."""
        assert self.visible is not None
        updated = {t["id"] for t in box.tasks}
        still = [c for task_id, c in self.running.items() if task_id not in updated]
        status, output = ("complete", TASK_CONTINUED) if carry else ("error", TASK_NOT_SHOWN)
        tasks = box.tasks
        box.tasks = tasks + [{**c, "status": status, "output": output} for c in still]
        try:
            self.api.call(
                "chat.stopStream",
                wait=wait,
                channel=self.q.channel,
                ts=self.visible.ts,
                blocks=blocks or None,
                metadata=message_metadata(metadata_type, self.ref),
                **self._content(markdown, box),
            )
        except SlackError:
            box.tasks = tasks  # as it was: what is still to be shown
            raise
        self._tasks_sent(box)
        if carry:
            box.tasks = still

    def _tasks_sent(self, box: Outbox) -> None:
        """The Outbox's task updates went out: note which tasks the message shows running."""
        for chunk in box.tasks:
            if chunk["status"] == "in_progress":
                self.running[chunk["id"]] = chunk
            else:
                self.running.pop(chunk["id"], None)
        box.tasks = []

    def _content(self, markdown: str, box: Outbox) -> dict[str, Any]:
        """A stream call's text, and in chunks mode the Outbox's task updates (they leave it
        once the call is made)."""
        if not self.chunks:
            return {"markdown_text": markdown or None}
        chunks = [{"type": "markdown_text", "text": markdown}] if markdown else []
        return {"chunks": chunks + box.tasks or None}


class PostDelivery:
    """A reply written as ordinary messages: the visible message (a placeholder, or a stream
    that was ended) grows in place by ``chat.update``, at most once a second while it fits and
    the budget is free; the end goes into it and into as many posted messages as it takes.
    Used by the holder of the reply's ``_turn`` only; raises like StreamDelivery."""

    name = "posting"

    def __init__(
        self,
        api: SlackApi,
        q: Question,
        ref: str,
        on_shown: Callable[[str], None],
        visible: _Visible | None = None,
    ):
        self.api, self.q, self.ref, self.on_shown = api, q, ref, on_shown
        self.visible = visible
        self.last_update = 0.0

    def send(self, box: Outbox, ending: Ending | None, wait: float) -> None:
        """Write ``box.text`` (before the ending, only by growing the visible message). Task
        updates cannot show in posted messages (the status line showed them): they go."""
        box.tasks = []
        v, text = self.visible, box.text
        if ending is None:
            if v is None:
                return  # nothing to grow yet: the status shows, the text goes out at the end
            combined = v.shown + text
            if (
                len(combined) <= MARKDOWN_LIMIT
                and time.monotonic() - self.last_update >= MESSAGE_UPDATE_INTERVAL
            ):
                self.last_update = time.monotonic()
                self._update(v, combined, metadata_type=NOTICE_METADATA, blocks=None, wait=0)
                v.shown, box.text = combined, ""
                self.on_shown(text)
            return
        blocks = ending.blocks()
        rest: list[str]
        if v is not None:
            pieces = split_message(v.shown + text, MARKDOWN_LIMIT)
            try:
                self._update(
                    v,
                    pieces[0],
                    metadata_type=ending.metadata_type,
                    blocks=blocks if len(pieces) == 1 else None,
                    wait=wait / 2,
                )
                self.on_shown(pieces[0])
                rest = pieces[1:]
            except SlackError as e:
                if e.code in STOPPED_CODES:
                    raise
                # The message keeps what it shows; post only what it does not show yet.
                log_event(logging.WARNING, "update_failed", ref=self.ref, error=e.code)
                _, reopen = fence_seam(v.shown)
                rest = split_message(reopen + text, MARKDOWN_LIMIT) if text.strip() else []
            self.visible = None
        else:  # a new message: the blank lines that joined text to the last one go
            rest = split_message(text.lstrip("\n"), MARKDOWN_LIMIT) if text.strip() else []
        for i, piece in enumerate(rest):
            self.api.post_message(
                channel=self.q.channel,
                thread_ts=self.q.thread_ts,
                markdown=piece,
                metadata_type=ending.metadata_type,
                ref=self.ref,
                extra_blocks=blocks if i == len(rest) - 1 else None,
                wait=wait / 2,
            )
            self.on_shown(piece)
        box.text = ""

    def close(self, wait: float) -> tuple[_Visible | None, bool]:
        return self.visible, True

    def _update(
        self, v: _Visible, markdown: str, *, metadata_type: str, blocks: list | None, wait: float
    ) -> None:
        self.api.update_message(
            channel=self.q.channel,
            ts=v.ts,
            markdown=markdown,
            metadata_type=metadata_type,
            ref=self.ref,
            extra_blocks=blocks,
            wait=wait,
        )


class Delivery:
    """How a reply is being written, and its one change of course: streaming (unless streaming
    is off) until a stream cannot start (budget spent, refused) or fails mid-way, posting from
    then on. A failed stream is first ended (Slack refuses chat.update on a message still
    streaming), and posting continues from exactly the text it shows: nothing lost, nothing
    doubled, nothing left streaming. Used by the holder of the reply's ``_turn`` only; ``send``
    raises what even posting cannot absorb, as SlackBusy or SlackError."""

    def __init__(
        self,
        api: SlackApi,
        q: Question,
        ref: str,
        on_shown: Callable[[str], None],
        *,
        stream: bool,
        chunks: bool = False,
    ):
        self.api, self.q, self.ref, self.on_shown = api, q, ref, on_shown
        self.current: StreamDelivery | PostDelivery = (
            StreamDelivery(api, q, ref, on_shown, chunks)
            if stream
            else PostDelivery(api, q, ref, on_shown)
        )

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def chunks(self) -> bool:
        """Is it streaming in chunks (so task updates can show)?"""
        return isinstance(self.current, StreamDelivery) and self.current.chunks

    def into_placeholder(self, ts: str) -> None:
        """Post, growing the placeholder ``ts`` first."""
        self.current = PostDelivery(self.api, self.q, self.ref, self.on_shown, _Visible(ts))

    def send(self, box: Outbox, ending: Ending | None, wait: float) -> None:
        current = self.current
        if isinstance(current, StreamDelivery):
            try:
                current.send(box, ending, wait)
                return
            except SlackBusy:
                if current.visible is not None:
                    raise  # mid-stream: the text waits for budget (coalescing)
                log_event(
                    logging.INFO, "stream_degraded", ref=self.ref, reason="stream budget spent"
                )
                self.post_instead(wait)
            except SlackError as e:
                if e.code in STOPPED_CODES:
                    raise
                log_event(
                    logging.WARNING,
                    "stream_fallback",
                    ref=self.ref,
                    channel=self.q.channel,
                    error=e.code,
                )
                if not self.post_instead(wait) and ending and not box.text.strip():
                    raise  # nothing left to post the ending with: the reply is not finished
        self.current.send(box, ending, wait)

    def post_instead(self, wait: float) -> bool:
        """From now on, post: end an open stream and continue from what it shows. False if
        the stream could not be ended (the rest then goes into new messages)."""
        if isinstance(self.current, PostDelivery):
            return True
        visible, ended = self.current.close(wait)
        self.current = PostDelivery(self.api, self.q, self.ref, self.on_shown, visible)
        return ended

    def stopped(self) -> None:
        if isinstance(self.current, StreamDelivery):
            self.current.stopped()


class Feedback:
    """What shows a question was heard before any answer text, never waiting for rate budget:
    the "is thinking…" status (renewed while the model is silent: Slack clears it after two
    minutes without a post), else (Slack refused the status) a placeholder message, else (many
    answers at once: those budgets are spent) a 👀 reaction on the question, else a line only
    the asker sees; the last two have budgets of their own and need no follow-up call. Used by
    the holder of the reply's ``_turn``."""

    def __init__(self, api: SlackApi, surfaces: SlackSurfaces, q: Question, ref: str):
        self.api, self.surfaces, self.q, self.ref = api, surfaces, q, ref
        self.status_at: float | None = None

    def show(self) -> str | None:
        """Show it; the placeholder's ts if one was posted (the reply then grows it)."""
        try:
            if self.surfaces.set_status(channel=self.q.channel, thread_ts=self.q.thread_ts):
                self.status_at = time.monotonic()
                return None
            return self.api.post_message(
                channel=self.q.channel,
                thread_ts=self.q.thread_ts,
                markdown=PLACEHOLDER_TEXT,
                metadata_type=NOTICE_METADATA,
                ref=self.ref,
                wait=0,
            )
        except SlackBusy:
            self._in_a_burst()
            return None

    def _in_a_burst(self) -> None:
        """The status and post budgets are spent: a 👀 on the question, else (that budget too,
        or a shortcut, whose question is no message) the ephemeral line."""
        if self.q.kind != "shortcut":
            try:
                self.api.add_reaction(channel=self.q.channel, ts=self.q.ts)
                return
            except SlackBusy:
                pass
            except SlackError as e:
                log_event(logging.WARNING, "slack_call_failed", method=e.method, error=e.code)
                return
        quietly(
            self.api.post_ephemeral,
            channel=self.q.channel,
            user=self.q.user,
            text=HEARD_TEXT,
            thread_ts=self.q.thread_ts if self.q.in_thread else None,  # where the asker looks
            wait=0,
        )

    def renew_if_due(self, turn: threading.Lock) -> None:
        """Renew the status if it is about to expire and ``turn`` (the reply's) is free now."""
        due = (
            self.status_at is not None and time.monotonic() - self.status_at > STATUS_RENEW_SECONDS
        )
        if not due or not turn.acquire(blocking=False):
            return
        try:
            if self.surfaces.set_status(channel=self.q.channel, thread_ts=self.q.thread_ts):
                self.status_at = time.monotonic()
        except SlackBusy:
            pass  # the next flush tries again
        finally:
            turn.release()

    def working(self, title: str) -> None:
        """The status line says what the bot is doing now (a tool call), where no task UI
        shows it; never waits, and a refusal changes nothing."""
        short = (
            title
            if len(title) <= LOADING_MESSAGE_CHARS
            else title[: LOADING_MESSAGE_CHARS - 1] + "…"
        )
        with contextlib.suppress(SlackError):
            self.surfaces.set_status(
                channel=self.q.channel,
                thread_ts=self.q.thread_ts,
                status="is looking in the GL Publisher repository…",
                loading=(short,),
            )


# Reply states and the moves between them; ``Reply._to`` is the only writer of ``state``.
REPLY_MOVES: dict[str, frozenset[str]] = {
    "thinking": frozenset({"streaming", "posting", "closing", "stopped"}),
    "streaming": frozenset({"posting", "closing", "stopped"}),
    "posting": frozenset({"closing", "stopped"}),
    "closing": frozenset({"closing", "finished", "failed", "interrupted", "stopped"}),
    "finished": frozenset(),
    "stopped": frozenset(),
    "failed": frozenset(),
    "interrupted": frozenset(),
}
OPEN_STATES = frozenset({"thinking", "streaming", "posting"})  # answer text may still be added
ENDED_STATES = frozenset({"finished", "stopped", "failed", "interrupted"})


class Reply:
    """One reply in one thread: visible feedback first, then the answer, whole and in order.

    Its life is one field, ``state`` (REPLY_MOVES): ``thinking`` (only Feedback shows: status,
    placeholder or 👀), ``streaming`` or ``posting`` (answer text shows, as Delivery writes it),
    ``closing`` (the last delivery, of the answer or of a notice, is under way or was refused),
    then ``finished``, ``stopped`` (the person pressed Stop: nothing more is posted),
    ``failed`` or ``interrupted`` (a notice ended it).

    Small public methods over one worker, ``_deliver``: ``show_feedback``; ``add`` (model
    text, sent every STREAM_FLUSH_CHARS or STREAM_FLUSH_SECONDS, the first at once); ``step``
    (a tool call: a task of a reply streamed with ``tasks``, else the status line);
    ``flush_if_due`` (the Flusher's); ``finish``, ``fail``, ``interrupt``.

    Concurrency contract. ``_lock`` guards ``pending`` and ``state``, never held during a Slack
    call. ``_turn`` is held by the one thread writing this reply to Slack; only its holder
    touches the delivery and the feedback. The Flusher only tries ``_turn``, so when Slack is
    busy, flushes coalesce into fewer, larger appends; the end of a reply may wait for budget.
    """

    def __init__(
        self,
        api: SlackApi,
        surfaces: SlackSurfaces,
        question: Question,
        ref: str,
        *,
        streaming: bool,
        feedback: bool,
        received: float,
        metrics: Metrics,
        tasks: bool = False,
    ):
        self.q, self.ref, self.buttons = question, ref, feedback
        self.received, self.metrics = received, metrics
        self.state = "thinking"
        self.feedback = Feedback(api, surfaces, question, ref)
        self.delivery = Delivery(api, question, ref, self._shown, stream=streaming, chunks=tasks)
        self.pending = Outbox()  # what is still to be sent
        self.first_text_at: float | None = None  # when the answer's first text showed
        self.last_flush = 0.0
        self._serials = itertools.count(1)  # block_ids new on every message and update
        self._box = Outbox()  # what is being sent right now (holder of _turn only)
        self._lock, self._turn = threading.Lock(), threading.Lock()

    # -- public ------------------------------------------------------------------------------

    def show_feedback(self) -> None:
        """Feedback, at once; a placeholder becomes the message the answer grows in."""
        with self._turn:
            if self.state != "thinking":
                return
            ts = self.feedback.show()
            if ts is not None:
                self.delivery.into_placeholder(ts)
                with self._lock:
                    self._to("posting")

    def add(self, text: str) -> None:
        """The worker's: buffer ``text`` and send what is due. Raises ``_open_or_raise``'s."""
        with self._lock:
            self._open_or_raise()
            self.pending.text += text
            due = (
                self.first_text_at is None
                or len(self.pending.text) >= STREAM_FLUSH_CHARS
                or self._time_due()
            )
        if due:
            self._deliver()
        self._open_or_raise()

    def step(self, step: ToolStep) -> None:
        """The worker's: show a tool call starting or ending. Raises like ``add``."""
        with self._lock:
            self._open_or_raise()
            if self.delivery.chunks:
                self.pending.tasks.append(step.chunk())
        if self.delivery.chunks:
            self._deliver(now=True)
        elif step.status == "in_progress":
            with self._turn:
                self.feedback.working(step.title)
        self._open_or_raise()

    def flush_if_due(self) -> None:
        """The Flusher's: send text that has waited STREAM_FLUSH_SECONDS while the model is
        quiet, and keep the status alive until the first text. Never waits."""
        with self._lock:
            due = bool(self.pending) and self.state in OPEN_STATES and self._time_due()
        if due:
            self._deliver()
        elif self.first_text_at is None:
            self.feedback.renew_if_due(self._turn)

    def finish(self, text: str = "", sources: Iterable[Section] = ()) -> None:
        """Deliver ``text`` and everything pending, and close the reply: sources, then the
        feedback buttons, under the last message. Raises SlackError if that fails."""
        with self._lock:
            if self.state not in OPEN_STATES:
                return
            self._to("closing")
            self.pending.text += text
            if not (self.first_text_at is not None or self.pending.text.strip()):
                self.pending.text = EMPTY_ANSWER
        ending = Ending(
            "finished", ANSWER_METADATA, self.ref, self._serials, self.buttons, tuple(sources)
        )
        self._deliver(ending, wait=FINAL_WAIT_SECONDS)

    def fail(self, notice: str) -> bool:
        """End with ``notice`` after what shows (and what a failed finish left); False if ended."""
        return self._end_with(notice, "failed", FINAL_WAIT_SECONDS)

    def interrupt(self, notice: str) -> bool:
        """Shutdown's ``fail``: waits at most INTERRUPT_WAIT_SECONDS for rate budget."""
        return self._end_with(notice, "interrupted", INTERRUPT_WAIT_SECONDS)

    # -- the worker ---------------------------------------------------------------------------

    def _end_with(self, notice: str, state: str, wait: float) -> bool:
        with self._lock:
            if self.state in ENDED_STATES:
                return False
            self._to("closing")
            shown = self.first_text_at is not None or self.pending.text
            self.pending.text += ("\n\n" if shown else "") + notice
        self._deliver(Ending(state, NOTICE_METADATA, self.ref, self._serials), wait=wait)
        return True

    def _open_or_raise(self) -> None:
        """StoppedByUser once the person pressed Stop; Interrupted once shutdown ended the reply
        (only another thread can, while its worker writes): the worker stops reading the model."""
        if self.state == "stopped":
            raise StoppedByUser()
        if self.state not in OPEN_STATES:
            raise Interrupted()

    def _to(self, state: str) -> None:
        """Move to ``state`` (with ``_lock`` held); a move REPLY_MOVES does not allow is a bug."""
        if state not in REPLY_MOVES[self.state]:
            raise AssertionError(f"reply {self.ref}: no move from {self.state} to {state}")
        self.state = state

    def _time_due(self) -> bool:
        return time.monotonic() - self.last_flush >= STREAM_FLUSH_SECONDS

    def _deliver(self, ending: Ending | None = None, *, wait: float = 0, now: bool = False) -> None:
        """Send pending text and task updates to Slack: the one worker under every public method.

        Takes ``_turn`` (waiting for it only for an ending, or ``now``), moves what is pending to
        the Outbox under ``_lock``, writes it, and puts back what could not go out yet. With an
        ``ending`` it sends everything, waiting up to ``wait`` s for rate budget, and ends the
        last message; if that fails, the error escapes, no stream is left open (its stop is
        retried with the same wait), and what was not shown stays pending, for ``fail``. A
        flush that cannot go out loses nothing: it goes with the next one."""
        if not self._turn.acquire(blocking=ending is not None or now):
            return
        try:
            with self._lock:
                if (self.state != "closing") if ending else (self.state not in OPEN_STATES):
                    return  # ended meanwhile: only the ending's own delivery may write now
                self._box, self.pending = self.pending, Outbox()
            try:
                self.delivery.send(self._box, ending, wait)
                if ending is not None:
                    with self._lock:
                        self._to(ending.state)
            except SlackError as e:
                if e.code in STOPPED_CODES:
                    with self._lock:
                        self._to("stopped")
                        self.pending = self._box = Outbox()
                    self.delivery.stopped()
                elif ending is not None:
                    raise
                else:
                    log_event(logging.DEBUG, "flush_deferred", ref=self.ref, error=e.code)
            finally:
                # Stamped after the call: a slow Slack must not turn every token into a flush.
                self.last_flush = time.monotonic()
                if ending is not None and self.state != "stopped":
                    self.delivery.post_instead(wait)
                with self._lock:
                    if self.state == "streaming" and self.delivery.name == "posting":
                        self._to("posting")
                    if self.state != "stopped":  # what did not go out goes first, next time
                        self.pending = self._box.then(self.pending)
                    self._box = Outbox()
        finally:
            self._turn.release()

    def _shown(self, text: str) -> None:
        """A delivery showed ``text``: the first answer text is when the reply starts showing."""
        if text and self.first_text_at is None:
            self.first_text_at = time.monotonic()
            self.metrics.first_token.observe(self.first_text_at - self.received)
            with self._lock:
                if self.state == "thinking":
                    self._to(self.delivery.name)


class Flusher:
    """One thread for all replies: often enough that text waits at most STREAM_FLUSH_SECONDS
    plus a tenth of a second, it flushes replies whose buffered text has waited too long
    because the model went quiet, so a slow model never leaves text sitting in a buffer.
    Replies register while they are being written. ``stop`` ends it."""

    def __init__(self) -> None:
        self.interval = min(0.1, STREAM_FLUSH_SECONDS / 2)
        self._replies: set[Reply] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-flusher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, reply: Reply) -> Iterator[Reply]:
        with self._lock:
            self._replies.add(reply)
        try:
            yield reply
        finally:
            with self._lock:
                self._replies.discard(reply)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                replies = list(self._replies)
            for reply in replies:
                try:
                    reply.flush_if_due()
                except Exception:
                    log.exception("flush_failed")


# ════════════════════════════════════════════════════════════════════════════════════════
# 12. Outcomes
# ════════════════════════════════════════════════════════════════════════════════════════


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a question can end: what the person is told (None: the answer itself, or nothing),
    and the level of its ``answer`` log line. The key is the ``outcome`` metric label."""

    notice: str | None
    level: int


_MISCONFIGURED = (
    "Sorry, I'm misconfigured ({}), so I can't answer right now. The team has been alerted."
)
RESTART_NOTICE = "I'm restarting and couldn't finish this answer. Please ask again in a moment."

# Every way a question ends, in one table: adding one is one edit here (plus its meaning in
# the runbook). The alert rules in workloads/ group these into outage, configuration, budget
# and restart signals.
OUTCOMES: dict[str, Outcome] = {
    "ok": Outcome(None, logging.INFO),
    "stopped_by_user": Outcome(None, logging.INFO),
    "interrupted": Outcome(RESTART_NOTICE, logging.WARNING),
    "timeout": Outcome(
        "Sorry, the model took too long to answer and the request timed out. "
        "Please try again in a moment.",
        logging.WARNING,
    ),
    "rate_limited": Outcome(
        "Sorry, the LLM gateway is rate limiting me right now. Please try again in a minute.",
        logging.WARNING,
    ),
    "gateway_error": Outcome(
        "Sorry, the LLM gateway is down or returned an error, so I couldn't answer. "
        "Please try again shortly.",
        logging.WARNING,
    ),
    "gateway_auth_error": Outcome(
        _MISCONFIGURED.format("the LLM gateway refused my key"), logging.ERROR
    ),
    "gateway_config_error": Outcome(
        _MISCONFIGURED.format("the LLM gateway rejected my model or request"), logging.ERROR
    ),
    "gateway_budget_exhausted": Outcome(
        "Sorry, ledger-bot's LLM gateway budget is spent, so I can't answer until "
        "it resets or the team raises it.",
        logging.ERROR,
    ),
    "content_policy": Outcome(
        "Sorry, the model declined to answer this. Please rephrase the question.", logging.INFO
    ),
    "context_too_long": Outcome(
        "Sorry, this question plus the thread is too long for the model. "
        "Please start a new thread with a shorter question.",
        logging.WARNING,
    ),
    "slack_error": Outcome(
        "Sorry, Slack returned an error while I was answering, so this reply may be "
        "incomplete. Please ask again.",
        logging.WARNING,
    ),
    "slack_config_error": Outcome(
        _MISCONFIGURED.format("Slack has not granted me a permission I need here"), logging.ERROR
    ),
    # Told through the shortcut's response_url, only the person sees it: the bot cannot post.
    "not_in_channel": Outcome(
        "I'm not a member of this channel, so I can't answer here. Add me with "
        "`/invite @ledger-bot` (or ask me in a DM) and try again.",
        logging.INFO,
    ),
    "internal_error": Outcome(
        "Sorry, something went wrong on my side while answering. Please try again.", logging.ERROR
    ),
    "busy": Outcome(
        "I'm busy with other questions right now. Please try again in a minute.", logging.WARNING
    ),
    "user_rate_limited": Outcome(
        "You're asking faster than my per-person limit. Please try again in a minute.", logging.INFO
    ),
    "user_budget_exhausted": Outcome(
        "Sorry, you've used today's per-person LLM budget for ledger-bot. It resets at 00:00 UTC.",
        logging.INFO,
    ),
    "fleet_budget_exhausted": Outcome(
        "Sorry, today's LLM budget for ledger-bot is spent. It resets at 00:00 UTC; "
        "please ask again then.",
        logging.WARNING,
    ),
    "not_allowed": Outcome(
        "Sorry, I'm not enabled here: this channel or user is not on my allow-list. "
        "The BOR Write team (@bor-write-eng) can enable it.",
        logging.INFO,
    ),
}


def outcome_of(exc: Exception) -> tuple[str, str]:
    """The one place that maps a failure to an outcome kind and a log detail. Only ``Exception``
    reaches here: interpreter-fatal errors (KeyboardInterrupt, SystemExit) pass through."""
    if isinstance(exc, StoppedByUser):
        return "stopped_by_user", "the person pressed Stop"
    if isinstance(exc, Interrupted):
        return "interrupted", "shutting down"
    if isinstance(exc, QuestionTooLong):
        return "context_too_long", "question exceeds the prompt budget"
    if isinstance(exc, LLMFailure):
        return exc.kind, exc.detail
    if isinstance(exc, SlackError) and exc.code == "not_in_channel":
        return "not_in_channel", f"{exc.method}: {exc.code}"
    if isinstance(exc, SlackError) and exc.code == "missing_scope":
        return "slack_config_error", f"{exc.method}: missing_scope {exc.needed}"
    if isinstance(exc, SlackError):
        return "slack_error", f"{exc.method}: {exc.code}"
    return "internal_error", type(exc).__name__


def notice_text(kind: str, ref: str, text: str | None = None) -> str:
    """What a person is told when their question ends as ``kind`` (``text`` instead of the
    outcome's own notice), with the ref that finds its log lines."""
    return f"{text or OUTCOMES[kind].notice} (ref `{ref}`)"


def new_ref() -> str:
    """A short reference id shown to the user and logged, to find this answer's log lines."""
    return "lb-" + secrets.token_hex(4)


@dataclasses.dataclass
class Job:
    """One accepted question on its way through the pool. ``settle`` is true exactly once: the
    worker and the shutdown path race to end a job, and only the winner records it."""

    question: Question
    received: float  # time.monotonic() when the envelope arrived
    ref: str = dataclasses.field(default_factory=new_ref)
    _settled: bool = False
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def settle(self) -> bool:
        with self._lock:
            first, self._settled = not self._settled, True
            return first


class Recorder:
    """The one place an outcome is recorded: ``ledger_bot_answers_total`` and the ``answer``
    log line (stable fields, its level from OUTCOMES), and for a question that was answered (or
    tried to be: it had a reply) its duration, tokens, cost and sources too. Every question is
    recorded exactly once: by whoever settles its Job."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def refused(self, job: Job, outcome: str) -> None:
        """A question turned away before any answer began (limits, allow-lists, busy, restart)."""
        self._record(job, outcome)

    def answered(
        self,
        job: Job,
        outcome: str,
        *,
        error: str | None = None,
        usage: Usage | None = None,
        cost: float = 0.0,
        sections: int = 0,
        cited: Iterable[Section] = (),
    ) -> None:
        """A question that got a reply, whatever its end."""
        usage, labels = usage or Usage(), [s.label for s in cited]
        m = self.metrics
        m.answer_duration.observe(time.monotonic() - job.received)
        m.llm_tokens.labels(kind="prompt").inc(usage.prompt_tokens)
        m.llm_tokens.labels(kind="completion").inc(usage.completion_tokens)
        m.llm_cost.inc(cost)
        if outcome == "ok":
            m.sources.labels(cited="yes" if labels else "no").inc()
        self._record(
            job,
            outcome,
            error=error,
            tokens={
                "prompt": usage.prompt_tokens,
                "completion": usage.completion_tokens,
                "cached": usage.cached_tokens,
                "estimated": usage.estimated,
            },
            cost_usd=round(cost, 6),
            knowledge_sections=sections,
            sources=labels,
        )

    def _record(self, job: Job, outcome: str, **fields: Any) -> None:
        q = job.question
        self.metrics.answers.labels(outcome=outcome).inc()
        log_event(
            OUTCOMES[outcome].level,
            "answer",
            ref=job.ref,
            channel=q.channel,
            user=q.user,
            latency_ms=round((time.monotonic() - job.received) * 1000),
            outcome=outcome,
            event_id=q.event_id,
            kind=q.kind,
            **fields,
        )


# ════════════════════════════════════════════════════════════════════════════════════════
# 13. Answering
# ════════════════════════════════════════════════════════════════════════════════════════

# The questions one person may ask per USER_RATE_WINDOW_SECONDS (LEDGER_BOT_USER_RATE_LIMIT):
# a limit per minute, as people think of one.
USER_RATE_WINDOW_SECONDS = 60.0
# Thread history sent as context: the newest messages, at most this many and this long (the
# token budget may cut more); the oldest go first, never the question.
HISTORY_MAX_MESSAGES = 40
HISTORY_MAX_CHARS = 40_000
QUERY_THREAD_MESSAGES = 4  # how many recent thread messages join the question in retrieval
# The prompt a question is assumed to need until its real cost is known: the whole shipped
# knowledge (~31,000 tokens by litellm's count, README › Retrieval) and a thread.
RESERVE_PROMPT_TOKENS = 40_000


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A question turned away: its outcome, and what the person is told: ``text`` instead of
    the outcome's own notice, or nothing at all if ``quiet`` (they were told already today)."""

    outcome: str
    text: str | None = None
    quiet: bool = False


@dataclasses.dataclass
class Reservation:
    user: str
    usd: float


class Limits:
    """Per-user rate limit and daily dollar budgets (per user and in total), in memory.

    They hold per process: with N replicas the effective limits are N times these (Slack
    spreads events across connections), and a restart forgets today's spend; the gateway's own
    budgets (keyed by the ``user`` field) are the fleet-wide guard. ``admit`` counts the
    question and reserves ``reserve_usd`` of both budgets, so questions arriving together
    cannot overspend; ``settle`` replaces the reservation with the real cost.
    """

    def __init__(
        self,
        *,
        rate_limit: int,
        daily_budget_usd: float,
        user_daily_budget_usd: float,
        clock: Callable[[], float] = time.time,
    ):
        self.rate_limit = rate_limit
        self.daily_budget_usd = daily_budget_usd
        self.user_daily_budget_usd = user_daily_budget_usd
        self.clock = clock
        self._lock = threading.Lock()
        self._asked: dict[str, collections.deque[float]] = {}
        self._day = ""
        self._spent_total = 0.0
        self._spent_by_user: dict[str, float] = {}

    def _today(self) -> None:
        day = dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()
        if day != self._day:
            self._day, self._spent_total, self._spent_by_user = day, 0.0, {}

    def describe(self) -> list[str]:
        """Each person's limits, in words (the Home tab shows them)."""
        return [
            f"{self.rate_limit} questions per {_duration(USER_RATE_WINDOW_SECONDS)}"
            if self.rate_limit
            else "no per-person question limit",
            f"a daily LLM budget of ${self.user_daily_budget_usd:.2f} per person"
            if self.user_daily_budget_usd
            else "no per-person daily budget",
        ]

    def admit(self, user: str, reserve_usd: float = 0.0) -> Reservation | Refusal:
        now = self.clock()
        with self._lock:
            self._today()
            total, mine = self.daily_budget_usd, self.user_daily_budget_usd
            spent = self._spent_by_user.get(user, 0.0)
            if _over(self._spent_total, reserve_usd, total):
                return Refusal("fleet_budget_exhausted")
            if _over(spent, reserve_usd, mine):
                return Refusal("user_budget_exhausted")
            if self.rate_limit:
                window = USER_RATE_WINDOW_SECONDS
                asked = self._asked.setdefault(user, collections.deque())
                while asked and asked[0] <= now - window:
                    asked.popleft()
                if len(asked) >= self.rate_limit:
                    wait = max(1, math.ceil(asked[0] + window - now))
                    return Refusal(
                        "user_rate_limited",
                        text=f"You've asked {len(asked)} questions in the last "
                        f"{_duration(window)}. Please try again in {_duration(wait)}.",
                    )
                asked.append(now)
            if len(self._asked) > 10_000:  # forget idle users so memory stays bounded
                idle = now - USER_RATE_WINDOW_SECONDS
                for u in [u for u, q in self._asked.items() if not q or q[-1] <= idle]:
                    del self._asked[u]
            self._spent_total += reserve_usd
            self._spent_by_user[user] = spent + reserve_usd
        return Reservation(user, reserve_usd)

    def settle(self, reservation: Reservation, usd: float) -> None:
        with self._lock:
            self._today()
            delta = usd - reservation.usd
            self._spent_total = max(0.0, self._spent_total + delta)
            self._spent_by_user[reservation.user] = max(
                0.0, self._spent_by_user.get(reservation.user, 0.0) + delta
            )
            reservation.usd = usd


def _over(spent: float, reserve: float, budget: float) -> bool:
    """Would one more question overrun ``budget`` (0: none)? A budget smaller than one
    reservation still lets a question through when nothing else is spent or reserved."""
    return bool(budget) and (spent >= budget or (spent > 0 and spent + reserve > budget))


def bounded_put(mapping: collections.OrderedDict, key: Any, value: Any, limit: int) -> None:
    """Set ``key`` as the newest entry of ``mapping``, forgetting the oldest beyond ``limit``:
    the one shape of every bounded memory the bot keeps (verdicts, votes, AI-pane threads)."""
    mapping[key] = value
    mapping.move_to_end(key)
    while len(mapping) > limit:
        mapping.popitem(last=False)


class ThreadVerdicts:
    """Follow-ups: is this channel thread one the bot belongs in (it was mentioned in the
    thread's first message, or it has answered there)? Each thread is checked once, under a
    lock: a second question arriving while the first check runs waits for its verdict instead
    of being answered. Positive verdicts are remembered for a week, negative ones for an hour
    (a later mention in the thread makes it the bot's via ``remember``, in this process). A
    check that fails (Slack error) decides nothing: that question is skipped, nothing is
    cached, and the next question checks again."""

    def __init__(self, check: Callable[[str, str], bool], max_items: int = 20_000):
        self.check = check
        self.max_items = max_items
        self._verdicts: collections.OrderedDict[str, tuple[bool, float]] = collections.OrderedDict()
        self._checking: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def is_bot_thread(self, channel: str, thread_ts: str) -> bool:
        key = f"{channel}:{thread_ts}"
        with self._lock:
            known = self._get(key)
            if known is not None:
                return known
            pending = self._checking.get(key)
            if pending is None:
                self._checking[key] = threading.Event()
        if pending is not None:
            pending.wait(30)
            with self._lock:
                return bool(self._get(key))
        verdict: bool | None = None
        try:
            verdict = self.check(channel, thread_ts)
        except SlackError as e:  # unknown, not "no": this question is skipped, nothing cached
            log_event(logging.WARNING, "followup_check_failed", channel=channel, error=e.code)
        finally:
            with self._lock:
                if verdict is not None:
                    self._put(key, verdict)
                self._checking.pop(key).set()
        return bool(verdict)

    def remember(self, channel: str, thread_ts: str) -> None:
        with self._lock:
            self._put(f"{channel}:{thread_ts}", True)

    def _get(self, key: str) -> bool | None:
        entry = self._verdicts.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _put(self, key: str, verdict: bool) -> None:
        expires = time.monotonic() + (7 * 24 * 3600 if verdict else 3600)
        bounded_put(self._verdicts, key, (verdict, expires), self.max_items)


def retrieval_query(question_text: str, thread: list[dict]) -> str:
    """The text knowledge is ranked by: the question and the last few thread messages."""
    recent = thread[-QUERY_THREAD_MESSAGES:] if QUERY_THREAD_MESSAGES else []
    return " ".join([question_text, *(m.get("text") or "" for m in recent)])


@dataclasses.dataclass(frozen=True)
class PromptBudget:
    """Tokens one prompt may spend on knowledge, and in all (the model's context less the
    longest answer)."""

    knowledge: int
    total: int

    @classmethod
    def for_model(cls, model: str) -> PromptBudget:
        context = context_tokens(model)
        return cls(knowledge=int(context * KNOWLEDGE_SHARE), total=context - ANSWER_MAX_TOKENS)

    def with_tools(self, count: Callable[[str], int]) -> int:
        """The whole prompt's tokens when the tools' definitions go with it."""
        return self.total - count(json.dumps(TOOL_SCHEMAS))


def build_prompt(
    kb: KnowledgeBase,
    question: Question,
    thread: list[dict],
    me: BotIdentity,
    count: Callable[[str], int],
    budget: PromptBudget,
    *,
    tools: bool = False,
) -> tuple[list[dict], KnowledgeChoice]:
    """The one prompt pipeline (Slack, ``--ask`` and ``--eval`` alike): knowledge retrieved for
    the question and the thread's last messages, then the thread turned into chat messages;
    with ``tools``, the prompt says how to use them and the budget leaves room for them."""
    choice = kb.choose(retrieval_query(question.text, thread), budget.knowledge, count)
    messages = build_llm_messages(
        question=question,
        thread=thread,
        me=me,
        system_prompt=f"{SYSTEM_PROMPT}\n\n{TOOLS_PROMPT}" if tools else SYSTEM_PROMPT,
        max_messages=HISTORY_MAX_MESSAGES,
        max_chars=HISTORY_MAX_CHARS,
        knowledge=choice,
        token_budget=budget.with_tools(count) if tools else budget.total,
        count_tokens=count,
    )
    return messages, choice


def cited_sections(choice: KnowledgeChoice, labels: list[str]) -> list[Section]:
    """The sections an answer cited, in citation order: only labels that were really sent (a
    label the model made up is dropped)."""
    sent = {s.label: s for s in choice.sections}
    return [sent[label] for label in dict.fromkeys(labels) if label in sent]


def attach_images(files: SlackFiles, q: Question, messages: list[dict]) -> tuple[list[dict], str]:
    """Screenshots attached to the question, downloaded with the bot token and added to it (at
    most IMAGE_MAX_COUNT of IMAGE_MAX_BYTES each, all within DOWNLOAD_SECONDS, so memory and
    time stay bounded), each sent as the image type its bytes are; a file that is not an image,
    or cannot be fetched, is named in a note and never fails the answer."""
    if not q.files:
        return messages, ""
    chosen, skipped = choose_images(q.files, max_count=IMAGE_MAX_COUNT, max_bytes=IMAGE_MAX_BYTES)
    loaded, unreadable = [], []
    finish_by = time.monotonic() + DOWNLOAD_SECONDS
    for f in chosen:
        try:
            data = files.download(
                str(f.get("url_private_download") or f.get("url_private")),
                max_bytes=IMAGE_MAX_BYTES,
                finish_by=finish_by,
            )
            kind = image_type(data)
            if kind is None:
                raise SlackError("files", "not_an_image")
            loaded.append((kind, data))
        except SlackError as e:
            unreadable.append(str(f.get("name") or f.get("id")))
            log_event(logging.WARNING, "file_unreadable", file=f.get("id"), error=e.code)
    return with_images(messages, loaded), skipped_files_note(skipped, unreadable)


class OpenAnswers:
    """The questions workers hold right now, with their replies once they have one: what
    shutdown ends with RESTART_NOTICE when the drain deadline passes."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Job, Reply | None]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, job: Job) -> Iterator[None]:
        with self._lock:
            self._open[job.ref] = (job, None)
        try:
            yield
        finally:
            with self._lock:
                self._open.pop(job.ref, None)

    def replying(self, job: Job, reply: Reply) -> None:
        with self._lock:
            self._open[job.ref] = (job, reply)

    def now(self) -> list[tuple[Job, Reply | None]]:
        with self._lock:
            return list(self._open.values())


@dataclasses.dataclass(frozen=True)
class Slack:
    """The bot's Slack clients, over one SlackApi."""

    api: SlackApi
    surfaces: SlackSurfaces
    files: SlackFiles


class Notices:
    """How people hear that their question ended without an answer, each also recorded once:
    refusals (``refuse``), failure notices (``tell``), and at shutdown the restart notice for
    every question still open (``interrupt_open``). For the answerer, the dispatcher and the
    lifecycle alike."""

    def __init__(self, slack: Slack, recorder: Recorder):
        self.slack = slack
        self.recorder = recorder

    def refuse(self, job: Job, refusal: Refusal) -> None:
        """Turn a question away: record it, and tell the person (unless ``quiet``)."""
        self.recorder.refused(job, refusal.outcome)
        if not refusal.quiet:
            self.tell(job, refusal.outcome, text=refusal.text)

    def tell(
        self, job: Job, outcome: str, reply: Reply | None = None, text: str | None = None
    ) -> bool:
        """Tell the person how their question ended, if OUTCOMES gives the outcome a notice (or
        ``text`` replaces it): privately through the shortcut's response_url when the bot is not
        in the conversation, at the end of the reply when there is one, else as a post in the
        thread. True if it was said; one ``failure_notice_undeliverable`` line if Slack refused
        even that (the person saw nothing)."""
        notice = text or OUTCOMES[outcome].notice
        if not notice:
            return False
        q, body = job.question, notice_text(outcome, job.ref, notice)
        try:
            if outcome == "not_in_channel":
                if q.response_url:
                    self.slack.files.respond(q.response_url, body)
                return bool(q.response_url)
            if reply is not None:
                return reply.interrupt(body) if outcome == "interrupted" else reply.fail(body)
            self.slack.api.post_message(
                channel=q.channel,
                thread_ts=q.thread_ts,
                markdown=body,
                metadata_type=NOTICE_METADATA,
                ref=job.ref,
            )
            return True
        except SlackError as e:
            log_event(logging.ERROR, "failure_notice_undeliverable", ref=job.ref, error=e.code)
            return False

    def interrupt_open(self, open_answers: OpenAnswers, deadline: float = 10.0) -> int:
        """Shutdown: end every question a worker still holds with RESTART_NOTICE (stream
        stopped), all at once, within ``deadline`` seconds; each is recorded once, as
        ``interrupted`` (by whichever of this and its worker settles it). Returns how many."""
        open_now = open_answers.now()

        def end(job: Job, reply: Reply | None) -> None:
            if reply is None:  # taken by a worker, no reply yet
                if job.settle():
                    self.refuse(job, Refusal("interrupted"))
            elif self.tell(job, "interrupted", reply) and job.settle():
                self.recorder.answered(job, "interrupted", error="drain deadline passed")

        threads = [
            threading.Thread(target=end, args=pair, name="interrupt", daemon=True)
            for pair in open_now
        ]
        for t in threads:
            t.start()
        finish_by = time.monotonic() + deadline
        for t in threads:
            t.join(max(0.0, finish_by - time.monotonic()))
        return len(open_now)


class Answerer:
    """Turns one Question into one reply in its thread; every failure becomes a notice, and
    every question one recorded outcome.

    ``answer`` runs on a worker. Each job is settled once, and whoever settles it records it:
    the worker, or at shutdown ``Notices.interrupt_open`` over ``open``.
    """

    def __init__(
        self,
        slack: Slack,
        me: BotIdentity,
        knowledge: KnowledgeStore,
        limits: Limits,
        notices: Notices,
        notifier: Notifier,
        gateway: GatewaySettings,
        *,
        streaming: bool,
        feedback: bool,
        follow_ups: bool,
        llm_client: Any = None,
        repo: RepoStore | None = None,
    ):
        self.slack = slack
        self.me = me
        self.knowledge = knowledge
        self.repo = repo
        self.limits = limits
        self.notices = notices
        self.recorder = notices.recorder
        self.notifier = notifier
        self.gateway = gateway
        self.streaming, self.feedback, self.follow_ups = streaming, feedback, follow_ups
        self.llm_client = llm_client
        self.verdicts = ThreadVerdicts(self._thread_started_with_mention)
        self.flusher = Flusher()
        self.open = OpenAnswers()
        model = gateway.ledger_bot_model
        self.count = token_counter(model)
        self.budget = PromptBudget.for_model(model)
        self.tool_budget = self.budget.with_tools(self.count) if repo else self.budget.total
        # What a question is assumed to cost until it is answered: a RESERVE_PROMPT_TOKENS
        # prompt, none of it cached, and the longest answer allowed.
        self.reserve_usd = cost_usd(
            model,
            Usage(
                prompt_tokens=min(self.budget.total, RESERVE_PROMPT_TOKENS),
                completion_tokens=ANSWER_MAX_TOKENS,
            ),
        )

    def answer(self, job: Job) -> str | None:
        """Answer ``job``; returns its outcome (recorded, unless shutdown got there first), or
        None for a follow-up in a thread that is not the bot's (no question: nothing recorded,
        nothing said). The job is visible to ``interrupt_open`` from the moment a worker takes
        it."""
        with self.open.holding(job):
            return self._answer(job)

    def _answer(self, job: Job) -> str | None:
        q = job.question
        usage, streamed = Usage(), []
        messages: list[dict] = []
        outcome, detail = "ok", None
        cited: list[Section] = []
        choice: KnowledgeChoice | None = None
        admitted: Reservation | Refusal | None = None
        reply: Reply | None = None
        try:
            # Follow-ups in threads that are not the bot's are dropped silently.
            if q.kind == "followup" and not self.verdicts.is_bot_thread(q.channel, q.thread_ts):
                log_event(logging.DEBUG, "followup_ignored", ref=job.ref, channel=q.channel)
                job.settle()
                return None
            admitted = self.limits.admit(q.user, self.reserve_usd)
            if isinstance(admitted, Refusal):
                if job.settle():
                    self.notices.refuse(job, admitted)
                return admitted.outcome
            index = self.repo.current() if self.repo else None  # one commit for the answer
            reply = Reply(
                self.slack.api,
                self.slack.surfaces,
                q,
                job.ref,
                streaming=self.streaming,
                feedback=self.feedback,
                received=job.received,
                metrics=self.recorder.metrics,
                tasks=index is not None,
            )
            self.open.replying(job, reply)
            reply.show_feedback()
            self.recorder.metrics.first_feedback.observe(time.monotonic() - job.received)
            thread = (
                self.slack.api.fetch_thread(
                    channel=q.channel, thread_ts=q.thread_ts, max_messages=HISTORY_MAX_MESSAGES
                )
                if q.in_thread
                else []
            )
            if names_pane_thread(q, thread, self.me):
                title = thread_title(q.text, self.me)
                self.notifier.submit(
                    lambda: quietly(
                        self.slack.surfaces.set_title,
                        channel=q.channel,
                        thread_ts=q.thread_ts,
                        title=title,
                    )
                )
            kb = self.knowledge.current()
            tools = ToolSession(index, reply.step, self.recorder.metrics) if index else None
            messages, choice = build_prompt(
                kb, q, thread, self.me, self.count, self.budget, tools=tools is not None
            )
            messages, files_note = attach_images(self.slack.files, q, messages)
            log_event(
                logging.DEBUG,
                "knowledge_chosen",
                ref=job.ref,
                whole=choice.whole,
                sections=list(choice.labels),
            )
            log_event(logging.DEBUG, "llm_request", ref=job.ref, messages=messages[1:])
            text = AnswerText()
            stream = converse(
                self.gateway,
                messages,
                usage,
                tools=tools,
                budget=self.tool_budget,
                count=self.count,
                client=self.llm_client,
                user=gateway_user(self.gateway.litellm_developer_key, q.team, q.user),
            )
            try:
                with self.flusher.watching(reply):
                    for chunk in stream:
                        streamed.append(chunk)
                        if out := text.feed(chunk):
                            reply.add(out)
            finally:
                stream.close()  # after Stop or a failure: the gateway stops generating
            rest, labels = text.end()
            cited = cited_sections(choice, labels) + (tools.cited(labels) if tools else [])
            reply.finish(rest + neutralise_broadcasts(files_note), cited)
            if reply.state == "stopped":
                raise StoppedByUser()
            if self.follow_ups and q.in_thread:
                self.verdicts.remember(q.channel, q.thread_ts)
        except Exception as exc:
            outcome, detail = outcome_of(exc)
            if outcome == "internal_error":
                log.exception("answer_crashed", extra={"fields": {"ref": job.ref}})
        if not job.settle():
            return "interrupted"  # shutdown ended this reply and recorded it
        if outcome != "ok":
            self.notices.tell(job, outcome, reply)
        cost = self._cost(job, usage, messages, "".join(streamed))
        if isinstance(admitted, Reservation):
            self.limits.settle(admitted, cost)
        sections = len(choice.sections) if choice else 0
        self.recorder.answered(
            job, outcome, error=detail, usage=usage, cost=cost, sections=sections, cited=cited
        )
        return outcome

    def _cost(self, job: Job, usage: Usage, messages: list[dict], streamed: str) -> float:
        try:
            if not usage.completion_tokens and streamed:
                estimate_usage(usage, messages, streamed, self.count)
            return cost_usd(self.gateway.ledger_bot_model, usage)
        except Exception:
            log.exception("cost_failed", extra={"fields": {"ref": job.ref}})
            return 0.0

    def _thread_started_with_mention(self, channel: str, thread_ts: str) -> bool:
        """Raises SlackError when it cannot tell (ThreadVerdicts caches nothing then)."""
        root = self.slack.api.fetch_thread_root(channel=channel, thread_ts=thread_ts)
        return root is not None and f"<@{self.me.user_id}" in (root.get("text") or "")

    def close(self) -> None:
        self.flusher.stop()


# ════════════════════════════════════════════════════════════════════════════════════════
# 14. Dispatch
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
            while self._items and (
                len(self._items) >= self.max_items
                or next(iter(self._items.values())) < now - self.ttl
            ):
                self._items.popitem(last=False)
            if any(k in self._items for k in keys):
                return False
            for k in keys:
                self._items[k] = now
            return True


class Intake:
    """The policy every question meets, whatever door it came in by (@mentions, DMs and AI-pane
    threads, follow-ups in the bot's threads, the shortcut's modal): once only, allow-lists,
    then the queue (or "busy"). Limits and budgets are the worker's (one admit, after a
    successful submit). Refusals are said from the notices thread.

    Allow-lists: LEDGER_BOT_ALLOWED_CHANNELS governs channels; DMs are governed by
    LEDGER_BOT_ALLOWED_USERS alone (a DM has no channel anyone could allow-list).
    """

    def __init__(
        self,
        submit: Callable[[Job], bool],
        notices: Notices,
        notifier: Notifier,
        metrics: Metrics,
        *,
        allowed_channels: tuple[str, ...],
        allowed_users: tuple[str, ...],
    ):
        self.submit = submit  # the worker pool's: False when its queue is full
        self.notices = notices
        self.notifier = notifier
        self.metrics = metrics
        self.allowed_channels = allowed_channels
        self.allowed_users = allowed_users
        self.seen = SeenSet()
        self.told_not_allowed = SeenSet(ttl_seconds=24 * 3600)

    def take(
        self,
        q: Question,
        received: float,
        metric_type: str,
        keys: list[str],
        retry_attempt: int | None = None,
    ) -> bool:
        """Queue ``q`` for a worker, unless one of ``keys`` was seen, an allow-list refuses it,
        or the queue is full; True if queued."""
        if not self.seen.add(*keys):
            self.metrics.events.labels(type=metric_type, outcome="duplicate").inc()
            log_event(
                logging.INFO,
                "event_duplicate",
                event_id=q.event_id,
                channel=q.channel,
                retry_attempt=retry_attempt,
            )
            return False
        job = Job(q, received)
        refusal = self._not_allowed(q)
        if refusal is None and not self.submit(job):
            refusal = Refusal("busy")
        if refusal is not None:
            self.metrics.events.labels(type=metric_type, outcome="rejected").inc()
            job.settle()
            self.notifier.submit(lambda: self.notices.refuse(job, refusal))
            return False
        self.metrics.events.labels(type=metric_type, outcome="accepted").inc()
        log_event(
            logging.INFO,
            "event_accepted",
            ref=job.ref,
            event_id=q.event_id,
            channel=q.channel,
            user=q.user,
            kind=q.kind,
            retry_attempt=retry_attempt,
        )
        log_event(logging.DEBUG, "question_text", ref=job.ref, text=q.text)
        return True

    def _not_allowed(self, q: Question) -> Refusal | None:
        """A refusal if an allow-list excludes this question (said once a day per channel, or
        per user in DMs; quiet after that), else None."""
        channel_ok = (
            not self.allowed_channels or q.kind == "dm" or q.channel in self.allowed_channels
        )
        user_ok = not self.allowed_users or q.user in self.allowed_users
        if channel_ok and user_ok:
            return None
        where = q.user if q.kind == "dm" or channel_ok else q.channel
        return Refusal("not_allowed", quiet=not self.told_not_allowed.add(where))


FEEDBACK_THANKS = "Thanks for the feedback! It helps the BOR Write team improve my answers."


class Interactions:
    """Interactivity: the 👍/👎 votes, the message shortcut and its modal. Runs on slack_sdk's
    listener pool (and ``ack_payload`` on the socket's reader thread): it never calls Slack
    itself, every call goes to the Notifier."""

    def __init__(
        self,
        intake: Intake,
        api: SlackApi,
        surfaces: SlackSurfaces,
        notifier: Notifier,
        metrics: Metrics,
        *,
        modal_key: bytes,
    ):
        self.intake = intake
        self.api = api
        self.surfaces = surfaces
        self.notifier = notifier
        self.metrics = metrics
        self.modal_key = modal_key  # signs the modal's private_metadata (see modal_where)
        self.votes: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._votes_lock = threading.Lock()

    def handle(self, payload: dict, received: float) -> None:
        """Route one acked ``interactive`` envelope."""
        kind = payload.get("type")
        if kind == "block_actions":
            self._on_block_actions(payload)
        elif kind == "message_action" and payload.get("callback_id") == SHORTCUT_CALLBACK:
            self._on_shortcut(payload)
        elif (
            kind == "view_submission"
            and (payload.get("view") or {}).get("callback_id") == MODAL_CALLBACK
        ):
            self._on_modal(payload, received)
        else:
            self.metrics.events.labels(type="other", outcome="ignored").inc()

    def ack_payload(self, envelope_type: str, payload: dict) -> dict | None:
        """What the ack of this envelope carries (on the socket's reader thread: cheap, never
        raises): the modal's own errors for a question submission that asks nothing."""
        view = payload.get("view") if envelope_type == "interactive" else None
        if (
            payload.get("type") != "view_submission"
            or not isinstance(view, dict)
            or view.get("callback_id") != MODAL_CALLBACK
        ):
            return None
        verdict = read_modal(view, payload.get("user") or {}, self.modal_key, now=time.time())
        if isinstance(verdict, ModalRejected) and verdict.errors:
            return {"response_action": "errors", "errors": verdict.errors}
        return None

    def _on_shortcut(self, payload: dict) -> None:
        """ "Ask about this thread" on a message: open the question modal, first in line (its
        trigger_id dies 3 s after the click)."""
        message = payload.get("message") or {}
        channel = str((payload.get("channel") or {}).get("id") or "")
        thread_ts = str(message.get("thread_ts") or message.get("ts") or "")
        trigger = str(payload.get("trigger_id") or "")
        user = str((payload.get("user") or {}).get("id") or "")
        if not (channel and thread_ts and trigger and user):
            self.metrics.events.labels(type="shortcut", outcome="rejected").inc()
            return
        self.metrics.events.labels(type="shortcut", outcome="accepted").inc()
        where = modal_where(
            self.modal_key,
            channel=channel,
            thread_ts=thread_ts,
            user=user,
            response_url=str(payload.get("response_url") or ""),
            now=time.time(),
        )
        view = ask_modal(where)
        self.notifier.submit(
            lambda: quietly(self.surfaces.open_view, trigger_id=trigger, view=view),
            lane="trigger",
        )

    def _on_modal(self, payload: dict, received: float) -> None:
        """The modal was submitted: a question about that thread, answered in it. A submission
        that asks nothing was already answered in its ack (``ack_payload``)."""
        view = payload.get("view") or {}
        verdict = read_modal(view, payload.get("user") or {}, self.modal_key, now=time.time())
        if isinstance(verdict, ModalRejected):
            self.metrics.events.labels(type="shortcut", outcome="rejected").inc()
            log_event(logging.WARNING, "event_rejected", reason=f"modal: {verdict.reason}")
            return
        self.intake.take(verdict, received, "shortcut", [f"view:{view.get('id') or verdict.ts}"])

    def _on_block_actions(self, payload: dict) -> None:
        """👍/👎 votes: one per person per answer (a second click that changes the vote is
        logged as a change, not counted again); an ephemeral thank-you for a first vote."""
        actions = payload.get("actions") or []
        action = actions[0] if actions and isinstance(actions[0], dict) else {}
        value = str(action.get("value") or "")
        vote, _, ref = value.partition(":")
        if action.get("action_id") != FEEDBACK_ACTION or vote not in ("up", "down") or not ref:
            self.metrics.events.labels(type="block_actions", outcome="ignored").inc()
            return
        self.metrics.events.labels(type="block_actions", outcome="accepted").inc()
        user = str((payload.get("user") or {}).get("id") or "")
        channel = str(
            (payload.get("channel") or {}).get("id")
            or (payload.get("container") or {}).get("channel_id")
            or ""
        )
        with self._votes_lock:
            before = self.votes.get(f"{ref}:{user}")
            bounded_put(self.votes, f"{ref}:{user}", vote, 50_000)
        if before == vote:
            return
        if before is None:
            self.metrics.feedback.labels(value=vote).inc()
        log_event(
            logging.INFO,
            "feedback",
            ref=ref,
            value=vote,
            changed_from=before,
            channel=channel,
            user=user,
        )
        thread_ts = (payload.get("message") or {}).get("thread_ts") or None
        if channel and user and before is None:
            self.notifier.submit(
                lambda: quietly(
                    self.api.post_ephemeral,
                    channel=channel,
                    user=user,
                    thread_ts=thread_ts,
                    text=FEEDBACK_THANKS,
                )
            )


class Dispatcher:
    """Decides what to do with one acked envelope: ignore it, hand interactivity to
    Interactions, set up an AI-pane thread, publish the Home tab, or put a question through
    the Intake. Runs on slack_sdk's listener pool: it never calls Slack itself (every call goes
    to the Notifier). Every envelope and event type the bot handles is named in ``dispatch``,
    and nowhere else."""

    def __init__(
        self,
        me: BotIdentity,
        intake: Intake,
        interactions: Interactions,
        surfaces: SlackSurfaces,
        notifier: Notifier,
        metrics: Metrics,
        *,
        follow_ups: bool,
        prompts: list[str],
        home: Callable[[], dict],
    ):
        self.me = me
        self.intake = intake
        self.interactions = interactions
        self.surfaces = surfaces
        self.notifier = notifier
        self.metrics = metrics
        self.follow_ups = follow_ups
        self.prompts = prompts
        self.home = home  # builds the Home tab's view (on the notices thread: it may reload files)

    def dispatch(
        self,
        envelope_type: str,
        payload: dict,
        received: float,
        *,
        envelope_id: str = "",
        retry_attempt: int | None = None,
    ) -> None:
        """Route one acked envelope; see the class docstring."""
        if envelope_type == "interactive":
            self.interactions.handle(payload, received)
            return
        if envelope_type != "events_api":
            self.metrics.events.labels(type="other", outcome="ignored").inc()
            log_event(logging.DEBUG, "envelope_ignored", envelope_type=envelope_type)
            return
        raw_event = payload.get("event") or {}
        event_type = str(raw_event.get("type") or "unknown")
        if event_type == "assistant_thread_started":
            self._on_assistant_thread(raw_event)
            return
        if event_type == "app_home_opened":
            self._on_home_opened(raw_event)
            return
        metric_type = event_type if event_type in ("app_mention", "message") else "other"
        event_id = str(payload.get("event_id") or "")
        try:
            event = msgspec.convert(raw_event, SlackEvent, strict=False)
        except msgspec.ValidationError as e:
            self.metrics.events.labels(type=metric_type, outcome="rejected").inc()
            log_event(
                logging.WARNING,
                "event_rejected",
                event_id=event_id,
                reason="malformed",
                error=str(e),
            )
            return
        verdict = classify_event(
            event_type,
            event,
            event_id,
            str(payload.get("team_id") or ""),
            self.me,
            follow_ups=self.follow_ups,
        )
        if isinstance(verdict, Ignored):
            self.metrics.events.labels(type=metric_type, outcome="ignored").inc()
            log_event(logging.DEBUG, "event_ignored", event_id=event_id, reason=verdict.reason)
            return
        # One answer per event (Slack redelivers) and per message (a mention can also arrive as
        # a `message` event). An event without an id is known by its envelope and message.
        keys = [
            f"msg:{verdict.channel}:{verdict.ts}",
            f"event:{event_id}" if event_id else f"envelope:{envelope_id}",
        ]
        self.intake.take(verdict, received, metric_type, keys, retry_attempt)

    def _on_assistant_thread(self, event: dict) -> None:
        """A person opened a thread in the AI pane: offer the suggested prompts. Nothing about
        the thread is remembered: any replica answers it and names it (``Answerer``)."""
        thread = event.get("assistant_thread") or {}
        channel, thread_ts = str(thread.get("channel_id") or ""), str(thread.get("thread_ts") or "")
        if not (channel and thread_ts):
            self.metrics.events.labels(type="assistant", outcome="rejected").inc()
            return
        self.metrics.events.labels(type="assistant", outcome="accepted").inc()
        self.notifier.submit(
            lambda: quietly(
                self.surfaces.set_suggested_prompts,
                channel=channel,
                thread_ts=thread_ts,
                prompts=self.prompts,
            )
        )

    def _on_home_opened(self, event: dict) -> None:
        user = str(event.get("user") or "")
        if event.get("tab") != "home" or not user:
            self.metrics.events.labels(type="app_home", outcome="ignored").inc()
            return
        self.metrics.events.labels(type="app_home", outcome="accepted").inc()
        self.notifier.submit(
            lambda: quietly(self.surfaces.publish_home, user=user, view=self.home()),
            lane="home",
            key=f"home:{user}",
        )


# ════════════════════════════════════════════════════════════════════════════════════════
# 15. Socket Mode
# ════════════════════════════════════════════════════════════════════════════════════════

PING_INTERVAL_SECONDS = 3.0  # slack_sdk pings this often (its own stale check: 4 missed pongs)
DEAD_AFTER_SECONDS = 10.0  # no pong and no frame for this long: the connection is dead
HELLO_WAIT_SECONDS = 5.0  # a new connection that says no hello within this is retried
RECEIVE_BUFFER_BYTES = 512 * 1024  # slack_sdk's 1 KB default recurses per chunk on MB frames


class Acks:
    """Envelopes acked on the socket's reader thread, and handed on only once acked.

    ``ack`` runs on the reader thread for every envelope frame, from its parsed top-level
    ``envelope_id``, before anything else: handing the ack to slack_sdk's queue and listener
    pool costs two thread switches, each waiting for the interpreter lock while workers stream
    answers. The ack carries ``ack_payload``'s answer where Slack reads one (a modal's errors).
    After SIGTERM nothing is acked, so Slack redelivers to another connection. ``hand_on`` runs
    on slack_sdk's listener pool: it passes on an envelope ``ack`` acked, never one it did not
    (Slack would redeliver it, and the redelivery is the one to answer).
    """

    def __init__(
        self,
        client: SocketModeClient,
        health: Health,
        metrics: Metrics,
        on_request: Callable[[SocketModeRequest, float], None],
        ack_payload: Callable[[str, dict], dict | None],
    ):
        self.client = client
        self.health = health
        self.metrics = metrics
        self.on_request = on_request
        self.ack_payload = ack_payload
        # envelope_id -> monotonic arrival if acked, None if not (no usable id, or stopping);
        # written by ``ack``, popped by ``hand_on``, which may run first (slack_sdk queues the
        # frame for its listeners before it calls on_frame) and so waits for the entry.
        self._acked: collections.OrderedDict[Any, float | None] = collections.OrderedDict()
        self._acked_cv = threading.Condition()

    def ack(self, frame: dict, now: float) -> None:
        envelope_id = frame.get("envelope_id")
        if envelope_id is None or isinstance(envelope_id, (dict, list)):
            return
        acked = isinstance(envelope_id, str) and bool(envelope_id) and not self.health.stopping
        # Recorded before the ack goes out, so hand_on never misses an acked one.
        with self._acked_cv:  # bounded: envelopes slack_sdk never handed on
            bounded_put(self._acked, envelope_id, now if acked else None, 10_000)
            self._acked_cv.notify_all()
        if not acked:
            return
        ack: dict[str, Any] = {"envelope_id": envelope_id}
        payload = frame.get("payload")
        response = self.ack_payload(
            str(frame.get("type")), payload if isinstance(payload, dict) else {}
        )
        if response is not None:
            ack["payload"] = response
        try:
            self.client.send_socket_mode_response(ack)
        except Exception:
            with self._acked_cv:  # not acked after all: Slack will redeliver it
                self._acked[envelope_id] = None
            raise
        self.metrics.ack_latency.observe(time.monotonic() - now)

    def hand_on(self, client: Any, req: SocketModeRequest) -> None:
        try:
            with self._acked_cv:
                # ``ack`` records before it acks, right after slack_sdk queues the frame.
                self._acked_cv.wait_for(lambda: req.envelope_id in self._acked, timeout=10)
                received = self._acked.pop(req.envelope_id, None)
            if received is None or self.health.stopping:
                return
            self.on_request(req, received)
        except Exception:
            self.metrics.events.labels(type="other", outcome="rejected").inc()
            log.exception("event_rejected", extra={"fields": {"envelope_type": req.type}})


class SocketLink:
    """The Socket Mode connection: opens it, keeps /ready true only while a connection that
    said ``hello`` is alive, and gives every frame to Acks first.

    slack_sdk's own reconnection is off (``auto_reconnect_enabled=False``): its stale check
    notices a connection that died without a close frame only after 4 pings, it does not retry
    a reconnect that fails, and it retries a revoked token forever. It still reconnects once on
    a ``disconnect`` frame; the watchdog gives that HELLO_WAIT_SECONDS before it steps in, and
    never starts a connect while one is in flight. The socket-watchdog thread does the rest: a
    connection with no pong or frame for DEAD_AFTER_SECONDS is dead; a lost one is replaced with
    capped backoff; one line is logged per transition; a refused app token calls
    ``on_auth_failed``.
    """

    def __init__(
        self,
        app_token: str,
        web: WebClient,
        health: Health,
        metrics: Metrics,
        on_request: Callable[[SocketModeRequest, float], None],
        on_auth_failed: Callable[[str, str], None],
        ack_payload: Callable[[str, dict], dict | None] = lambda envelope_type, payload: None,
    ):
        self.health = health
        self.metrics = metrics
        self.on_auth_failed = on_auth_failed
        self.client = SocketModeClient(
            app_token=app_token,
            web_client=web,
            auto_reconnect_enabled=False,
            ping_interval=PING_INTERVAL_SECONDS,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
            concurrency=10,
            on_message_listeners=[self.on_frame],
            on_close_listeners=[self._on_close],
        )
        self.acks = Acks(self.client, health, metrics, on_request, ack_payload)
        self.client.socket_mode_request_listeners.append(self.acks.hand_on)
        self._hellos = 0
        self._alive_at = 0.0  # wall clock of the last frame (pongs are read from slack_sdk)
        self._attempt_at = 0.0  # monotonic time of the last connect started (ours or slack_sdk's)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- connecting ---------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> bool:
        """Open the first connection, retrying with backoff; then start the watchdog. Returns
        False if ``stop`` was set first. A refused app token calls ``on_auth_failed``."""
        delays = backoff_delays()
        while not stop.is_set():
            if self._open():
                self._watchdog = threading.Thread(
                    target=self._watch, name="socket-watchdog", daemon=True
                )
                self._watchdog.start()
                return True
            stop.wait(next(delays))
        return False

    def _open(self) -> bool:
        self._attempt_at = time.monotonic()
        try:
            self.client.connect_to_new_endpoint(force=True)
            return True
        except Exception as e:
            code = slack_error_code(e) if isinstance(e, SlackApiError) else type(e).__name__
            if code in FATAL_AUTH_ERRORS:
                self.on_auth_failed("SLACK_APP_TOKEN", code)
                self._stop.set()
            else:
                log_event(logging.WARNING, "slack_reconnect_failed", error=code)
            return False

    def _watch(self) -> None:
        """socket-watchdog: twice a second, is the connection alive? If not, replace it."""
        delays = backoff_delays()
        retry_at = 0.0
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if self.health.connected:
                silent = time.time() - max(self._alive_at, self._last_pong())
                if not self.client.is_connected() or silent > DEAD_AFTER_SECONDS:
                    self._lost(
                        "slack_connection_dead"
                        if self.client.is_connected()
                        else "slack_disconnected",
                        silent_s=round(silent, 1),
                    )
                    retry_at = now
                else:
                    delays = backoff_delays()
                continue
            in_flight = self.client.connect_operation_lock.locked()
            if in_flight or now < retry_at or now - self._attempt_at < HELLO_WAIT_SECONDS:
                continue  # a connect is running, backing off, or waiting for its hello
            with contextlib.suppress(Exception):
                self.client.disconnect()  # a session that never said hello is not kept
            if not self._open():
                wait = next(delays)
                retry_at = now + wait
                log_event(logging.INFO, "slack_reconnect_scheduled", retry_in_s=round(wait, 1))

    def _last_pong(self) -> float:
        session = self.client.current_session
        return (
            (getattr(session, "last_ping_pong_time", None) or 0.0) if session is not None else 0.0
        )

    def _lost(self, event: str, **fields: Any) -> None:
        if self.health.connected:
            self._set_connected(False)
            log_event(logging.WARNING, event, **fields)
        with contextlib.suppress(Exception):
            self.client.disconnect()

    # -- frames -------------------------------------------------------------------------------

    def on_frame(self, raw: str) -> None:
        """Runs on the socket's reader thread for every frame: must be cheap and never raise.
        Envelopes go to Acks first; ``hello`` and ``disconnect`` move the connection state."""
        now = time.monotonic()
        self._alive_at = time.time()
        try:
            frame = json.loads(raw)
            if not isinstance(frame, dict):
                return
            self.acks.ack(frame, now)
            kind = frame.get("type")
            if kind == "hello":
                self._hellos += 1
                if self._hellos > 1:
                    self.metrics.socket_reconnects.inc()
                self._set_connected(True)
                self._no_delay()
                log_event(logging.INFO, "slack_connected", connections=self._hellos)
            elif kind == "disconnect":
                self._attempt_at = time.monotonic()  # slack_sdk reconnects on this frame itself
                self._set_connected(False)
                log_event(logging.INFO, "slack_disconnect_requested", reason=frame.get("reason"))
        except Exception:
            log.debug("frame_inspect_failed", exc_info=True)

    def _no_delay(self) -> None:
        """TCP_NODELAY on the socket (slack_sdk sets it only behind a proxy): each ack is one
        small write, and Nagle would hold it until Slack ACKs the previous one."""
        sock = getattr(self.client.current_session, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_close(self, code: int, reason: str | None = None) -> None:
        if self.health.connected:
            self._set_connected(False)
            log_event(logging.INFO, "slack_socket_closed", code=code)

    def _set_connected(self, value: bool) -> None:
        if value:
            self.health.ready()
        else:
            self.health.waiting()
        self.metrics.socket_connected.set(1 if value else 0)

    def problem(self) -> str | None:
        if self._hellos and not self.client.message_processor.is_alive():
            return "Socket Mode message processor thread died"
        return None

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket at once (Slack then sends events to other connections); slack_sdk's
        own close() joins its timer threads for 2-3 s, so it runs in the background."""
        self._stop.set()
        self._set_connected(False)
        sock = getattr(self.client.current_session, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv()
        closer = threading.Thread(target=self.client.close, name="socket-close", daemon=True)
        closer.start()
        deadline = time.monotonic() + 3.5
        while self.client.is_connected() and closer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._watchdog is not None:
            self._watchdog.join(2)


# ════════════════════════════════════════════════════════════════════════════════════════
# 16. Terminal: --check, --ask, --eval
# ════════════════════════════════════════════════════════════════════════════════════════
# The same prompt, retrieval, model call and sources as in Slack, without Slack: how a
# knowledge curator checks a document change, how a newcomer tries the bot, and the gate
# before merging a prompt or knowledge change.

TERMINAL_ME = BotIdentity(user_id="ULEDGERBOT", bot_id="", team_id="")


def terminal_question(text: str) -> Question:
    return Question(
        event_id="terminal",
        kind="dm",
        channel="terminal",
        user="you",
        team="",
        text=clean_text(text),
        ts="1.0",
        thread_ts="1.0",
        in_thread=False,
    )


@dataclasses.dataclass
class ModelAnswer:
    """What the model said through the pipeline: text, cited sections, tokens, time."""

    text: str
    cited: list[Section]
    usage: Usage
    seconds: float
    failure: LLMFailure | None = None


def answer_in_terminal(
    gateway: GatewaySettings,
    messages: list[dict],
    choice: KnowledgeChoice,
    write: Callable[[str], Any] = lambda text: None,
    tools: ToolSession | None = None,
) -> ModelAnswer:
    """Stream one answer through the gateway (and ``tools``), writing what a person would see
    as it arrives."""
    started, usage, text, shown = time.monotonic(), Usage(), AnswerText(), []
    count = token_counter(gateway.ledger_bot_model)
    budget = PromptBudget.for_model(gateway.ledger_bot_model)
    failure = None
    try:
        for chunk in converse(
            gateway,
            messages,
            usage,
            tools=tools,
            budget=budget.with_tools(count),
            count=count,
            user=gateway_user(gateway.litellm_developer_key, "", "you"),
        ):
            out = text.feed(chunk)
            shown.append(out)
            write(out)
    except LLMFailure as e:
        failure = e
    rest, labels = text.end()
    write(rest)
    shown.append(rest)
    cited = cited_sections(choice, labels) + (tools.cited(labels) if tools else [])
    return ModelAnswer("".join(shown), cited, usage, time.monotonic() - started, failure)


def terminal_index(settings: KnowledgeSettings, err: Any) -> RepoIndex | None:
    """The repository index for a terminal mode, built now; None (and why, on ``err``)
    without LEDGER_BOT_REPO or when it cannot be indexed."""
    if settings.repo_path is None:
        return None
    try:
        index = RepoIndex.build(settings.repo_path, settings.ledger_bot_repo_url)
    except (OSError, sqlite3.Error, RetrievalUnavailable) as e:
        print(f"ledger-bot: LEDGER_BOT_REPO cannot be indexed ({e}); no repository tools", file=err)
        return None
    if not index.paths:
        print(f"ledger-bot: LEDGER_BOT_REPO {settings.repo_path} holds no text files", file=err)
        return None
    return index


def run_ask(gateway: GatewaySettings, question: str, out: Any, err: Any = sys.stderr) -> int:
    """``--ask``: one question answered in the terminal, each tool call on a line of its own;
    exit 0, or 1 if the gateway failed."""
    kb = KnowledgeBase(load_knowledge(gateway.knowledge_path))
    index = terminal_index(gateway, err)
    model = gateway.ledger_bot_model
    try:
        messages, choice = build_prompt(
            kb,
            terminal_question(question),
            [],
            TERMINAL_ME,
            token_counter(model),
            PromptBudget.for_model(model),
            tools=index is not None,
        )
    except QuestionTooLong:
        print(OUTCOMES["context_too_long"].notice, file=out)
        return 1

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    def show(step: ToolStep) -> None:
        write(f"\n[{step.title} …" if step.status == "in_progress" else f" {step.output}]\n")

    tools = ToolSession(index, show) if index else None
    result = answer_in_terminal(gateway, messages, choice, write, tools)
    out.write("\n")
    if result.cited:
        out.write(
            "\nSources: "
            + "; ".join(s.label + (f" <{s.url}>" if s.url else "") for s in result.cited)
            + "\n"
        )
    if result.failure is not None:
        print(f"\n{OUTCOMES[result.failure.kind].notice} [{result.failure.kind}]", file=out)
        return 1
    return 0


class EvalQuestion(msgspec.Struct, forbid_unknown_fields=True):
    """One golden question: what a person asks (after ``thread``, their earlier messages in
    the thread, oldest first), the section labels that answer it ([] = the knowledge cannot,
    and the answer must cite nothing), and facts a right answer contains or must not. A
    repository question names instead the ``tool`` (and ``tool_args``) that should find its
    ``expect_files``: offline that call is ranked, online the answer must call a tool and
    cite one of the files."""

    id: str
    question: str
    thread: list[str] = []
    expect_sections: list[str] = []
    must_contain: list[str] = []
    must_not_contain: list[str] = []
    tool: str = ""
    tool_args: dict[str, Any] = {}
    expect_files: list[str] = []


class EvalSpec(msgspec.Struct, forbid_unknown_fields=True):
    """An eval file (YAML or JSON): the questions, the knowledge folder (relative to the file;
    default: LEDGER_BOT_KNOWLEDGE), the knowledge budget in tokens (default: the model's, as in
    production; a small one measures retrieval instead of the whole-prompt path), LEDGER_BOT_*
    settings to evaluate under, ``k`` for the ranked measures, and the floors that fail the run
    (any measure of the summary: ``recall``, ``precision``, ``recall_at_k``, ``mrr``,
    ``ndcg_at_k`` offline; ``answers`` online). ``repo``: the repository checkout the tools
    read (relative to the file; default: LEDGER_BOT_REPO)."""

    questions: list[EvalQuestion]
    knowledge: str = ""
    repo: str = ""
    knowledge_budget: Annotated[int, msgspec.Meta(ge=1)] | None = None
    settings: dict[str, str] = {}
    thresholds: dict[str, float] = {}
    k: Annotated[int, msgspec.Meta(ge=1)] = 5


class EvalError(Exception):
    """The eval file cannot be used; the message says why."""


def load_eval(path: Path) -> EvalSpec:
    try:
        raw = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
        spec = msgspec.convert(data, EvalSpec)
    except (OSError, UnicodeDecodeError, ValueError, msgspec.ValidationError) as e:
        raise EvalError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError, imported lazily
        raise EvalError(f"{path}: invalid YAML: {e}") from None
    bad = sorted(k for k in spec.settings if not k.startswith("LEDGER_BOT_"))
    if bad:
        raise EvalError(
            f"{path}: settings may only name LEDGER_BOT_* variables, not {', '.join(bad)}"
        )
    unknown = sorted({q.tool for q in spec.questions if q.tool} - TOOLS.keys())
    if unknown:
        raise EvalError(
            f"{path}: no such tool: {', '.join(unknown)}; the tools are {', '.join(TOOLS)}"
        )
    return spec


def retrieval_scores(
    expected: list[str], retrieved: tuple[str, ...]
) -> tuple[float | None, float | None]:
    """Recall and precision of the sections that reached the prompt (None where undefined: a
    question the knowledge does not cover has no recall)."""
    hits = len(set(expected) & set(retrieved))
    recall = hits / len(expected) if expected else None
    precision = hits / len(retrieved) if expected and retrieved else (0.0 if expected else None)
    return recall, precision


def ranked_scores(expected: list[str], ranked: list[str], k: int) -> dict[str, float | None]:
    """How well the retrieval ranking ``ranked`` (best first) puts the ``expected`` labels on
    top, with binary relevance: recall@k (the share of them in the first k), the reciprocal
    rank of the first one (0 if none is ranked), and nDCG@k (1 when they are exactly the first
    ones). All None for a question nothing answers."""
    if not expected:
        return {"recall_at_k": None, "mrr": None, "ndcg_at_k": None}
    relevant = set(expected)
    first = next((i for i, label in enumerate(ranked, 1) if label in relevant), None)
    dcg = sum(1 / math.log2(i + 1) for i, label in enumerate(ranked[:k], 1) if label in relevant)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return {
        "recall_at_k": len(relevant & set(ranked[:k])) / len(relevant),
        "mrr": 1 / first if first else 0.0,
        "ndcg_at_k": dcg / ideal,
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def eval_thread(messages: list[str]) -> list[dict]:
    """A golden question's earlier messages as the Slack thread they stand for (before the
    terminal question's ts)."""
    return [{"user": "you", "text": text, "ts": f"0.{i:06d}"} for i, text in enumerate(messages, 1)]


RANKED_MEASURES = ("recall_at_k", "mrr", "ndcg_at_k")


def run_eval(
    settings: KnowledgeSettings,
    spec: EvalSpec,
    spec_path: Path,
    *,
    report: Path | None,
    out: Any,
) -> int:
    """``--eval``: per question, how the retrieval ranks the expected sections (recall@k, MRR,
    nDCG@k) and which reach the prompt (recall, precision); online, the answer through the
    gateway too (facts it must and must not contain, cited sections, seconds, cost). Prints a
    table; writes ``report`` as JSON and, beside it, a Markdown summary (``.md``); exit 1 if a
    threshold is missed, 2 if the file names sections the knowledge does not have. Online when
    ``settings`` name a gateway (GatewaySettings)."""
    online = isinstance(settings, GatewaySettings)
    root = (spec_path.parent / spec.knowledge) if spec.knowledge else settings.knowledge_path
    kb = KnowledgeBase(load_knowledge(root))
    if spec.repo:
        settings = msgspec.structs.replace(
            settings, ledger_bot_repo=str(spec_path.parent / spec.repo)
        )
    index = terminal_index(settings, out)
    unknown = sorted(
        {label for q in spec.questions for label in q.expect_sections}
        - {s.label for s in kb.sections}
    ) + sorted(
        {f for q in spec.questions for f in q.expect_files}
        - (index.paths.keys() if index else set())
    )
    if unknown or (index is None and any(q.tool for q in spec.questions)):
        where = f"{root}" + (f" or {settings.repo_path}" if settings.repo_path else "")
        print(
            f"eval: {len(unknown)} expected section(s) or file(s) not in {where}: "
            + "; ".join(unknown)
            if unknown
            else "eval: the questions need a repository (repo: in the file, or LEDGER_BOT_REPO)",
            file=out,
        )
        return EXIT_CONFIG
    model = settings.ledger_bot_model
    count = token_counter(model)
    budget = PromptBudget.for_model(model)
    if spec.knowledge_budget is not None:
        budget = dataclasses.replace(budget, knowledge=spec.knowledge_budget)
    rows: list[dict[str, Any]] = []
    for q in spec.questions:
        thread = eval_thread(q.thread)
        asked = terminal_question(q.question)
        messages, choice = build_prompt(
            kb, asked, thread, TERMINAL_ME, count, budget, tools=index is not None
        )
        if q.tool:
            assert index is not None
            found = run_tool(index, q.tool, json.dumps(q.tool_args))
            ranked = list(dict.fromkeys(path for path, _ in found.files))
        else:
            ranked = [s.label for s in kb.rank(retrieval_query(asked.text, thread))]
        expected = q.expect_files if q.tool else q.expect_sections
        recall, precision = retrieval_scores(q.expect_sections, choice.labels)
        row: dict[str, Any] = {
            "id": q.id,
            "tool": q.tool,
            **ranked_scores(expected, ranked, spec.k),
            "recall": recall,
            "precision": precision,
            "whole": choice.whole,
            "ranked": ranked[: spec.k],
            "retrieved": list(choice.labels),
            "expected": expected,
        }
        if isinstance(settings, GatewaySettings):
            row.update(_answer_checks(settings, q, messages, choice, index))
        rows.append(row)
    summary = _eval_summary(budget, spec, rows, online)
    _print_eval(rows, summary, spec.k, online, out)
    if report is not None:
        report.write_text(
            json.dumps({"summary": summary, "questions": rows}, indent=2) + "\n", encoding="utf-8"
        )
        report.with_suffix(".md").write_text(
            eval_markdown(rows, summary, spec.k, online), encoding="utf-8"
        )
    missed = [
        f"{name} {summary.get(name)} < {floor}"
        for name, floor in spec.thresholds.items()
        if name in summary and summary[name] is not None and summary[name] < floor
    ]
    for line in missed:
        print(f"eval: below threshold: {line}", file=out)
    return 1 if missed else 0


def _answer_checks(
    gateway: GatewaySettings,
    q: EvalQuestion,
    messages: list[dict],
    choice: KnowledgeChoice,
    index: RepoIndex | None,
) -> dict[str, Any]:
    """One golden question answered through the gateway (with the tools, given an ``index``)
    and checked: the must / must-not facts, and citations (only expected sections; none at
    all where the knowledge cannot answer; for a repository question, a tool call and one of
    its expected files)."""
    tools = ToolSession(index, lambda step: None) if index else None
    result = answer_in_terminal(gateway, messages, choice, tools=tools)
    lowered = result.text.lower()
    cited = [s.label for s in result.cited]
    files = set(q.expect_files)
    checks: dict[str, Any] = {
        "missing": [m for m in q.must_contain if m.lower() not in lowered],
        "forbidden": [m for m in q.must_not_contain if m.lower() in lowered],
        "cited": cited,
        "cited_unexpected": [] if q.tool else [c for c in cited if c not in q.expect_sections],
        "tool_calls": tools.calls if tools else 0,
        "cited_expected_file": bool(files & set(cited)) if q.tool else None,
        "seconds": round(result.seconds, 2),
        "cost_usd": round(cost_usd(gateway.ledger_bot_model, result.usage), 6),
        "failure": result.failure.kind if result.failure else None,
    }
    checks["passed"] = not (
        checks["missing"] or checks["forbidden"] or checks["cited_unexpected"] or checks["failure"]
    ) and (not q.tool or (checks["tool_calls"] > 0 and checks["cited_expected_file"]))
    return checks


def _eval_summary(
    budget: PromptBudget, spec: EvalSpec, rows: list[dict[str, Any]], online: bool
) -> dict[str, Any]:
    covered = [r for r in rows if r["expected"]]
    summary: dict[str, Any] = {
        "questions": len(rows),
        "covered": sum(1 for r in covered if not r["tool"]),
        "repository": sum(1 for r in rows if r["tool"]),
        "k": spec.k,
        "knowledge_budget_tokens": budget.knowledge,
        "whole_knowledge": all(r["whole"] for r in rows),
        **{name: _mean([r[name] for r in rows]) for name in RANKED_MEASURES},
        "recall": _mean([r["recall"] for r in rows]),
        "precision": _mean([r["precision"] for r in rows]),
        "all_expected_retrieved": sum(1 for r in rows if r["recall"] == 1.0),
        "top_k_misses": [r["id"] for r in covered if not r["recall_at_k"]],
        "tools": {
            tool: {
                "questions": len(mine),
                **{name: _mean([r[name] for r in mine]) for name in RANKED_MEASURES},
            }
            for tool in dict.fromkeys(r["tool"] for r in rows if r["tool"])
            if (mine := [r for r in rows if r["tool"] == tool])
        },
    }
    if online:
        seconds = sorted(r["seconds"] for r in rows)
        summary.update(
            {
                "answers": sum(r["passed"] for r in rows) / len(rows) if rows else None,
                "cost_usd": round(sum(r["cost_usd"] for r in rows), 6),
                "seconds_p50": seconds[len(seconds) // 2] if seconds else None,
            }
        )
    return summary


def _num(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.2f}"


def _print_eval(
    rows: list[dict[str, Any]], summary: dict[str, Any], k: int, online: bool, out: Any
) -> None:
    width = max([len(r["id"]) for r in rows] + [8])
    repository = f"; {summary['repository']} repository questions" if summary["repository"] else ""
    head = f"{'question':<{width}}  recall@{k}   MRR  nDCG@{k}  recall  precision  sections" + (
        "  answer  seconds  cost_usd" if online else ""
    )
    print(head, file=out)
    for r in rows:
        line = (
            f"{r['id']:<{width}}  {_num(r['recall_at_k'])}   {_num(r['mrr'])}  "
            f"{_num(r['ndcg_at_k'])}   {_num(r['recall'])}   {_num(r['precision'])}      "
            f"{len(r['retrieved']):>4}"
        )
        if online:
            verdict = "pass" if r["passed"] else "FAIL"
            line += f"  {verdict:>6}  {r['seconds']:7.2f}  {r['cost_usd']:8.4f}"
        print(line, file=out)
    print(
        f"{'overall':<{width}}  {_num(summary['recall_at_k'])}   {_num(summary['mrr'])}  "
        f"{_num(summary['ndcg_at_k'])}   {_num(summary['recall'])}   "
        f"{_num(summary['precision'])}   (all expected sections in the prompt for "
        f"{summary['all_expected_retrieved']} of {summary['covered']} covered questions; "
        f"knowledge budget {summary['knowledge_budget_tokens']} tokens"
        f"{', whole knowledge in every prompt' if summary['whole_knowledge'] else ''}"
        f"{repository})",
        file=out,
    )
    for tool, measures in summary["tools"].items():
        print(
            f"{tool:<{width}}  {_num(measures['recall_at_k'])}   {_num(measures['mrr'])}  "
            f"{_num(measures['ndcg_at_k'])}   ({measures['questions']} questions)",
            file=out,
        )
    if online:
        print(
            f"answers passing: {summary['answers']:.2f}; cost {summary['cost_usd']} USD; "
            f"p50 {summary['seconds_p50']} s",
            file=out,
        )


def eval_markdown(rows: list[dict[str, Any]], summary: dict[str, Any], k: int, online: bool) -> str:
    """The eval as a reviewer reads it in a pull request: the summary, then one row per
    question (with what an online answer missed, and what it cited that it should not)."""
    lines = [
        "# ledger-bot eval",
        "",
        f"{summary['questions']} questions ({summary['covered']} the knowledge answers); "
        f"recall@{k} {_num(summary['recall_at_k']).strip()}, "
        f"MRR {_num(summary['mrr']).strip()}, nDCG@{k} {_num(summary['ndcg_at_k']).strip()}; "
        f"prompt recall {_num(summary['recall']).strip()}, "
        f"precision {_num(summary['precision']).strip()}.",
    ]
    if online:
        lines.append(
            f"Answers passing: {summary['answers']:.2f}; cost {summary['cost_usd']} USD; "
            f"p50 {summary['seconds_p50']} s."
        )
    if summary["tools"]:
        lines += [
            "",
            f"| tool | questions | recall@{k} | MRR | nDCG@{k} |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{tool}` | {m['questions']} | "
            + " | ".join(_num(m[name]).strip() for name in RANKED_MEASURES)
            + " |"
            for tool, m in summary["tools"].items()
        ]
    head = ["question", f"recall@{k}", "MRR", f"nDCG@{k}", "recall", "precision"]
    if online:
        head += ["answer", "missing", "cited unexpectedly", "seconds", "cost (USD)"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['id']}`"] + [
            _num(r[m]).strip() for m in (*RANKED_MEASURES, "recall", "precision")
        ]
        if online:
            failure = f" ({r['failure']})" if r["failure"] else ""
            cells += [
                "pass" if r["passed"] else f"**FAIL**{failure}",
                ", ".join(r["missing"]),
                "; ".join(r["cited_unexpected"]),
                f"{r['seconds']:.2f}",
                f"{r['cost_usd']:.4f}",
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_check(config: Config, out: Any) -> int:
    """``--check``: Slack auth.test and one tiny gateway call; a PASS/FAIL report, exit 0/1."""
    ok = True

    def report(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {redact(detail)}", file=out)

    report("config", True, "all variables valid")
    metrics = Metrics(prometheus_client.CollectorRegistry(), tuple(OUTCOMES))
    api = SlackApi(
        make_web_client(config.slack_bot_token, config.slack_api_url), RateBudget({}), metrics
    )
    try:
        me = api.auth_test()
        report("slack auth.test", True, f"bot user {me.user_id} in team {me.team_id}")
    except SlackAuthFailed as e:
        report("slack auth.test", False, f"Slack refused the bot token ({e.code})")
    except SlackError as e:
        reason = (
            f"Slack said {e.code}"
            if not e.code[:1].isupper()
            else f"could not reach Slack at {config.slack_api_url} ({e.code})"
        )
        report("slack auth.test", False, reason)
    try:
        text = "".join(
            stream_completion(
                config, [{"role": "user", "content": "Reply with the single word OK."}], Usage()
            )
        )
        report("llm gateway", True, f"model {config.ledger_bot_model} answered ({len(text)} chars)")
    except LLMFailure as e:
        report(
            "llm gateway",
            False,
            f"model {config.ledger_bot_model} at {config.litellm_base_url}: {e.kind} ({e.detail})",
        )
    if config.repo_path is not None:
        err = io.StringIO()
        index = terminal_index(config, err)
        report(
            "repository",
            index is not None,
            f"{len(index.paths)} files indexed at commit {index.commit or 'unknown'}"
            if index
            else err.getvalue().strip().removeprefix("ledger-bot: "),
        )
    print("RESULT: " + ("PASS" if ok else "FAIL"), file=out)
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ledger_bot.py",
        description="ledger-bot: the BOR Write team's Slack assistant. "
        "Configuration comes from the environment (see README.md).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate configuration, call Slack auth.test and make one tiny gateway call; "
        "exit 0 if all pass, 1 otherwise",
    )
    parser.add_argument(
        "--ask",
        metavar="QUESTION",
        help="answer one question in the terminal through the same prompt, retrieval, model and "
        "sources as in Slack (needs only the LITELLM_* variables)",
    )
    parser.add_argument(
        "--eval",
        metavar="FILE",
        type=Path,
        help="measure retrieval against a golden set (YAML or JSON); offline unless --online",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="with --eval: also answer every question through the gateway and check the answers",
    )
    parser.add_argument(
        "--report", metavar="PATH", type=Path, help="with --eval: write the results as JSON"
    )
    parser.add_argument("--version", action="version", version=f"ledger-bot {__version__}")
    args = parser.parse_args(argv)
    if (args.online or args.report) and not args.eval:
        parser.error("--online and --report go with --eval")
    return args


# ════════════════════════════════════════════════════════════════════════════════════════
# 17. Lifecycle
# ════════════════════════════════════════════════════════════════════════════════════════


class WorkerPool:
    """A fixed set of worker threads over a bounded queue.

    ``submit`` never blocks: it returns False when the queue is full so the caller can say
    "busy". ``drain`` waits for queued and running jobs until a deadline; ``take_queued``
    empties the queue (shutdown tells those people to ask again); ``close`` stops the threads.
    """

    def __init__(
        self, handler: Callable[[Job], Any], workers: int, queue_size: int, metrics: Metrics
    ):
        self.handler = handler
        self.metrics = metrics
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._busy_since: dict[str, float] = {}  # worker thread name -> when it took its job
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.threads = [
            threading.Thread(target=self._run, name=f"answer-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            return False
        self.metrics.queue_depth.set(self.queue.qsize())
        return True

    def _run(self) -> None:
        name = threading.current_thread().name
        while (job := self.queue.get()) is not None:
            self.metrics.queue_depth.set(self.queue.qsize())
            with self._lock:
                self._busy_since[name] = time.monotonic()
                self.metrics.workers_busy.set(self.busy)
            try:
                self.handler(job)
            except Exception:
                log.exception("worker_job_crashed")
            finally:
                with self._lock:
                    self._busy_since.pop(name, None)
                    self.metrics.workers_busy.set(self.busy)
                    self._idle.notify_all()

    @property
    def busy(self) -> int:
        """Workers answering a question right now."""
        return len(self._busy_since)

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

    def take_queued(self) -> list[Job]:
        """Everything still waiting for a worker, removed from the queue."""
        jobs = []
        with contextlib.suppress(queue.Empty):
            while True:
                job = self.queue.get_nowait()
                if job is not None:
                    jobs.append(job)
        self.metrics.queue_depth.set(0)
        return jobs

    def close(self, timeout: float = 2.0) -> None:
        """Stop every worker once its current job ends (waiting at most ``timeout`` s in all)."""
        for _ in self.threads:
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def problem(self, stuck_after: float) -> str | None:
        """Why the pool is unhealthy (a dead or wedged worker), or None."""
        dead = [t.name for t in self.threads if not t.is_alive()]
        if dead:
            return f"worker threads died: {', '.join(dead)}"
        now = time.monotonic()
        with self._lock:
            stuck = [n for n, since in self._busy_since.items() if now - since > stuck_after]
        return (
            f"workers stuck on one question for over {stuck_after:.0f}s: {', '.join(stuck)}"
            if stuck
            else None
        )


class Bot:
    """Everything that runs once the bot knows who it is: the Socket Mode link, the dispatcher,
    the worker pool, the notices threads and the answerer, each given the settings it uses;
    ``shutdown`` stops them all."""

    def __init__(
        self,
        config: Config,
        slack: Slack,
        me: BotIdentity,
        health: Health,
        knowledge: KnowledgeStore,
        metrics: Metrics,
        on_auth_failed: Callable[[str, str], None],
        repo: RepoStore | None = None,
    ):
        self.health = health
        self.notifier = Notifier()
        limits = Limits(
            rate_limit=config.ledger_bot_user_rate_limit,
            daily_budget_usd=config.ledger_bot_daily_budget_usd,
            user_daily_budget_usd=config.ledger_bot_user_daily_budget_usd,
        )
        self.notices = Notices(slack, Recorder(metrics))
        self.answerer = Answerer(
            slack,
            me,
            knowledge,
            limits,
            self.notices,
            self.notifier,
            config,
            streaming=config.ledger_bot_streaming,
            feedback=config.ledger_bot_feedback,
            follow_ups=config.ledger_bot_follow_ups,
            llm_client=make_llm_client(config),
            repo=repo,
        )
        self.pool = WorkerPool(
            self.answerer.answer, config.ledger_bot_workers, config.ledger_bot_queue_size, metrics
        )
        intake = Intake(
            self.pool.submit,
            self.notices,
            self.notifier,
            metrics,
            allowed_channels=config.ledger_bot_allowed_channels,
            allowed_users=config.ledger_bot_allowed_users,
        )
        interactions = Interactions(
            intake,
            slack.api,
            slack.surfaces,
            self.notifier,
            metrics,
            modal_key=modal_key(config.slack_bot_token),
        )
        prompts = config.suggested_prompts
        self.dispatcher = Dispatcher(
            me,
            intake,
            interactions,
            slack.surfaces,
            self.notifier,
            metrics,
            follow_ups=config.ledger_bot_follow_ups,
            prompts=prompts,
            home=lambda: home_view(
                knowledge.current().sections, prompts=prompts, limits=limits.describe()
            ),
        )
        self.link = SocketLink(
            config.slack_app_token,
            make_web_client(config.slack_bot_token, config.slack_api_url),
            health,
            metrics,
            self._on_request,
            on_auth_failed,
            ack_payload=interactions.ack_payload,
        )
        stuck_after = (
            config.ledger_bot_answer_max_seconds + config.ledger_bot_llm_timeout_seconds + 60
        )
        health.liveness_checks[:] = [lambda: self.pool.problem(stuck_after), self.link.problem]

    def _on_request(self, req: SocketModeRequest, received: float) -> None:
        self.dispatcher.dispatch(
            req.type,
            req.payload or {},
            received,
            envelope_id=req.envelope_id,
            retry_attempt=req.retry_attempt,
        )

    def connect(self, stop: threading.Event) -> bool:
        return self.link.start(stop)

    def shutdown(self, drain_seconds: float) -> bool:
        """Stop taking events, finish in-flight answers within ``drain_seconds``, then end what
        is left with "I'm restarting, please ask again" (outcome ``interrupted``) so no acked
        question goes unanswered; stop every thread. True if everything was answered."""
        self.health.stop()
        self.link.close()
        log_event(logging.INFO, "draining", in_flight=self.pool.pending(), grace_s=drain_seconds)
        drained = self.pool.drain(drain_seconds)
        if not drained:
            queued = self.pool.take_queued()
            interrupted = self.notices.interrupt_open(self.answerer.open)
            for job in queued:
                if job.settle():
                    self.notices.refuse(job, Refusal("interrupted"))
            log_event(logging.ERROR, "drain_timeout", unfinished=interrupted + len(queued))
        self.pool.close()
        self.notifier.close(timeout=5)
        self.answerer.close()
        return drained


# How often the main thread hands freed heap memory back to the OS while the bot runs.
TRIM_EVERY_SECONDS = 30.0
REPO_START_WAIT_SECONDS = 30.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; True if any were released.

    glibc gives each of the many worker threads its own heap arena, and memory freed in the
    middle of an arena stays resident: RSS crept up 5.5-6.1 % over the 10,000-answer soak
    after warm-up while tracemalloc showed the Python heap flat. ``malloc_trim`` gives those
    pages back (4.0-4.6 % with a trim every 5-30 s, no measurable CPU; README, Performance).
    Called by the main thread every TRIM_EVERY_SECONDS while the bot runs.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _warm_litellm(model: str) -> None:
    """litellm-import: import litellm and register the alias, so the first question pays nothing."""
    try:
        t0 = time.monotonic()
        register_alias(model)
        token_counter(model)("warm-up")
        log_event(
            logging.DEBUG, "litellm_imported", latency_ms=round((time.monotonic() - t0) * 1000)
        )
    except Exception:
        log.exception("litellm_import_failed")


class _Fatal:
    """The first reason the bot must exit 1 (a refused token), set from any thread."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.reason: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def __call__(self, token: str, code: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = (token, code)
        hint = (
            "check the secret and that Socket Mode is enabled"
            if token == "SLACK_APP_TOKEN"
            else "check the secret; reinstall the app if the token was revoked"
        )
        log_event(
            logging.ERROR,
            "slack_auth_failed",
            token=token,
            error=code,
            hint=f"{token} was rejected by Slack; {hint}",
        )
        self.stop.set()


def main(
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    registry: prometheus_client.CollectorRegistry | None = None,
) -> int:
    """Run the bot until SIGTERM/SIGINT (or ``stop`` is set); returns the process exit code.

    0: clean shutdown (or --check/--ask/--eval passed); 1: --check failed, Slack rejected a
    token (at start-up or while running), --ask met a gateway failure, or --eval fell below a
    threshold; 2: bad configuration or eval file. Each mode reads only the settings it uses
    (KnowledgeSettings, GatewaySettings, Config).
    """
    args = parse_args(argv)
    env: dict[str, str] | os._Environ[str] = os.environ if environ is None else environ
    spec = None
    kind: type[KnowledgeSettings] = Config
    if args.eval:
        try:
            spec = load_eval(args.eval)
        except EvalError as e:
            print(f"ledger-bot: {e}", file=sys.stderr)
            return EXIT_CONFIG
        env = {**env, **spec.settings}
        kind = GatewaySettings if args.online else KnowledgeSettings
    elif args.ask:
        kind = GatewaySettings
    try:
        settings = load_config(env, kind)
    except ConfigError as e:
        print("ledger-bot: invalid configuration:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        print("See README.md (Configuration) or .env.example.", file=sys.stderr)
        return EXIT_CONFIG
    redact.add_secrets(*(str(getattr(settings, n.lower(), "")) for n in SECRET_ENV_VARS))
    if spec is not None:
        setup_logging("ERROR", "text", sys.stderr)
        return run_eval(settings, spec, args.eval, report=args.report, out=sys.stdout)
    if args.ask:
        setup_logging("ERROR", "text", sys.stderr)
        assert isinstance(settings, GatewaySettings)
        return run_ask(settings, args.ask, sys.stdout)
    assert isinstance(settings, Config)
    if args.check:
        setup_logging("ERROR", "text", sys.stderr)
        return run_check(settings, sys.stdout)
    return _run(settings, stop or threading.Event(), registry)


def _run(
    config: Config, stop: threading.Event, registry: prometheus_client.CollectorRegistry | None
) -> int:
    setup_logging(config.log_level, config.log_format)
    health = Health()

    def on_signal() -> None:
        health.stop()  # /ready is 503 from here on, before the drain begins
        stop.set()

    signals = Signals(on_signal) if threading.current_thread() is threading.main_thread() else None
    if signals is not None:
        signals.install()
    tools = tuple(TOOLS) if config.repo_path else ()  # tool series exist only where tools are on
    metrics = Metrics(registry or new_registry(), tuple(OUTCOMES), tools)
    metrics.build_info.labels(version=__version__, git_sha=config.ledger_bot_git_sha).set(1)
    server = HealthServer(config.health_port, health, metrics).start()
    log_event(
        logging.INFO,
        "starting",
        version=__version__,
        git_sha=config.ledger_bot_git_sha,
        health_port=server.server_address[1],
        model=config.ledger_bot_model,
    )
    warm = threading.Thread(
        target=_warm_litellm, args=(config.ledger_bot_model,), name="litellm-import", daemon=True
    )
    warm.start()
    try:
        return _serve(config, health, metrics, stop, warm)
    finally:
        server.stop()
        if signals is not None:
            signals.close()


def _serve(
    config: Config, health: Health, metrics: Metrics, stop: threading.Event, warm: threading.Thread
) -> int:
    knowledge = KnowledgeStore(config.knowledge_path)
    log_event(
        logging.INFO,
        "knowledge_loaded",
        path=str(config.knowledge_path),
        sections=len(knowledge.current().sections),
    )
    repo = None
    if config.repo_path is not None:
        try:
            check_fts5()
        except RetrievalUnavailable as e:
            log_event(logging.ERROR, "repo_tools_unavailable", error=str(e))
            return EXIT_CONFIG
        repo = RepoStore(config.repo_path, config.ledger_bot_repo_url, metrics)
        repo.start()  # built while litellm imports
    fatal = _Fatal(stop)
    web = make_web_client(config.slack_bot_token, config.slack_api_url)
    api = SlackApi(web, RateBudget(rate_limits(config.ledger_bot_slack_rate_share)), metrics, fatal)
    me = None
    delays = backoff_delays()
    while not stop.is_set() and me is None:
        try:
            me = api.auth_test()
        except SlackAuthFailed:
            return EXIT_SLACK_AUTH
        except SlackError as e:
            wait = next(delays)
            health.waiting(f"Slack Web API unreachable ({e.code}); retrying")
            log_event(logging.WARNING, "slack_unreachable", error=e.code, retry_in_s=round(wait, 1))
            stop.wait(wait)
    if me is None:
        log_event(logging.INFO, "stopped", reason="signal before start-up completed")
        return 0
    health.waiting()
    log_event(logging.INFO, "identity", user=me.user_id, bot_id=me.bot_id, team=me.team_id)
    slack = Slack(api, SlackSurfaces(api), SlackFiles(web))
    bot = Bot(config, slack, me, health, knowledge, metrics, fatal, repo)
    # Slack sends events to any open connection: open one only once answers can start at once,
    # with the first repository index if it is done within REPO_START_WAIT_SECONDS (a slow or
    # missing checkout must not keep the bot from answering from its knowledge).
    index_by = time.monotonic() + REPO_START_WAIT_SECONDS
    while not stop.is_set() and (
        warm.is_alive()
        or (repo is not None and not repo.built.is_set() and time.monotonic() < index_by)
    ):
        if warm.is_alive():
            warm.join(0.1)
        elif repo is not None:
            repo.built.wait(0.1)
    # A full garbage collection walks every tracked object with the interpreter lock held: with
    # litellm's ~380,000 that is ~270 ms in which no envelope is acked. What is alive now is
    # start-up's (modules, litellm's tables); frozen, it is never scanned for cycles again (still
    # freed by reference counting), and collections walk only what answers create.
    gc.freeze()
    connected = bot.connect(stop)
    if connected:
        while not stop.wait(TRIM_EVERY_SECONDS):
            release_free_memory()
        log_event(
            logging.INFO, "stop_requested", reason="slack_auth_failed" if fatal.reason else "signal"
        )
    drained = bot.shutdown(config.drain_seconds if connected else 0)
    log_event(logging.INFO, "stopped", drained=drained)
    return EXIT_SLACK_AUTH if fatal.reason else 0


if __name__ == "__main__":
    sys.exit(main())

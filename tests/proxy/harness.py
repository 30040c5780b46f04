"""The REAL LiteLLM proxy (the version pyproject pins) in front of the project's fake upstream.

The proxy runs as a subprocess, ``python -m litellm.proxy.proxy_cli --config <generated>``, as
the company gateway does, served under ``SERVER_ROOT_PATH=/api/v2`` with the proxy's default
retry settings, and forwards the alias ``bedrock-claude-4.5-sonnet`` to an OpenAI-compatible
upstream: a ``FakeGateway`` (tests/fakes.py) that the tests script. Without a database the
proxy's virtual keys come from tests/proxy/gateway_auth.py (see there); everything a client
sees is produced by the proxy's own code.

Keys: ``BOT_KEY`` (the bot's virtual key, within budget), ``OVER_BUDGET_KEY`` (a virtual key
whose spend has reached its max_budget), ``MASTER_KEY`` (set so that auth is on); any other
key is unknown (401).

Measured with litellm 1.110.2 on the 2-core CI machine: the proxy is ready ~7 s after the
process starts (up to ~20 s under load); one proxy serves the whole session.

Installing the proxy's server dependencies: requirements-proxy.lock (on top of
requirements-dev.lock). ``missing_dependencies()`` tells whether they are there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import SECRETS
from fakes import FakeGateway, Script, free_port, http_get, wait_for
from pytest_httpserver import HTTPServer

HERE = Path(__file__).resolve().parent

ALIAS = "bedrock-claude-4.5-sonnet"
# What the proxy asks the upstream for. The alias itself, because FakeGateway answers 400 to any
# model name it does not serve (it plays the gateway elsewhere); a real upstream would get a
# provider model id here.
UPSTREAM_MODEL = ALIAS
SERVER_ROOT_PATH = "/api/v2"
BOT_KEY = SECRETS["LITELLM_DEVELOPER_KEY"]
OVER_BUDGET_KEY = "sk-ledger-bot-budget-spent"
MASTER_KEY = "sk-proxy-master-not-for-the-bot"
KEYS = {
    BOT_KEY: {"alias": "ledger-bot", "max_budget": 100.0, "spend": 0.0},
    OVER_BUDGET_KEY: {"alias": "ledger-bot-spent", "max_budget": 10.0, "spend": 10.5},
    MASTER_KEY: {"alias": "admin"},
}
# The proxy's router retries a failed upstream call twice by default (num_retries=2: 500,
# 503, 429, 408 and connection errors alike), so one client request makes at most 3 upstream calls.
PROXY_RETRIES = 2

# Import names of what requirements-proxy.in installs (the proxy fails to start without each).
PROXY_MODULES = ("fastapi", "starlette", "uvicorn", "uvloop", "orjson", "backoff", "apscheduler", "redis", "jwt",
                 "cryptography", "multipart", "semver", "expression", "fastapi_sso", "mcp", "soundfile")


def missing_dependencies() -> list[str]:
    return [name for name in PROXY_MODULES if importlib.util.find_spec(name) is None]


# ── the upstream ──────────────────────────────────────────────────────────────────────────


@dataclass
class UpstreamScript(Script):
    """A Script whose error answer carries exactly ``headers`` (FakeGateway always sends
    ``retry-after: 0`` with an error; ``headers={}`` sends none)."""

    headers: dict | None = None


class Upstream(FakeGateway):
    """FakeGateway as the provider behind the proxy (the proxy calls ``<base_url>/chat/completions``)."""

    def __init__(self, server: HTTPServer) -> None:
        super().__init__(server)
        self._current = threading.local()

    def _next(self, body: dict) -> Script:
        script = super()._next(body)
        self._current.script = script
        return script

    def _handle(self, request):
        response = super()._handle(request)
        script = getattr(self._current, "script", None)
        if isinstance(script, UpstreamScript) and script.headers is not None and script.status != 200:
            response.headers.pop("retry-after", None)
            for name, value in script.headers.items():
                response.headers[name] = value
        return response

    def reset(self) -> None:
        """Forget the last test: its requests, scripts and default; release anything still waiting."""
        waiting, self.shutdown = self.shutdown, threading.Event()
        waiting.set()
        with self._lock:
            self.requests.clear()
            self.scripts.clear()
        self.default = lambda body: Script()


def upstream_error(status: int, message: str, *, type_: str, code: str | int | None = None,
                   headers: dict | None = None) -> UpstreamScript:
    """An OpenAI-style error answer from the upstream."""
    return UpstreamScript(status=status, headers=headers,
                          error_body={"error": {"message": message, "type": type_, "param": None,
                                                "code": code if code is not None else status}})


# What OpenAI answers for a prompt over the context window; LiteLLM maps it to
# ContextWindowExceededError (so does Anthropic's "prompt is too long: N tokens > M maximum").
CONTEXT_EXCEEDED = upstream_error(
    400, "This model's maximum context length is 200000 tokens. However, your messages resulted in 250000 tokens.",
    type_="invalid_request_error", code="context_length_exceeded", headers={})


# ── the proxy ─────────────────────────────────────────────────────────────────────────────


def proxy_config(upstream_base: str) -> dict:
    return {
        "model_list": [{
            "model_name": ALIAS,
            "litellm_params": {
                "model": f"openai/{UPSTREAM_MODEL}",
                "api_base": upstream_base,
                "api_key": "upstream-provider-key",
                # A priced model: the proxy skips every budget check for a zero-cost model.
                "input_cost_per_token": 3e-06,
                "output_cost_per_token": 1.5e-05,
            },
        }],
        "general_settings": {
            "master_key": MASTER_KEY,
            "custom_auth": "gateway_auth.user_api_key_auth",
        },
        "litellm_settings": {"callbacks": ["gateway_auth.request_log"]},
    }


@dataclass
class RealProxy:
    process: subprocess.Popen
    port: int
    upstream: Upstream
    workdir: Path
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """What the bot's LITELLM_BASE_URL is set to."""
        return self.url + SERVER_ROOT_PATH

    @property
    def log_path(self) -> Path:
        return self.workdir / "proxy.log"

    @property
    def request_log_path(self) -> Path:
        return self.workdir / "requests.jsonl"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def request_log(self) -> list[dict]:
        """What the proxy's spend tracking recorded, one entry per finished request."""
        try:
            text = self.request_log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def reset(self) -> None:
        self.upstream.reset()
        self.request_log_path.unlink(missing_ok=True)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the LiteLLM proxy exited with {self.process.returncode}:\n{self.log_tail()}")
        return http_get(self.api_base + "/health/readiness")[0] == 200

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_proxy(upstream: Upstream, workdir: Path, timeout: float = 90, *,
                keepalive_seconds: int | None = None) -> RealProxy:
    """Start the proxy in front of ``upstream`` and return once its readiness probe answers 200.
    ``keepalive_seconds``: uvicorn's idle keep-alive timeout (the proxy's --keepalive_timeout;
    uvicorn's default is 5 s)."""
    import yaml

    config = workdir / "proxy_config.yaml"
    config.write_text(yaml.safe_dump(proxy_config(upstream.base_url), sort_keys=False))
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(workdir)),
        "SERVER_ROOT_PATH": SERVER_ROOT_PATH,
        "PYTHONPATH": str(HERE),  # gateway_auth
        "LEDGER_PROXY_KEYS": json.dumps(KEYS),
        "LEDGER_PROXY_REQUEST_LOG": str(workdir / "requests.jsonl"),
        # Offline: no model cost map download (it retries for ~7 s without a network), no telemetry.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    log = open(workdir / "proxy.log", "wb")
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--host", "127.0.0.1",
         "--port", str(port),
         *(["--keepalive_timeout", str(keepalive_seconds)] if keepalive_seconds is not None else [])],
        env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proxy = RealProxy(process, port, upstream, workdir)
    try:
        wait_for(proxy.ready, timeout, f"the LiteLLM proxy's readiness probe (log: {proxy.log_path})")
    except BaseException:
        proxy.stop()
        raise
    proxy.startup_seconds = time.monotonic() - started
    return proxy


def session_proxy():
    """Generator behind the session fixture: upstream server, proxy, teardown."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    upstream = Upstream(server)
    with tempfile.TemporaryDirectory(prefix="ledger-proxy-") as tmp:
        proxy = start_proxy(upstream, Path(tmp))
        try:
            yield proxy
        finally:
            upstream.shutdown.set()
            proxy.stop()
            server.clear()
            server.stop()

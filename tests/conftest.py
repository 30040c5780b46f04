"""Fixtures: the three fakes, a valid environment pointing at them, and ways to run the bot
the way users do (in-process through ``ledger_bot.main`` and as a subprocess)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fakes import FakeGateway, FakeSlack, FakeSocketMode, free_port, http_get, wait_for
from pytest_httpserver import HTTPServer

# The fakes' own servers log every request; only the bot's lines are worth reading in a failure.
for _noisy in ("werkzeug", "websockets"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Secrets used by every test: distinctive, so a leak is easy to spot in any output.
SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-1111-2222-SECRETBOTTOKEN",
    "SLACK_APP_TOKEN": "xapp-1-A111-3333-SECRETAPPTOKEN",
    "LITELLM_DEVELOPER_KEY": "sk-litellm-SECRETGATEWAYKEY",
}


@pytest.fixture
def socket_mode():
    fake = FakeSocketMode()
    yield fake
    fake.close()


class QuickHTTPServer(HTTPServer):
    """pytest-httpserver's server, stopping in a few milliseconds instead of half a second
    (werkzeug polls for shutdown every 0.5 s by default; two servers per test add up)."""

    def thread_target(self) -> None:
        self.server.serve_forever(poll_interval=0.02)


def _http_server():
    server = QuickHTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    return server


@pytest.fixture
def slack(socket_mode):
    server = _http_server()
    fake = FakeSlack(server, socket_mode)
    yield fake
    server.clear()
    server.stop()


@pytest.fixture
def gateway():
    server = _http_server()
    fake = FakeGateway(server, keys=frozenset({SECRETS["LITELLM_DEVELOPER_KEY"]}))
    yield fake
    fake.shutdown.set()
    server.clear()
    server.stop()


@pytest.fixture
def env(slack, gateway):
    return {
        **SECRETS,
        "LITELLM_BASE_URL": gateway.base_url,
        "SLACK_API_URL": slack.api_url,
        "HEALTH_PORT": str(free_port()),
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        # Long enough that answers tests hold on purpose never time out on a busy machine;
        # the timeout tests set their own.
        "LEDGER_BOT_LLM_TIMEOUT_SECONDS": "30",
        "LEDGER_BOT_SHUTDOWN_GRACE_SECONDS": "10",
        "LEDGER_BOT_USER_RATE_LIMIT": "0",  # tests ask many questions as one user; limits have their own tests
        "LEDGER_BOT_KNOWLEDGE": str(ROOT / "knowledge"),
    }


@pytest.fixture
def tune(monkeypatch):
    """Set ledger_bot's named constants for one test (what used to be settings nobody turns):
    ``tune(STREAM_FLUSH_CHARS=20)``; ``tune(SLACK_RATE_TIERS={"chat.startStream": 8})`` sets
    table entries. In-process bots only (start_bot): a subprocess has its own module."""
    import ledger_bot

    def tune(**constants) -> None:
        for name, value in constants.items():
            current = getattr(ledger_bot, name)  # AttributeError for a name that is not there
            if isinstance(current, dict):
                for key, item in value.items():
                    assert key in current, f"{name} has no entry {key}"
                    monkeypatch.setitem(current, key, item)
            else:
                monkeypatch.setattr(ledger_bot, name, value)

    return tune


@dataclass
class RunningBot:
    env: dict
    thread: threading.Thread
    stop_event: threading.Event
    result: dict = field(default_factory=dict)

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.env['HEALTH_PORT']}"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.health_url + path)

    def wait_ready(self, timeout: float = 60) -> None:
        # The socket opens only once litellm is imported (~4 s idle, far longer on a loaded
        # machine): a condition, so a generous bound costs nothing when the machine is idle.
        def ready() -> bool:
            assert self.thread.is_alive(), f"bot exited with {self.result.get('exit')} before it was ready"
            return self.get("/ready")[0] == 200

        wait_for(ready, timeout, "/ready 200")

    def stop(self, timeout: float = 30) -> int:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "bot did not stop"
        return self.result["exit"]


@pytest.fixture
def start_bot(env, socket_mode, request):
    """Start ``ledger_bot.main`` in a thread with ``env`` (plus overrides); stops at teardown.
    The output capture is set up first, so the bots stop (and log their last lines) before its
    stream closes."""
    import ledger_bot

    request.getfixturevalue("capfd" if "capfd" in request.fixturenames else "capsys")

    bots: list[RunningBot] = []

    def start(wait_ready: bool = True, **overrides: str) -> RunningBot:
        bot_env = {**env, **overrides}
        stop = threading.Event()
        result: dict = {}

        def run() -> None:
            result["exit"] = ledger_bot.main([], environ=bot_env, stop=stop)

        thread = threading.Thread(target=run, name="bot-main", daemon=True)
        bot = RunningBot(bot_env, thread, stop, result)
        thread.start()
        bots.append(bot)
        if wait_ready:
            bot.wait_ready()
        return bot

    yield start
    for bot in bots:
        if bot.thread.is_alive():
            bot.stop()
    gc.unfreeze()  # main() froze everything alive, this suite's objects too: let them be collected


@dataclass
class BotProcess:
    """A bot subprocess whose stdout and stderr are read as they come (a pipe nobody reads
    fills at 64 KB and stops the bot at its next log line, DEBUG lines fill it quickly)."""

    proc: subprocess.Popen
    env: dict
    _out: list = field(default_factory=list)
    _err: list = field(default_factory=list)
    _readers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, sink in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            reader = threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True)
            reader.start()
            self._readers.append(reader)

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.env['HEALTH_PORT']}"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.health_url + path)

    def terminate(self, timeout: float = 30) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout)
        return self.proc.returncode, "".join(self._out), "".join(self._err)


def run_subprocess(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    """``python ledger_bot.py ARGS`` exactly as users run it, with only ``env`` (plus PATH)."""
    full_env = {"PATH": os.environ.get("PATH", ""), **env}
    return subprocess.Popen([sys.executable, str(ROOT / "ledger_bot.py"), *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def spawn_bot(env):
    procs: list[BotProcess] = []

    def spawn(*args: str, **overrides: str) -> BotProcess:
        bot = BotProcess(run_subprocess(list(args), {**env, **overrides}), {**env, **overrides})
        procs.append(bot)
        return bot

    yield spawn
    for bot in procs:
        if bot.proc.poll() is None:
            bot.proc.kill()
            bot.proc.wait()

"""Benchmark ledger-bot under load, against a Bolt baseline shaped like the prototype.

    .venv/bin/python tests/bench/run.py --quick     # ~6 min: 1 round; production: start-up + cpu only
    .venv/bin/python tests/bench/run.py             # 3 rounds per transport, 10,000-answer soak in round 1
    .venv/bin/python tests/bench/run.py --transport production --rounds 1 --soak 300   # production, all
    .venv/bin/python tests/bench/run.py --transport loopback --only load,soak   # a regression check
    .venv/bin/python tests/bench/tls_check.py       # which HTTP clients honour SSL_CERT_FILE

Each round starts ``python ledger_bot.py`` (as users run it; LOG_LEVEL=WARNING) and
tests/bench/baseline_bot.py as subprocesses against local fakes (tests/fakes.py, instrumented in
benchfakes.py): Slack Socket Mode + Web API in this process, the LiteLLM gateway in a child
process with scripted time-to-first-token and tokens/s.

Transports (``--transport loopback|production|both``, default both; one table column each):

  loopback     plain HTTP on 127.0.0.1, no added latency: the regression numbers
  production   the Web API and the gateway over TLS with a throwaway CA made at run time
               (openssl CLI), which the processes trust through SSL_CERT_FILE only (a bundle of the
               system CAs + that CA); an injected round trip (--slack-rtt-ms 30, --gateway-rtt-ms 5)
               paid once per request and twice per new connection (TCP + TLS handshake), so a
               client that opens a connection per call pays visibly more than one that reuses.
               Socket Mode stays ws:// without added latency (see benchfakes.BenchSocketMode)

Per process, in order (``--only`` picks scenarios, comma-separated; start-up and warm-up always run):

  start-up   spawn -> /health 200, -> /ready 200, -> Socket Mode hello; then one question to an
             instant model: first answer after /ready (envelope sent -> answer complete); idle
             RSS once CPU settles
  warm-up    5 short answers (not measured), then 20 spaced probes: idle ack/feedback floor
  load       50 long answers (0.5 s TTFT, 40 tok/s, 200 tokens) in flight, then 100 probe
             questions every 30 ms: ack latency (fake socket: envelope sent -> ack), first
             feedback (fake Web API: setStatus/placeholder/stream start - envelope sent), gateway
             token -> visible (gateway stamps a marker token, fake Slack stamps when it shows)
  burst      100 questions at once, 2 s gateway latency: wall time until all answers visible
  soak       N short answers, 100 outstanding: answers/s, bot CPU per answer, RSS growth, and
             Web API / gateway calls and new connections per answer (counted by the fake servers)
  cpu        N 50-chunk answers from an instant model, 20 outstanding: CPU per answer (issue 15)
  overload   500 questions arriving at 100/s, at most 250 outstanding, answers taking ~1.5 s
             (100 workers cannot keep up): ack p50/p99, answers/s, answered + busy notices, and
             unfinished = neither answered nor refused 60 s after the last arrival (lost, or a
             bot too slow to finish: its log tells which)
  tiers      (issue 10; fresh processes, round 1 only) a Slack
             fake that enforces the per-method rate tiers from the first call (benchfakes.SlackTiers):
             one 3,000-character answer alone (token -> visible p50/p95), then, in another fresh
             process, 20 concurrent 3,000-character answers: 429s sent to the bot (by method),
             answers complete and in order (shown text == scripted text), wall time

Results: a table on stdout and tests/bench/results/<timestamp>.json (gitignored). Both
implementations run at the same concurrency setting (100 workers; ledger-bot queue 100).

Options: --bot PATH (a patched copy), --env KEY=VALUE (bot settings), --impl NAME (one
implementation), --only SCENARIOS, --rounds N, --soak N, --profile (py-spy --gil per phase;
summarise with folded.py). client_cpu.py and slack_cpu.py measure one gateway / Slack call's CPU
per client library; rss_breakdown.py, the idle RSS step by step through start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from benchfakes import (  # noqa: E402
    BenchSlack,
    BenchSocketMode,
    GatewayProcess,
    ShapedHTTPServer,
    TLSFiles,
    answer_text,
    make_tls,
)
from fakes import BOT_USER, TEAM, free_port, http_get  # noqa: E402

for _noisy in ("werkzeug", "websockets"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-1111-2222-BENCHBOTTOKEN",
    "SLACK_APP_TOKEN": "xapp-1-A111-3333-BENCHAPPTOKEN",
    "LITELLM_DEVELOPER_KEY": "sk-litellm-BENCHGATEWAYKEY",
}
CONCURRENCY = 100
MiB = 1024 * 1024
PRODUCTION_RTT = {"slack": 0.030, "gateway": 0.005}  # seconds; --slack-rtt-ms / --gateway-rtt-ms

SCENARIOS = ("load", "burst", "soak", "cpu", "overload", "tiers")
MAIN_SCENARIOS = SCENARIOS[:-1]  # phases of the main process; tiers run in fresh ones
QUICK_PRODUCTION = {"cpu"}  # --quick on the production transport (plus start-up and warm-up)

# metric -> (human target, check(bot_value) -> bool, the transport the target is for or None for any)
TARGETS = {
    "first_answer_after_ready_s": ("<= 0.5 s", lambda v: v <= 0.5, None),
    "idle_ack_p50_ms": ("-", None, None),
    "idle_feedback_p50_ms": ("-", None, None),
    "ack_p50_ms": ("-", None, None),
    "ack_p99_ms": ("<= 10 ms", lambda v: v <= 10, None),
    "feedback_p50_ms": ("<= 50 ms", lambda v: v <= 50, "loopback"),
    "feedback_p95_ms": ("-", None, None),
    "token_visible_p50_ms": ("<= 300 ms", lambda v: v <= 300, "loopback"),
    "token_visible_p95_ms": ("-", None, None),
    "cpu_ms_per_answer": ("<= 25 ms", lambda v: v <= 25, None),
    "cpu50_ms_per_answer": ("<= 2x baseline", None, None),
    "cpu50_answers_per_s": (">= baseline", None, None),
    "load_cpu_ms_per_long_answer": ("-", None, None),
    "burst_wall_s": ("<= 4 s", lambda v: v <= 4, None),
    "burst_answer_p50_s": ("-", None, None),
    "burst_feedback_1s_pct": ("report", None, None),  # bounded by the status + reactions budgets
    "soak_answers_per_s": ("report", None, None),
    "overload_ack_p99_ms": ("<= 100 ms", lambda v: v <= 100, None),
    "overload_answers_per_s": (">= baseline", None, None),
    "overload_unfinished": ("0", lambda v: v == 0, None),
    "tiers_429s": ("0", lambda v: v == 0, None),
    "tiers_incomplete": ("0", lambda v: v == 0, None),
    "tiers_single_token_visible_p50_ms": ("<= 300 ms", lambda v: v <= 300, "loopback"),
    "idle_rss_mib": ("<= 230 MiB", lambda v: v <= 230, None),
    "rss_after_soak_mib": ("<= 230 MiB", lambda v: v <= 230, None),
    "rss_growth_vs_idle_pct": ("< 5 %", lambda v: v < 5, None),
    "rss_growth_after_warm_pct": ("< 5 %", lambda v: v < 5, None),
    "rss_after_10k_mib": ("<= 230 MiB", lambda v: v <= 230, None),
    "rss_growth_10k_vs_idle_pct": ("< 5 %", lambda v: v < 5, None),
    "rss_growth_10k_after_warm_pct": ("< 5 %", lambda v: v < 5, None),
    "start_health_s": ("<= 0.5 s", lambda v: v <= 0.5, None),
    "start_ready_s": ("<= 5 s", lambda v: v <= 5, None),
    "start_socket_s": ("-", None, None),
    "start_idle_s": ("-", None, None),
    "shutdown_s": ("-", None, None),
}


@dataclass
class Transport:
    """How the processes reach the fakes: ``loopback`` (plain, no latency) or ``production``
    (TLS through SSL_CERT_FILE, injected round trips). ``gateway`` is shared by every run on it."""

    name: str
    slack_rtt: float = 0.0
    gateway_rtt: float = 0.0
    tls: TLSFiles | None = None
    gateway: GatewayProcess | None = None

    def start(self) -> None:
        self.gateway = GatewayProcess(rtt=self.gateway_rtt, tls=self.tls)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def env(self) -> dict[str, str]:
        return {"SSL_CERT_FILE": self.tls.bundle} if self.tls else {}

    def slack_server(self) -> ShapedHTTPServer:
        return ShapedHTTPServer(rtt=self.slack_rtt, tls=self.tls)


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Impl:
    def __init__(self, name: str, argv: list[str], env: dict, has_health: bool):
        self.name, self.argv, self.env, self.has_health = name, argv, env, has_health


def impls(bot_path: Path, bot_env: dict | None = None) -> list[Impl]:
    common = {**SECRETS, "LOG_LEVEL": "WARNING", "LEDGER_BOT_MODEL": "bedrock-claude-4.5-sonnet"}
    bot = Impl("ledger-bot", [sys.executable, str(bot_path)], {
        **common, "LOG_FORMAT": "json",
        "LEDGER_BOT_WORKERS": str(CONCURRENCY), "LEDGER_BOT_QUEUE_SIZE": str(CONCURRENCY),
        "LEDGER_BOT_KNOWLEDGE": str(HERE / "knowledge"),
        "LEDGER_BOT_USER_RATE_LIMIT": "0", "LEDGER_BOT_DAILY_BUDGET_USD": "0",
        "LEDGER_BOT_USER_DAILY_BUDGET_USD": "0", "LEDGER_BOT_LLM_TIMEOUT_SECONDS": "30",
        **(bot_env or {}),
    }, True)
    base = Impl("baseline", [sys.executable, str(HERE / "baseline_bot.py")], {
        **common, "BASELINE_WORKERS": str(CONCURRENCY),
    }, False)
    return [bot, base]


class Run:
    """One implementation's process against fresh Slack fakes, and what was measured on it."""

    qids = itertools.count(1)

    def __init__(self, impl: Impl, transport: Transport, logdir: Path, tag: str, *, tiers: bool = False):
        self.impl, self.transport, self.gateway = impl, transport, transport.gateway
        self.socket = BenchSocketMode()
        self.server = transport.slack_server()
        self.server.start()
        self.slack = BenchSlack(self.server, self.socket)
        if tiers:  # like Slack: every call counts, from the first one
            self.slack.enforce_tiers()
        self.eids: dict[int, str] = {}
        self.where: dict[int, tuple[str, str]] = {}  # qid -> (channel, question ts)
        self.res: dict[str, float | int | str | None] = {}
        self.extra: dict = {}
        self.health_port = free_port()
        self.log_path = logdir / f"{tag}-{impl.name}.log"
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None

    # process ---------------------------------------------------------------------------

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / MiB

    def start(self, first_answer: bool = True) -> None:
        env = {"PATH": os.environ.get("PATH", ""), **self.impl.env, **self.transport.env(),
               "SLACK_API_URL": self.slack.api_url, "LITELLM_BASE_URL": self.gateway.base_url,
               "HEALTH_PORT": str(self.health_port)}
        url = f"http://127.0.0.1:{self.health_port}"
        log = open(self.log_path, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.impl.argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        health = ready = None
        deadline = t0 + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.impl.has_health:
                if health is None and http_get(url + "/health", 0.5)[0] == 200:
                    health = time.monotonic() - t0
                if health is not None and http_get(url + "/ready", 0.5)[0] == 200:
                    ready = time.monotonic() - t0
            if self.socket.hello_times and (ready is not None or not self.impl.has_health):
                break
            time.sleep(0.002)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.impl.name} exited with {self.proc.returncode}; see {self.log_path}")
        self.socket.wait_connected(1, 30)
        self.res["start_health_s"] = health
        self.res["start_ready_s"] = ready
        self.res["start_socket_s"] = self.socket.hello_times[0] - t0
        # A person asks the moment the replica is ready (baseline: has said hello); instant model.
        first = self.ask("fast") if first_answer else None
        if first is not None and self.wait([first], 30) and first in self.slack.done:
            self.res["first_answer_after_ready_s"] = self.slack.done[first] - self.sent(first)
            self.res["first_answer_after_spawn_s"] = self.slack.done[first] - t0
        # Idle = CPU has settled (ledger-bot imports litellm in the background after start).
        last, calm = self.cpu(), 0
        while time.monotonic() - t0 < 40 and calm < 2:
            time.sleep(0.5)
            now = self.cpu()
            calm = calm + 1 if now - last < 0.01 else 0
            last = now
        self.res["start_idle_s"] = time.monotonic() - t0 - 1.0
        self.res["idle_rss_mib"] = self.rss_mib()
        c0 = self.cpu()
        time.sleep(1.0)
        self.res["idle_cpu_pct"] = (self.cpu() - c0) * 100

    def stop(self, timeout: float = 30) -> None:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.res["exit_code"] = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.res["exit_code"] = "killed"
        self.res["shutdown_s"] = time.monotonic() - t0
        self.server.clear()
        self.server.stop()
        self.socket.close()

    # driving ---------------------------------------------------------------------------

    def ask(self, profile: str) -> int:
        qid = next(Run.qids)
        channel, user = f"C{qid % 997:07d}", f"U{qid % 389:07d}"
        text = f"<@{BOT_USER}> qid{qid} p={profile} how do I reverse a posted journal in GL Publisher?"
        msg = self.slack.add_message(channel, user=user, text=text)
        self.slack.register(qid, channel, msg["ts"])
        self.where[qid] = (channel, msg["ts"])
        self.eids[qid] = self.socket.send_event({
            "type": "app_mention", "user": user, "text": text, "ts": msg["ts"], "event_ts": msg["ts"],
            "channel": channel, "channel_type": "channel", "team": TEAM,
        })
        return qid

    def wait(self, qids: list[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.slack.cond:
            while True:
                left = [q for q in qids if q not in self.slack.done and q not in self.slack.notices]
                if not left:
                    return True
                if time.monotonic() > deadline:
                    return False
                self.slack.cond.wait(0.2)

    def sent(self, qid: int) -> float:
        return self.socket.sent[self.eids[qid]]

    def acks_ms(self, qids: list[int]) -> list[float]:
        return [(self.socket.acks[self.eids[q]] - self.sent(q)) * 1000 for q in qids if self.eids[q] in self.socket.acks]

    def feedback_ms(self, qids: list[int]) -> list[float]:
        return [(self.slack.feedback[q] - self.sent(q)) * 1000 for q in qids if q in self.slack.feedback]

    def token_visible_ms(self, qids: list[int], emitted: dict) -> list[float]:
        out = []
        wanted = set(qids)
        for (qid, idx), at in emitted.items():
            if qid in wanted and (qid, idx) in self.slack.visible:
                out.append((self.slack.visible[(qid, idx)] - at) * 1000)
        return out

    def outcomes(self, qids: list[int]) -> dict:
        done = sum(1 for q in qids if q in self.slack.done)
        notices: dict[str, int] = {}
        for q in qids:
            if q in self.slack.notices:
                notices[self.slack.notices[q]] = notices.get(self.slack.notices[q], 0) + 1
        return {"answered": done, "notices": notices, "missing": len(qids) - done - sum(notices.values())}

    def warm_up(self) -> None:
        """5 short answers (not measured), then 20 probes 50 ms apart on an idle bot: the floor."""
        qids = [self.ask("fast") for _ in range(5)]
        self.wait(qids, 30)
        probes = []
        for _ in range(20):
            probes.append(self.ask("fast"))
            time.sleep(0.05)
        self.wait(probes, 30)
        self.res["idle_ack_p50_ms"] = pct(self.acks_ms(probes), 50)
        self.res["idle_feedback_p50_ms"] = pct(self.feedback_ms(probes), 50)
        self.gateway.take()

    def load(self) -> None:
        """50 long answers in flight, then 100 probes 30 ms apart."""
        self.gateway.take()
        c0 = self.cpu()
        longs = [self.ask("long") for _ in range(50)]
        time.sleep(0.5)
        probes = []
        for _ in range(100):
            probes.append(self.ask("probe"))
            time.sleep(0.03)
        in_flight = sum(1 for q in longs if q not in self.slack.done)  # still streaming when probing ended
        ok = self.wait(longs + probes, 90)
        emitted, _ = self.gateway.take()
        self.res["load_cpu_ms_per_long_answer"] = (self.cpu() - c0) * 1000 / 50  # probes' share is small
        acks, fb = self.acks_ms(probes), self.feedback_ms(longs + probes)
        tv = self.token_visible_ms(longs, emitted)
        self.res.update({
            "ack_p50_ms": pct(acks, 50), "ack_p99_ms": pct(acks, 99), "ack_max_ms": max(acks, default=None),
            "ack_burst50_p99_ms": pct(self.acks_ms(longs), 99),
            "feedback_p50_ms": pct(fb, 50), "feedback_p95_ms": pct(fb, 95),
            "token_visible_p50_ms": pct(tv, 50), "token_visible_p95_ms": pct(tv, 95),
            "load_long_in_flight_at_end_of_probes": in_flight,
        })
        self.extra["load_outcomes"] = {**self.outcomes(longs + probes), "all_finished": ok}
        self.extra["load_probe_acks_ms"] = [round(a, 2) for a in acks]

    def burst(self) -> None:
        """100 questions at once, 2 s gateway latency each."""
        qids = [self.ask("burst") for _ in range(100)]
        ok = self.wait(qids, 60)
        first = min(self.sent(q) for q in qids)
        ends = [self.slack.done[q] for q in qids if q in self.slack.done]
        self.res["burst_wall_s"] = (max(ends) - first) if ok and ends else None
        self.res["burst_answer_p50_s"] = pct([self.slack.done[q] - self.sent(q) for q in qids if q in self.slack.done], 50)
        self.res["burst_feedback_p95_ms"] = pct(self.feedback_ms(qids), 95)
        # Feedback (status, placeholder, stream or 👀) visible within a second of the question.
        self.res["burst_feedback_1s_pct"] = 100 * sum(ms <= 1000 for ms in self.feedback_ms(qids)) / len(qids)
        self.extra["burst_outcomes"] = {**self.outcomes(qids), "all_finished": ok}
        self.gateway.take()

    def soak(self, n: int, window: int = CONCURRENCY) -> None:
        """``n`` short answers keeping ``window`` outstanding: throughput, CPU/answer, RSS."""
        self.slack.trim()
        me = psutil.Process()
        c0, h0, t0 = self.cpu(), sum(me.cpu_times()[:2]), time.monotonic()
        warm_at = max(1, n // 10)
        rss_warm = None
        qids: list[int] = []
        slack = self.slack
        base = slack.finished()
        net0 = self.net()
        while len(qids) < n:
            with slack.cond:
                stalled_at = time.monotonic()
                while len(qids) - (slack.finished() - base) >= window:
                    if time.monotonic() - stalled_at > 60:
                        raise RuntimeError(f"soak stalled: no answer finished for 60 s ({len(qids)} sent)")
                    slack.cond.wait(0.5)
            qids.append(self.ask("fast"))
            if rss_warm is None and len(qids) >= warm_at:
                rss_warm = self.rss_mib()
            if len(qids) % 2000 == 0:
                self.extra.setdefault("soak_rss_trace_mib", []).append((len(qids), round(self.rss_mib(), 1)))
                slack.trim()
                self.gateway.take()
        ok = self.wait(qids, 120)
        wall = time.monotonic() - t0
        cpu = self.cpu() - c0
        outs = self.outcomes(qids)
        self.res.update(self.per_answer("soak", net0, self.net(), n))
        self.res.update({
            "soak_answers": n, "soak_answers_per_s": outs["answered"] / wall,
            "cpu_ms_per_answer": cpu / max(1, outs["answered"]) * 1000,
            "bot_cpu_pct_during_soak": cpu / wall * 100,
            "harness_cpu_pct_during_soak": (sum(me.cpu_times()[:2]) - h0) / wall * 100,
            "soak_feedback_p50_ms": pct(self.feedback_ms(qids[-500:]), 50),
            "soak_ack_p99_ms": pct(self.acks_ms(qids), 99),
        })
        time.sleep(2.0)  # let the last answers' garbage go
        after = self.rss_mib()
        idle = self.res["idle_rss_mib"]
        self.res.update({
            "rss_after_warm_mib": rss_warm, "rss_after_soak_mib": after,
            "rss_growth_vs_idle_pct": (after - idle) / idle * 100,
            "rss_growth_after_warm_pct": (after - rss_warm) / rss_warm * 100,
        })
        if n >= 10_000:  # the 10,000-answer soak gets its own keys: rounds with 1,000 don't dilute it
            self.res.update({"rss_after_10k_mib": after, "rss_growth_10k_vs_idle_pct": self.res["rss_growth_vs_idle_pct"],
                             "rss_growth_10k_after_warm_pct": self.res["rss_growth_after_warm_pct"]})
        self.extra["soak_outcomes"] = {**outs, "all_finished": ok}
        self.extra["slack_method_counts"] = dict(slack.method_counts)
        self.gateway.take()


    # connections and calls ----------------------------------------------------------------

    def net(self) -> dict[str, int]:
        """Cumulative requests and accepted connections at the fake Web API and gateway."""
        sl, gw = self.server.counters(), self.gateway.counters()
        return {"slack_calls": sl.get("requests", 0), "slack_conns": sl.get("connections", 0),
                "gateway_calls": gw.get("requests", 0), "gateway_conns": gw.get("connections", 0)}

    def per_answer(self, prefix: str, before: dict, after: dict, answers: int) -> dict:
        """Calls and new connections per answer, and what the handshakes cost per answer at the
        production round trips (2 RTT each: TCP + TLS) whichever transport measured the counts."""
        d = {k: (after[k] - before[k]) / max(1, answers) for k in after}
        rtt = PRODUCTION_RTT
        return {
            f"{prefix}_slack_calls_per_answer": d["slack_calls"], f"{prefix}_slack_conns_per_answer": d["slack_conns"],
            f"{prefix}_gateway_calls_per_answer": d["gateway_calls"],
            f"{prefix}_gateway_conns_per_answer": d["gateway_conns"],
            f"{prefix}_handshake_ms_per_answer": (d["slack_conns"] * 2 * rtt["slack"]
                                                  + d["gateway_conns"] * 2 * rtt["gateway"]) * 1000,
        }

    # scenarios of issue 15 and 10 -----------------------------------------------------------

    def cpu_scenario(self, n: int, window: int = 20) -> None:
        """``n`` 50-chunk answers from an instant model, ``window`` outstanding: CPU per answer."""
        slack = self.slack
        self.gateway.take()
        c0, t0, net0 = self.cpu(), time.monotonic(), self.net()
        base = slack.finished()
        qids: list[int] = []
        while len(qids) < n:
            with slack.cond:
                while len(qids) - (slack.finished() - base) >= window:
                    slack.cond.wait(0.5)
            qids.append(self.ask("chunky50"))
        ok = self.wait(qids, 120)
        wall, cpu = time.monotonic() - t0, self.cpu() - c0
        outs = self.outcomes(qids)
        self.res.update({
            "cpu50_ms_per_answer": cpu / max(1, outs["answered"]) * 1000,
            "cpu50_answers_per_s": outs["answered"] / wall,
            **self.per_answer("cpu50", net0, self.net(), n),
        })
        self.extra["cpu50_outcomes"] = {**outs, "all_finished": ok}
        self.gateway.take()
        slack.trim()

    def overload(self, n: int = 500, rate: float = 100.0, window: int = 250) -> None:
        """Questions arrive at ``rate``/s, at most ``window`` outstanding, each answer ~1.5 s: more
        than 100 workers can take. Every question must end in an answer or a busy notice."""
        slack = self.slack
        self.gateway.take()
        c0, t0 = self.cpu(), time.monotonic()
        base = slack.finished()
        qids: list[int] = []
        peak = 0
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with slack.cond:
                while len(qids) - (slack.finished() - base) >= window:
                    slack.cond.wait(0.05)
                peak = max(peak, len(qids) - (slack.finished() - base))
            qids.append(self.ask("overload"))
        sent_for = time.monotonic() - t0
        ok = self.wait(qids, 60)  # each answer takes ~1.5 s: a minute after the last arrival is lost, not slow
        cpu = self.cpu() - c0
        outs = self.outcomes(qids)
        ends = [slack.done.get(q) or slack.notice_at.get(q) for q in qids]
        ends = [e for e in ends if e is not None]
        first = min(self.sent(q) for q in qids)
        wall = (max(ends) - first) if ends else None
        acks = self.acks_ms(qids)
        busy = sum(c for text, c in outs["notices"].items() if "busy" in text)
        self.res.update({
            "overload_ack_p50_ms": pct(acks, 50), "overload_ack_p99_ms": pct(acks, 99),
            "overload_ack_max_ms": max(acks, default=None), "overload_unacked": n - len(acks),
            "overload_answers_per_s": outs["answered"] / wall if wall else None,
            "overload_answered": outs["answered"], "overload_busy": busy,
            "overload_other_notices": sum(outs["notices"].values()) - busy, "overload_unfinished": outs["missing"],
            "overload_arrival_per_s": n / sent_for, "overload_peak_outstanding": peak,
            "overload_bot_cpu_pct": cpu / wall * 100 if wall else None,
        })
        self.extra["overload_outcomes"] = {**outs, "all_finished": ok}
        self.gateway.take()
        slack.trim()

    def check_answers(self, qids: list[int], profile: str) -> dict:
        """Is each answer's text, as shown in its thread, exactly the scripted text, once?"""
        complete = doubled = 0
        bad: dict[int, str] = {}
        for q in qids:
            channel, ts = self.where[q]
            shown = "".join(self.slack.reply_texts(channel, ts))
            want = answer_text(q, profile)
            if want in shown:
                complete += 1
            else:
                bad[q] = f"{len(shown)} chars shown, {len(want)} scripted"
            if shown.count(f"zz{q}x0zz") > 1 or shown.count(f"zz{q}xEzz") > 1:
                doubled += 1
        return {"complete": complete, "doubled": doubled, "bad": dict(list(bad.items())[:5])}

    def tiers_single(self, timeout: float) -> None:
        """One 3,000-character answer alone, tiers enforced: token -> visible, calls per answer."""
        self.gateway.take()
        net0 = self.net()
        q = self.ask("tier")
        ok = self.wait([q], timeout)
        emitted, _ = self.gateway.take()
        tv = self.token_visible_ms([q], emitted)
        check = self.check_answers([q], "tier")
        rejected = self.slack.rejected()
        self.res.update({
            "tiers_single_token_visible_p50_ms": pct(tv, 50), "tiers_single_token_visible_p95_ms": pct(tv, 95),
            "tiers_single_answer_s": (self.slack.done[q] - self.sent(q)) if q in self.slack.done else None,
            "tiers_single_429s": sum(rejected.values()),
            **self.per_answer("tiers_single", net0, self.net(), 1),
        })
        self.extra["tiers_single"] = {"finished": ok, **check, "enforced_by": self.slack.tier_source,
                                      "method_counts": dict(self.slack.method_counts), "rejected_429": dict(rejected)}

    def tiers_concurrent(self, n: int, timeout: float) -> None:
        """``n`` concurrent 3,000-character answers, tiers enforced from the first call."""
        self.gateway.take()
        before = sum(self.slack.rejected().values())
        net0 = self.net()
        qids = [self.ask("tier") for _ in range(n)]
        ok = self.wait(qids, timeout)
        first = min(self.sent(q) for q in qids)
        ends = [self.slack.done[q] for q in qids if q in self.slack.done]
        emitted, _ = self.gateway.take()
        tv = self.token_visible_ms(qids, emitted)
        check = self.check_answers(qids, "tier")
        outs = self.outcomes(qids)
        rejected = self.slack.rejected()
        self.res.update({
            "tiers_429s": sum(rejected.values()) - before,
            "tiers_complete": check["complete"], "tiers_incomplete": n - check["complete"],
            "tiers_doubled": check["doubled"], "tiers_notices": sum(outs["notices"].values()),
            "tiers_wall_s": (max(ends) - first) if ok and ends else None,
            "tiers_token_visible_p50_ms": pct(tv, 50), "tiers_token_visible_p95_ms": pct(tv, 95),
            **self.per_answer("tiers", net0, self.net(), n),
        })
        self.extra["tiers"] = {"finished_within_timeout": ok, "timeout_s": timeout, **check, **outs,
                               "enforced_by": self.slack.tier_source, "rejected_429": dict(rejected),
                               "method_counts": dict(self.slack.method_counts)}


class Profiler:
    """``py-spy record --gil`` of the bot for one phase (``--profile``): folded stacks of whichever
    thread holds the GIL, i.e. where the one core the process can use goes."""

    def __init__(self, run: Run, enabled: bool):
        self.run, self.enabled = run, enabled

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        out = self.run.log_path.with_suffix(f".pyspy-{name}.txt")
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(self.run.proc.pid),
                                "-r", "250", "--gil", "-f", "raw", "-o", str(out), "--nonblocking", "-d", "600"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)


def run_one(impl: Impl, transport: Transport, logdir: Path, tag: str, soak_n: int, scenarios: set[str],
            cpu_n: int, profile: bool = False) -> dict:
    r = Run(impl, transport, logdir, tag)
    prof = Profiler(r, profile)
    try:
        r.start()
        r.warm_up()
        for name, phase in (("load", r.load), ("burst", r.burst), ("soak", lambda: r.soak(soak_n)),
                            ("cpu", lambda: r.cpu_scenario(cpu_n)), ("overload", r.overload)):
            if name in scenarios:
                with prof.phase(name):
                    phase()
    finally:
        if r.proc is not None:
            r.stop()
    return {**r.res, "_extra": r.extra}


def run_tiers(impl: Impl, transport: Transport, logdir: Path, tag: str, n: int, timeout: float) -> dict:
    """Issue 10's scenario in two fresh processes (a Slack budget is per minute, and the bot may
    keep its own): one answer alone, then ``n`` at once. Only tiers_* keys are returned."""
    out: dict = {}
    extra: dict = {}
    for stage in ("single", "concurrent"):
        r = Run(impl, transport, logdir, f"{tag}-tiers-{stage}", tiers=True)
        try:
            r.start(first_answer=False)  # the scenario's answers are the only calls in the minute
            if stage == "single":
                r.tiers_single(timeout)
            else:
                r.tiers_concurrent(n, timeout)
        finally:
            if r.proc is not None:
                r.stop(timeout=10)
        out.update({k: v for k, v in r.res.items() if k.startswith("tiers")})
        extra.update({k: v for k, v in r.extra.items() if k.startswith("tiers")})
    return {**out, "_extra_tiers": extra}


def summarize(rounds: list[dict], transport: str) -> dict:
    """Per metric: median/min/max for each implementation and the median per-round ratio."""
    rows = [r[transport] for r in rounds if transport in r]
    names = list(dict.fromkeys(k for r in rows for impl in r.values() for k in impl if not k.startswith("_")))
    out = {}
    for k in names:
        row = {}
        for impl in ("ledger-bot", "baseline"):
            vals = [r.get(impl, {}).get(k) for r in rows if isinstance(r.get(impl, {}).get(k), (int, float))]
            row[impl] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None
        ratios = [r["ledger-bot"][k] / r["baseline"][k] for r in rows
                  if isinstance(r.get("ledger-bot", {}).get(k), (int, float))
                  and isinstance(r.get("baseline", {}).get(k), (int, float)) and r["baseline"][k]]
        row["ratio"] = statistics.median(ratios) if ratios else None
        out[k] = row
    return out


def fmt(v: dict | None) -> str:
    if v is None:
        return "n/a"
    digits = 0 if abs(v["median"]) >= 100 else (1 if abs(v["median"]) >= 10 else 2)
    s = f"{v['median']:.{digits}f}"
    if v["n"] > 1:
        s += f" ({v['min']:.{digits}f}–{v['max']:.{digits}f})"
    return s


def table(summaries: dict[str, dict]) -> str:
    """One row per metric; per transport: bot, baseline, bot/baseline, target met."""
    head = ["metric", "target"]
    for t in summaries:
        head += [f"{t}: ledger-bot", f"{t}: baseline", f"{t}: bot/base", f"{t}: met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = list(dict.fromkeys(k for summ in summaries.values() for k in summ))
    for k in names:
        target, check, only = TARGETS.get(k, ("-", None, None))
        cells = [k, target]
        for t, summ in summaries.items():
            row = summ.get(k) or {"ledger-bot": None, "baseline": None, "ratio": None}
            bot = row["ledger-bot"]
            met = "" if check is None or bot is None or (only and only != t) else (
                "yes" if check(bot["median"]) else "**NO**")
            ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
            cells += [fmt(bot), fmt(row["baseline"]), ratio, met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_only(values: list[str]) -> tuple[set[str], str | None]:
    """--only takes scenario names (comma-separated, repeatable); an implementation name there
    still means --impl, as it used to."""
    scenarios: set[str] = set()
    impl = None
    for v in values:
        for name in filter(None, (x.strip() for x in v.split(","))):
            if name in ("ledger-bot", "baseline"):
                impl = name
            elif name in SCENARIOS:
                scenarios.add(name)
            else:
                raise SystemExit(f"--only: unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
    return scenarios or set(SCENARIOS), impl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round per transport; loopback: everything (soak 1,000, cpu 200); production: start-up, "
                         "warm-up and cpu (50)")
    ap.add_argument("--rounds", type=int, help="rounds per transport (default 3; 1 with --quick)")
    ap.add_argument("--soak", type=int, help="answers in the soak (default 10,000 in round 1, else 1,000)")
    ap.add_argument("--cpu-answers", type=int, help="answers in the cpu scenario (default 500; 200 with --quick)")
    ap.add_argument("--transport", choices=["loopback", "production", "both"], default="both")
    ap.add_argument("--slack-rtt-ms", type=float, default=30.0, help="production transport: round trip to Slack")
    ap.add_argument("--gateway-rtt-ms", type=float, default=5.0, help="production transport: round trip to the gateway")
    ap.add_argument("--tiers-answers", type=int, default=20, help="concurrent answers in the tiers scenario")
    ap.add_argument("--tiers-timeout", type=float,
                    help="seconds the tiers scenario waits for its answers (default 90, 45 with --quick; "
                         "a 429's Retry-After can be ~60 s)")
    ap.add_argument("--bot", type=Path, default=ROOT / "ledger_bot.py", help="ledger_bot.py to run (e.g. a patched copy)")
    ap.add_argument("--impl", choices=["ledger-bot", "baseline"], help="run one implementation (no ratios)")
    ap.add_argument("--only", action="append", default=[], metavar="SCENARIOS",
                    help=f"comma-separated scenarios: {', '.join(SCENARIOS)} (start-up and warm-up always run)")
    ap.add_argument("--label", default="", help="added to the results file name")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for ledger-bot (e.g. LEDGER_BOT_STREAM_FLUSH_SECONDS=0.2)")
    ap.add_argument("--profile", action="store_true", help="py-spy record each phase (results/<run>/*.pyspy-*.txt)")
    args = ap.parse_args()
    scenarios, only_impl = parse_only(args.only)
    only_impl = args.impl or only_impl
    n_rounds = args.rounds or (1 if args.quick else 3)
    PRODUCTION_RTT.update(slack=args.slack_rtt_ms / 1000, gateway=args.gateway_rtt_ms / 1000)

    results_dir = HERE / "results"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else "")
    logdir = results_dir / stamp
    logdir.mkdir(parents=True, exist_ok=True)
    bot_src = args.bot.read_bytes()
    transports: list[Transport] = []
    if args.transport in ("loopback", "both"):
        transports.append(Transport("loopback"))
    if args.transport in ("production", "both"):
        transports.append(Transport("production", PRODUCTION_RTT["slack"], PRODUCTION_RTT["gateway"],
                                    make_tls(logdir / "tls")))
    meta = {
        "started": dt.datetime.now().isoformat(timespec="seconds"), "bot": str(args.bot),
        "bot_sha256": hashlib.sha256(bot_src).hexdigest()[:16],
        "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "streaming_in_bot": b"startStream" in bot_src or b"chat_startStream" in bot_src,
        "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "concurrency": CONCURRENCY, "rounds": n_rounds, "bot_env": args.env, "scenarios": sorted(scenarios),
        "transports": {t.name: {"slack_rtt_ms": t.slack_rtt * 1000, "gateway_rtt_ms": t.gateway_rtt * 1000,
                                "tls": bool(t.tls), "ssl_cert_file": t.tls.bundle if t.tls else None,
                                "socket_mode": "ws:// (no added latency)"} for t in transports},
    }
    rounds: list[dict] = []
    try:
        for t in transports:
            t.start()
        for i in range(n_rounds):
            rnd: dict = {}
            for t in (transports if i % 2 == 0 else transports[::-1]):
                soak_n = args.soak or (1000 if args.quick or i > 0 else 10_000)
                cpu_n = args.cpu_answers or (200 if args.quick else 500)
                run_scenarios = scenarios
                if args.quick and t.name == "production":
                    # A TLS connection per Slack call makes today's bot ~2.5 answers/s here (and a
                    # flush per token once calls are slow): --quick keeps production to start-up,
                    # warm-up and a 50-answer cpu scenario; the full run does everything.
                    run_scenarios = scenarios & QUICK_PRODUCTION
                    cpu_n = args.cpu_answers or 50
                order = impls(args.bot, dict(kv.split("=", 1) for kv in args.env))
                if i % 2:
                    order.reverse()  # alternate who goes first: the box warms up, neighbours come and go
                if only_impl:
                    order = [o for o in order if o.name == only_impl]
                res: dict = {"ledger-bot": {}, "baseline": {}}
                for impl in order:
                    tm = time.monotonic()
                    tag = f"r{i + 1}-{t.name}"
                    tiers_now = "tiers" in run_scenarios and i == 0
                    if not (run_scenarios & set(MAIN_SCENARIOS) or tiers_now):
                        continue
                    if run_scenarios & set(MAIN_SCENARIOS):
                        print(f"round {i + 1}/{n_rounds} {t.name}: {impl.name} ("
                              + ", ".join(f"{x} {soak_n}" if x == "soak" else f"{x} {cpu_n}" if x == "cpu" else x
                                          for x in MAIN_SCENARIOS if x in run_scenarios) + ") ...",
                              file=sys.stderr, flush=True)
                        res[impl.name] = run_one(impl, t, logdir, tag, soak_n, run_scenarios, cpu_n, args.profile)
                    if tiers_now:
                        print(f"round {i + 1}/{n_rounds} {t.name}: {impl.name} tiers ...", file=sys.stderr, flush=True)
                        res[impl.name].update(run_tiers(impl, t, logdir, tag, args.tiers_answers,
                                                        args.tiers_timeout or (45.0 if args.quick else 90.0)))
                    print(f"  done in {time.monotonic() - tm:.0f}s: " + json.dumps(
                        {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res[impl.name].items()
                         if not k.startswith("_")}), file=sys.stderr, flush=True)
                rnd[t.name] = res
            rounds.append(rnd)
    finally:
        for t in transports:
            t.stop()
    meta["loadavg_end"] = os.getloadavg()
    summaries = {t.name: summarize(rounds, t.name) for t in transports}
    out = {"meta": meta, "summary": summaries, "rounds": rounds}
    path = results_dir / f"{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(table(summaries))
    print(f"\nresults: {path.relative_to(ROOT)}  (process logs in {logdir.relative_to(ROOT)}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

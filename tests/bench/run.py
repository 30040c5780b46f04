"""Benchmark ledger-bot under load, against a Bolt baseline shaped like the prototype.

    .venv/bin/python tests/bench/run.py --quick     # ~5 min: 3 rounds, 1,000-answer soak
    .venv/bin/python tests/bench/run.py             # 3 rounds, 10,000-answer soak in round 1

Each round starts ``python ledger_bot.py`` (as users run it; LOG_LEVEL=WARNING) and
tests/bench/baseline_bot.py as subprocesses against local fakes (tests/fakes.py, instrumented in
benchfakes.py): Slack Socket Mode + Web API in this process, the LiteLLM gateway in a child
process with scripted time-to-first-token and tokens/s. Per process, in order:

  start-up   spawn -> /health 200, -> /ready 200, -> Socket Mode hello; idle RSS once CPU settles
  warm-up    5 short answers (not measured), then 20 spaced probes: idle ack/feedback floor
  load       50 long answers (0.5 s TTFT, 40 tok/s, 200 tokens) in flight, then 100 probe
             questions every 30 ms: ack latency (fake socket: envelope sent -> ack), first
             feedback (fake Web API: setStatus/placeholder/stream start - envelope sent), gateway
             token -> visible (gateway stamps a marker token, fake Slack stamps when it shows)
  burst      100 questions at once, 2 s gateway latency: wall time until all answers visible
  soak       N short answers, 100 outstanding: answers/s, bot CPU per answer, RSS growth

Results: a table on stdout and tests/bench/results/<timestamp>.json (gitignored). Both
implementations run at the same concurrency setting (100 workers; ledger-bot queue 100).

Options: --bot PATH (a patched copy), --env KEY=VALUE (bot settings), --only NAME, --rounds N,
--soak N, --profile (py-spy --gil per phase; summarise with folded.py). client_cpu.py and
slack_cpu.py measure one gateway / Slack call's CPU per client library.
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
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from benchfakes import BenchSlack, BenchSocketMode, GatewayProcess  # noqa: E402
from fakes import BOT_USER, TEAM, free_port, http_get  # noqa: E402
from pytest_httpserver import HTTPServer  # noqa: E402

for _noisy in ("werkzeug", "websockets"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-1111-2222-BENCHBOTTOKEN",
    "SLACK_APP_TOKEN": "xapp-1-A111-3333-BENCHAPPTOKEN",
    "LITELLM_DEVELOPER_KEY": "sk-litellm-BENCHGATEWAYKEY",
}
CONCURRENCY = 100
MiB = 1024 * 1024

TARGETS = {  # metric -> (human target, check(bot_value) -> bool)
    "idle_ack_p50_ms": ("-", None),
    "idle_feedback_p50_ms": ("-", None),
    "ack_p50_ms": ("-", None),
    "ack_p99_ms": ("<= 10 ms", lambda v: v <= 10),
    "feedback_p50_ms": ("<= 50 ms", lambda v: v <= 50),
    "feedback_p95_ms": ("-", None),
    "token_visible_p50_ms": ("<= 300 ms", lambda v: v <= 300),
    "token_visible_p95_ms": ("-", None),
    "cpu_ms_per_answer": ("<= 25 ms", lambda v: v <= 25),
    "load_cpu_ms_per_long_answer": ("-", None),
    "burst_wall_s": ("<= 4 s", lambda v: v <= 4),
    "burst_answer_p50_s": ("-", None),
    "soak_answers_per_s": ("report", None),
    "idle_rss_mib": ("<= 230 MiB", lambda v: v <= 230),
    "rss_after_soak_mib": ("<= 230 MiB", lambda v: v <= 230),
    "rss_growth_vs_idle_pct": ("< 5 %", lambda v: v < 5),
    "rss_growth_after_warm_pct": ("< 5 %", lambda v: v < 5),
    "rss_after_10k_mib": ("<= 230 MiB", lambda v: v <= 230),
    "rss_growth_10k_vs_idle_pct": ("< 5 %", lambda v: v < 5),
    "rss_growth_10k_after_warm_pct": ("< 5 %", lambda v: v < 5),
    "start_health_s": ("<= 0.5 s", lambda v: v <= 0.5),
    "start_ready_s": ("<= 5 s", lambda v: v <= 5),
    "start_socket_s": ("-", None),
    "start_idle_s": ("-", None),
    "shutdown_s": ("-", None),
}


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

    def __init__(self, impl: Impl, gateway: GatewayProcess, logdir: Path, tag: str):
        self.impl, self.gateway = impl, gateway
        self.socket = BenchSocketMode()
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        self.server.start()
        self.slack = BenchSlack(self.server, self.socket)
        self.eids: dict[int, str] = {}
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

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", ""), **self.impl.env, "SLACK_API_URL": self.slack.api_url,
               "LITELLM_BASE_URL": self.gateway.base_url, "HEALTH_PORT": str(self.health_port)}
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

    def stop(self) -> None:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.res["exit_code"] = self.proc.wait(30)
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


def run_one(impl: Impl, gateway: GatewayProcess, logdir: Path, tag: str, soak_n: int, profile: bool = False) -> dict:
    r = Run(impl, gateway, logdir, tag)
    prof = Profiler(r, profile)
    try:
        r.start()
        r.warm_up()
        with prof.phase("load"):
            r.load()
        with prof.phase("burst"):
            r.burst()
        with prof.phase("soak"):
            r.soak(soak_n)
    finally:
        if r.proc is not None:
            r.stop()
    return {**r.res, "_extra": r.extra}


def summarize(rounds: list[dict]) -> dict:
    """Per metric: median/min/max for each implementation and the median per-round ratio."""
    names = list(dict.fromkeys(k for r in rounds for impl in r.values() for k in impl if not k.startswith("_")))
    out = {}
    for k in names:
        row = {}
        for impl in ("ledger-bot", "baseline"):
            vals = [r.get(impl, {}).get(k) for r in rounds if isinstance(r[impl].get(k), (int, float))]
            row[impl] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None
        ratios = [r["ledger-bot"][k] / r["baseline"][k] for r in rounds
                  if isinstance(r.get("ledger-bot", {}).get(k), (int, float))
                  and isinstance(r.get("baseline", {}).get(k), (int, float)) and r["baseline"][k]]
        row["ratio"] = statistics.median(ratios) if ratios else None
        out[k] = row
    return out


def fmt(v: dict | None, k: str) -> str:
    if v is None:
        return "n/a"
    digits = 0 if abs(v["median"]) >= 100 else (1 if abs(v["median"]) >= 10 else 2)
    s = f"{v['median']:.{digits}f}"
    if v["n"] > 1:
        s += f" ({v['min']:.{digits}f}–{v['max']:.{digits}f})"
    return s


def table(summary: dict) -> str:
    lines = ["| metric | target | ledger-bot median (min–max) | baseline median (min–max) | bot/baseline | target met |",
             "|---|---|---|---|---|---|"]
    for k, row in summary.items():
        target, check = TARGETS.get(k, ("-", None))
        bot = row["ledger-bot"]
        met = "" if check is None or bot is None else ("yes" if check(bot["median"]) else "**NO**")
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        lines.append(f"| {k} | {target} | {fmt(bot, k)} | {fmt(row['baseline'], k)} | {ratio} | {met} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000-answer soak in every round (default: 10,000 in round 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--soak", type=int, help="answers in the soak (overrides --quick)")
    ap.add_argument("--bot", type=Path, default=ROOT / "ledger_bot.py", help="ledger_bot.py to run (e.g. a patched copy)")
    ap.add_argument("--only", choices=["ledger-bot", "baseline"], help="run one implementation (no ratios)")
    ap.add_argument("--label", default="", help="added to the results file name")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for ledger-bot (e.g. LEDGER_BOT_STREAM_FLUSH_SECONDS=0.2)")
    ap.add_argument("--profile", action="store_true", help="py-spy record each phase (results/<run>/*.pyspy-*.txt)")
    args = ap.parse_args()

    results_dir = HERE / "results"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else "")
    logdir = results_dir / stamp
    logdir.mkdir(parents=True, exist_ok=True)
    bot_src = args.bot.read_bytes()
    meta = {
        "started": dt.datetime.now().isoformat(timespec="seconds"), "bot": str(args.bot),
        "bot_sha256": hashlib.sha256(bot_src).hexdigest()[:16],
        "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "streaming_in_bot": b"startStream" in bot_src or b"chat_startStream" in bot_src,
        "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "concurrency": CONCURRENCY, "rounds": args.rounds, "bot_env": args.env,
    }
    gateway = GatewayProcess()
    rounds: list[dict] = []
    try:
        for i in range(args.rounds):
            soak_n = args.soak or (1000 if args.quick or i > 0 else 10_000)
            order = impls(args.bot, dict(kv.split("=", 1) for kv in args.env))
            if i % 2:
                order.reverse()  # alternate who goes first: the box warms up, neighbours come and go
            if args.only:
                order = [o for o in order if o.name == args.only]
            rnd = {}
            for impl in order:
                t = time.monotonic()
                print(f"round {i + 1}/{args.rounds}: {impl.name} (soak {soak_n}) ...", file=sys.stderr, flush=True)
                rnd[impl.name] = run_one(impl, gateway, logdir, f"r{i + 1}", soak_n, args.profile)
                print(f"  done in {time.monotonic() - t:.0f}s: " + json.dumps(
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rnd[impl.name].items() if not k.startswith("_")}),
                    file=sys.stderr, flush=True)
            if args.only:
                other = "baseline" if args.only == "ledger-bot" else "ledger-bot"
                rnd[other] = {}
            rounds.append(rnd)
    finally:
        gateway.stop()
    meta["loadavg_end"] = os.getloadavg()
    summary = summarize(rounds)
    out = {"meta": meta, "summary": summary, "rounds": rounds}
    path = results_dir / f"{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(table(summary))
    print(f"\nresults: {path.relative_to(ROOT)}  (process logs in {logdir.relative_to(ROOT)}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

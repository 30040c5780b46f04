"""How much a 1 MB screenshot adds to first-token time, and what it costs in memory (issue 14).

    .venv/bin/python tests/bench/screenshot.py [--rounds 10]

Runs ledger_bot.main in this process against the test fakes (loopback): questions without a
file and with a 1 MB PNG, alternately; for each, the time from the event sent to the first
answer text visible in Slack (chat.startStream arriving at the fake), and how much more memory
Python held at the peak of the answer than before it (tracemalloc). Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from fakes import TEAM, FakeGateway, FakeSlack, FakeSocketMode, free_port, wait_for  # noqa: E402
from pytest_httpserver import HTTPServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    import logging

    import ledger_bot

    for noisy in ("werkzeug", "websockets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    socket_mode = FakeSocketMode()
    slack_server, gateway_server = HTTPServer(host="127.0.0.1", port=0), HTTPServer(host="127.0.0.1", port=0)
    slack_server.start()
    gateway_server.start()
    slack, gateway = FakeSlack(slack_server, socket_mode), FakeGateway(gateway_server)
    slack.tiers.clear()
    env = {"SLACK_BOT_TOKEN": "xoxb-1-2-BENCH", "SLACK_APP_TOKEN": "xapp-1-2-BENCH",
           "LITELLM_DEVELOPER_KEY": "sk-bench-key", "LITELLM_BASE_URL": gateway.base_url,
           "SLACK_API_URL": slack.api_url, "HEALTH_PORT": str(free_port()), "LOG_LEVEL": "ERROR",
           "LEDGER_BOT_USER_RATE_LIMIT": "0", "LEDGER_BOT_SLACK_RATE_SHARE": "1",
           "LEDGER_BOT_SLACK_RATE_LIMITS": "chat.startStream=10000,chat.stopStream=10000,"
                                           "assistant.threads.setStatus=10000"}
    stop = threading.Event()
    threading.Thread(target=ledger_bot.main, args=([],), kwargs={"environ": env, "stop": stop}, daemon=True).start()
    socket_mode.wait_connected(timeout=60)
    png = slack.add_file("screenshot.png", "image/png", os.urandom(1_000_000))
    timings: dict[str, list[float]] = {"no file": [], "1 MB PNG": []}
    peaks: dict[str, list[float]] = {"no file": [], "1 MB PNG": []}
    tracemalloc.start()
    for i in range(args.rounds * 2):
        kind = "1 MB PNG" if i % 2 else "no file"
        msg = slack.add_message("D1", user="U1", text=f"question {i}")
        event = {"type": "message", "channel": "D1", "channel_type": "im", "user": "U1", "text": msg["text"],
                 "ts": msg["ts"], "team": TEAM}
        if i % 2:
            event.update(subtype="file_share", files=[png])
        starts = len(slack.calls_to("chat.startStream"))
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        sent = time.monotonic()
        socket_mode.send_event(event)
        wait_for(lambda n=starts: len(slack.calls_to("chat.startStream")) > n, 30, "first text")
        timings[kind].append((time.monotonic() - sent) * 1000)
        wait_for(lambda n=i: len(slack.calls_to("chat.stopStream")) > n, 30, "answer done")
        peaks[kind].append((tracemalloc.get_traced_memory()[1] - before) / 2**20)
    stop.set()
    for kind in timings:
        print(f"{kind:>9}: first text p50 {statistics.median(timings[kind]):6.1f} ms, "
              f"memory held at peak p50 +{statistics.median(peaks[kind]):4.1f} MiB ({args.rounds} questions)")
    print(f"a 1 MB screenshot adds {statistics.median(timings['1 MB PNG']) - statistics.median(timings['no file']):.1f} ms "
          "to first text on loopback")


if __name__ == "__main__":
    main()

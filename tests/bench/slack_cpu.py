"""CPU one process spends per Slack Web API call: slack_sdk's WebClient (urllib, a new TCP
connection per call) against an httpx.Client that keeps the connection alive.

    .venv/bin/python tests/bench/slack_cpu.py [--calls 1000]

Plain http on loopback: in production every WebClient call also pays a TLS handshake to
slack.com, which this does not show (it only makes the gap wider).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchfakes import BenchSlack, BenchSocketMode
from pytest_httpserver import HTTPServer

logging.getLogger("werkzeug").setLevel(logging.ERROR)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    socket_mode = BenchSocketMode()
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    slack = BenchSlack(server, socket_mode)
    import httpx
    from slack_sdk import WebClient

    token = "xoxb-bench"
    web = WebClient(token=token, base_url=slack.api_url)
    http = httpx.Client(base_url=slack.api_url, headers={"Authorization": f"Bearer {token}"})

    def sdk(i: int) -> None:
        web.assistant_threads_setStatus(channel_id="C1", thread_ts="1.1", status="is thinking…")

    def keepalive(i: int) -> None:
        r = http.post("assistant.threads.setStatus", json={"channel_id": "C1", "thread_ts": "1.1", "status": "is thinking…"})
        assert r.json()["ok"]

    print("| client | client CPU ms / call (calling thread) | wall ms / call |")
    print("|---|---|---|")
    for name, call in (("slack_sdk WebClient (urllib, new connection)", sdk), ("httpx.Client keep-alive", keepalive)):
        for i in range(20):
            call(i)
        slack.trim()
        c0, t0 = time.thread_time(), time.perf_counter()
        for i in range(args.calls):
            call(i)
            if i % 500 == 0:
                slack.trim()
        n = args.calls
        # thread_time: only the calling thread, i.e. the client; the fake server runs on other threads.
        print(f"| {name} | {(time.thread_time() - c0) / n * 1000:.2f} | {(time.perf_counter() - t0) / n * 1000:.2f} |")
    server.stop()
    socket_mode.close()


if __name__ == "__main__":
    main()

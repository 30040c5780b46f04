"""Where ledger-bot's idle RSS goes: the process's resident memory after each step of start-up.

    .venv/bin/python tests/bench/rss_breakdown.py [--objects]

Steps, in the order the bot takes them before its Socket Mode connection opens: the
interpreter, ``import ledger_bot`` (slack_sdk, msgspec, prometheus_client), ``import litellm``
(with the offline cost map, as the bot sets it), the alias registered and the tokenizer loaded
by a first ``token_counter``, the shared openai client. Then what giving freed heap back to
the OS (``release_free_memory``) takes off. Each step prints RSS and its increase. With
``--objects``, tracemalloc also counts the live Python objects each step added (a step whose
memory is native, like the tokenizer's Rust tables, shows RSS without them); tracemalloc's own
bookkeeping then inflates RSS, so read RSS from a run without it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", action="store_true", help="also count Python objects (tracemalloc)")
    objects = ap.parse_args().objects
    rows: list[tuple[str, float, float]] = []
    if objects:
        tracemalloc.start()

    def step(name: str) -> None:
        gc.collect()
        rows.append((name, rss_mib(), tracemalloc.get_traced_memory()[0] / 2**20))

    step("interpreter")
    import ledger_bot as lb  # sets LITELLM_LOCAL_MODEL_COST_MAP / LITELLM_OFFLINE_MODE first

    step("import ledger_bot")
    lb._litellm()
    step("import litellm")
    env = {
        "SLACK_BOT_TOKEN": "xoxb-rss",
        "SLACK_APP_TOKEN": "xapp-rss",
        "LITELLM_BASE_URL": "http://127.0.0.1:9",
        "LITELLM_DEVELOPER_KEY": "sk-rss",
        "KNOWLEDGE_PATH": str(ROOT / "knowledge"),
    }
    config = lb.load_config({**os.environ, **env})
    lb.token_counter(config)("warm-up")
    step("alias + tokenizer (first token_counter)")
    lb.make_llm_client(config)
    step("openai client")
    lb.release_free_memory()
    step("release_free_memory()")

    print(f"{'step':<42} {'RSS MiB':>8} {'+RSS':>7}" + (f" {'+Python objects MiB':>20}" if objects else ""))
    prev_rss, prev_py = rows[0][1], rows[0][2]
    for name, rss, py in rows:
        extra = f" {py - prev_py:+20.1f}" if objects else ""
        print(f"{name:<42} {rss:8.1f} {rss - prev_rss:+7.1f}{extra}")
        prev_rss, prev_py = rss, py


if __name__ == "__main__":
    main()

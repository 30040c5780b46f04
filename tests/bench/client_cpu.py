"""CPU one process spends per gateway call, by client, against the paced fake gateway.

    .venv/bin/python tests/bench/client_cpu.py [--calls 200]

Compares how ledger-bot calls the gateway today (litellm.completion(stream=True) with the
``litellm_proxy/`` provider) with the openai SDK (stream=True and stream=False) and with a
plain httpx SSE reader, for a 12-token and a 200-token answer. Calls run one after another in
this process; the number is process CPU (all threads, incl. litellm's logging workers) / calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_OFFLINE_MODE"] = "true"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchfakes import GatewayProcess

KEY = "sk-bench"
MODEL = "bedrock-claude-4.5-sonnet"


def messages(profile: str, i: int) -> list[dict]:
    return [{"role": "system", "content": "You are ledger-bot. " * 50},
            {"role": "user", "content": f"<@U1>: qid{i} p={profile} how do I reverse a journal?"}]


def via_litellm(base: str):
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router"):
        __import__("logging").getLogger(name).setLevel("WARNING")

    def call(profile: str, i: int) -> str:
        resp = litellm.completion(model=f"litellm_proxy/{MODEL}", messages=messages(profile, i), api_base=base,
                                  api_key=KEY, extra_headers={"X-LiteLLM-Dev-Key": KEY}, timeout=30, max_retries=1,
                                  max_tokens=4096, stream=True, stream_options={"include_usage": True})
        return "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
    return call


def via_openai(base: str, stream: bool):
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key=KEY, default_headers={"X-LiteLLM-Dev-Key": KEY}, timeout=30, max_retries=1)

    def call(profile: str, i: int) -> str:
        if not stream:
            r = client.chat.completions.create(model=MODEL, messages=messages(profile, i), max_tokens=4096)
            return r.choices[0].message.content
        resp = client.chat.completions.create(model=MODEL, messages=messages(profile, i), max_tokens=4096, stream=True,
                                              stream_options={"include_usage": True})
        return "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
    return call


def via_httpx(base: str):
    import httpx

    client = httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {KEY}", "X-LiteLLM-Dev-Key": KEY})

    def call(profile: str, i: int) -> str:
        out = []
        body = {"model": MODEL, "messages": messages(profile, i), "max_tokens": 4096, "stream": True,
                "stream_options": {"include_usage": True}}
        with client.stream("POST", "/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for ch in chunk.get("choices") or ():
                    out.append((ch.get("delta") or {}).get("content") or "")
        return "".join(out)
    return call


def measure(call, profile: str, n: int) -> float:
    for i in range(5):
        call(profile, i)  # warm: lazy imports, connection pools
    c0 = time.process_time()
    for i in range(n):
        text = call(profile, i)
        assert "xEzz" in text, text[-80:]
    return (time.process_time() - c0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    gw = GatewayProcess()
    try:
        clients = {
            "litellm.completion stream (ledger-bot today)": via_litellm(gw.base_url),
            "openai SDK stream": via_openai(gw.base_url, True),
            "openai SDK non-stream (baseline)": via_openai(gw.base_url, False),
            "httpx + json SSE reader": via_httpx(gw.base_url),
        }
        print("| client | CPU ms / call, 12 tokens | CPU ms / call, 200 tokens |")
        print("|---|---|---|")
        for name, call in clients.items():
            short = measure(call, "fast", args.calls)
            long_ = measure(call, "chunky", max(20, args.calls // 4))
            print(f"| {name} | {short:.2f} | {long_:.2f} |", flush=True)
    finally:
        gw.stop()


if __name__ == "__main__":
    main()

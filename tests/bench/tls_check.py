"""Does each HTTP client the bot (and the baseline) uses trust a CA given by SSL_CERT_FILE?

    .venv/bin/python tests/bench/tls_check.py

Starts the Slack Web API and gateway fakes over TLS with a throwaway CA (the same
ones run.py --transport production uses), then runs each client in a fresh interpreter twice:
with SSL_CERT_FILE pointing at the CA bundle, and without it. A client that honours the
variable succeeds with it and fails certificate verification without it. The clients, called
the way ledger_bot.py and baseline_bot.py call them (Socket Mode is not among them: slack_sdk's
builtin SocketModeClient uses TLS only on port 443, see benchfakes.BenchSocketMode):

  slack_sdk WebClient (urllib)          auth.test
  litellm.completion (litellm_proxy/)   stream=True, reading chunks (openai SDK -> httpx)
  openai.OpenAI (httpx)                 the baseline's non-streaming call
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from benchfakes import BenchSlack, BenchSocketMode, GatewayProcess, ShapedHTTPServer, make_tls  # noqa: E402

CLIENTS = {
    "slack_sdk WebClient (urllib)": """
from slack_sdk import WebClient
print(WebClient(token="xoxb-1", base_url=SLACK, timeout=5).auth_test()["ok"])
""",
    "litellm.completion stream (litellm_proxy)": """
import os
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm
litellm.suppress_debug_info = True
r = litellm.completion(model="litellm_proxy/bench", messages=[{"role": "user", "content": "hi"}], api_base=GATEWAY,
                       api_key="sk-1", timeout=5, max_retries=0, stream=True, stream_options={"include_usage": True})
print(repr("".join(c.choices[0].delta.content or "" for c in (getattr(r, "completion_stream", None) or r) if c.choices)))
""",
    "openai.OpenAI (httpx)": """
from openai import OpenAI
c = OpenAI(base_url=GATEWAY, api_key="sk-1", max_retries=0, timeout=5)
print(repr(c.chat.completions.create(model="bench", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content))
""",
}


def run_client(code: str, env: dict) -> tuple[bool, str]:
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if p.returncode == 0:
        return True, p.stdout.strip().splitlines()[-1]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if "CERTIFICATE_VERIFY_FAILED" in ln), lines[-1] if lines else "?")
    return False, err.strip()[:200]


def main() -> int:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="ledger-bot-tls-"))
    tls = make_tls(tmp)
    server = ShapedHTTPServer(tls=tls)
    server.start()
    socket = BenchSocketMode()
    slack = BenchSlack(server, socket)
    gateway = GatewayProcess(tls=tls)
    results = []
    try:
        base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
        for name, code in CLIENTS.items():
            prelude = f"SLACK = {slack.api_url!r}\nGATEWAY = {gateway.base_url!r}\n"
            t = time.monotonic()
            with_var = run_client(prelude + code, {**base, "SSL_CERT_FILE": tls.bundle})
            without = run_client(prelude + code, base)
            honours = with_var[0] and not without[0]
            results.append({"client": name, "honours_SSL_CERT_FILE": honours, "with": with_var, "without": without})
            print(f"{'OK ' if honours else 'NO '} {name}  ({time.monotonic() - t:.1f}s)\n"
                  f"    with SSL_CERT_FILE:    {'ok' if with_var[0] else 'FAILED'}: {with_var[1]}\n"
                  f"    without SSL_CERT_FILE: {'ok' if without[0] else 'failed'}: {without[1]}", flush=True)
    finally:
        gateway.stop()
        server.stop()
        socket.close()
    return 0 if all(r["honours_SSL_CERT_FILE"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

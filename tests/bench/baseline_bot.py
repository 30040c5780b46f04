"""BASELINE for the benchmark only: NOT ledger-bot, never shipped, never run in production.

A minimal Bolt app shaped like the prototype ledger-bot replaces: slack_bolt's builtin Socket
Mode adapter (slack_sdk's SocketModeClient), an ``app_mention`` listener that posts
"Thinking…", asks the gateway through the ``openai`` SDK without streaming, and replaces the
placeholder with the whole answer via chat.update. No health server, metrics, dedupe, limits
or error replies: it exists so tests/bench/run.py can compare ledger-bot against the design it
replaces, on the same fakes in the same run.

Environment (the same names ledger-bot reads): SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_API_URL,
LITELLM_BASE_URL, LITELLM_DEVELOPER_KEY, LEDGER_BOT_MODEL, LOG_LEVEL; BASELINE_WORKERS sets the
size of Bolt's listener thread pool (Bolt's default is 5).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI
from slack_bolt import App
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk import WebClient

SYSTEM = "You are a helpful assistant for the BOR Write team. Answer questions about GL Publisher."


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    workers = int(os.environ.get("BASELINE_WORKERS", "5"))
    app = App(
        client=WebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ.get("SLACK_API_URL", "https://slack.com/api/")),
        token=os.environ["SLACK_BOT_TOKEN"],
        token_verification_enabled=False,
        listener_executor=ThreadPoolExecutor(max_workers=workers),
    )
    llm = OpenAI(base_url=os.environ["LITELLM_BASE_URL"], api_key=os.environ["LITELLM_DEVELOPER_KEY"], max_retries=1,
                 timeout=60)
    model = os.environ.get("LEDGER_BOT_MODEL", "bedrock-claude-4.5-sonnet")

    @app.event("app_mention")
    def on_mention(event, client):
        thread_ts = event.get("thread_ts") or event["ts"]
        placeholder = client.chat_postMessage(channel=event["channel"], thread_ts=thread_ts, text="Thinking…")
        completion = llm.chat.completions.create(
            model=model, stream=False,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": event.get("text", "")}],
        )
        client.chat_update(channel=event["channel"], ts=placeholder["ts"], text=completion.choices[0].message.content)

    handler = SocketModeHandler(app, os.environ["SLACK_APP_TOKEN"])
    signal.signal(signal.SIGTERM, lambda *_: (handler.close(), sys.exit(0)))
    handler.start()


if __name__ == "__main__":
    main()

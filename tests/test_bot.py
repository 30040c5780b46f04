"""The bot end to end: real SocketModeClient and litellm against the fakes, asserting on what
people would see in Slack."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import SECRETS
from fakes import BOT_ID, BOT_USER, TEAM, Script, wait_for


def mention(slack, socket_mode, text="what is GL Publisher?", *, channel="C100", user="U1",
            thread_ts=None, event_id=None):
    """A person @mentions the bot: the message lands in Slack, the event reaches the bot."""
    msg = slack.add_message(channel, user=user, text=f"<@{BOT_USER}> {text}", thread_ts=thread_ts)
    event = {"type": "app_mention", "channel": channel, "user": user, "text": msg["text"], "ts": msg["ts"],
             "team": TEAM, "event_ts": msg["ts"]}
    if thread_ts:
        event["thread_ts"] = thread_ts
    eid = socket_mode.send_event(event, event_id=event_id)
    return msg, eid


def replies(slack, channel, thread_ts, n=1, timeout=15):
    """The bot's replies in a thread once at least ``n`` are there and all are finished (no
    stream still open, no placeholder still waiting for its answer)."""
    def finished():
        msgs = slack.bot_replies(channel, thread_ts)
        done = len(msgs) >= n and not any(m.get("streaming") or slack.shown_text(m) == "_Thinking…_" for m in msgs)
        return done and [slack.shown_text(m) for m in msgs]

    return wait_for(finished, timeout, f"{n} finished bot replies in {channel}/{thread_ts}")


def log_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ── answering ────────────────────────────────────────────────────────────────────────────


def test_mention_in_thread_gets_answer_with_thread_context(start_bot, slack, socket_mode, gateway):
    start_bot()
    root = slack.add_message("C100", user="U1", text="Journal import failed for ledger CA01 last night")
    slack.add_message("C100", user=BOT_USER, bot_id=BOT_ID, text="Earlier answer about CA01.", thread_ts=root["ts"],
                      metadata={"event_type": "ledger_bot_answer", "event_payload": {"ref": "lb-1"}})
    slack.add_message("C100", user=BOT_USER, bot_id=BOT_ID, text="Sorry, the gateway timed out.", thread_ts=root["ts"],
                      metadata={"event_type": "ledger_bot_notice", "event_payload": {"ref": "lb-2"}})
    gateway.script(Script(text="Check the *GL_INTERFACE* table first."))

    question, _ = mention(slack, socket_mode, "why did it fail?", user="U2", thread_ts=root["ts"])

    assert replies(slack, "C100", root["ts"], n=3)[-1] == "Check the *GL_INTERFACE* table first."
    sent = gateway.requests[0].body["messages"]
    assert sent[0]["role"] == "system" and "ledger-bot" in json.dumps(sent[0]["content"])
    assert sent[1:] == [
        {"role": "user", "content": "<@U1>: Journal import failed for ledger CA01 last night"},
        {"role": "assistant", "content": "Earlier answer about CA01."},
        {"role": "user", "content": "<@U2>: why did it fail?"},
    ]
    reply = slack.bot_replies("C100", root["ts"])[-1]
    assert reply["thread_ts"] == root["ts"]
    assert gateway.requests[0].body["model"] == "bedrock-claude-4.5-sonnet"
    assert gateway.requests[0].headers["Authorization"] == "Bearer " + SECRETS["LITELLM_DEVELOPER_KEY"]
    assert gateway.requests[0].headers["X-Litellm-Dev-Key"] == SECRETS["LITELLM_DEVELOPER_KEY"]
    assert question["ts"] != root["ts"]


def test_top_level_mention_is_answered_in_a_new_thread_under_it(start_bot, slack, socket_mode, gateway):
    start_bot()
    msg, _ = mention(slack, socket_mode, "hello")
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    assert [m["role"] for m in gateway.requests[0].body["messages"]] == ["system", "user"]
    assert slack.calls_to("conversations.replies") == []  # nothing to read: the thread is the question


def test_direct_message_is_answered_threaded_under_it(start_bot, slack, socket_mode, gateway):
    start_bot()
    msg = slack.add_message("D200", user="U7", text="how do I rerun a failed GL batch?")
    socket_mode.send_event({"type": "message", "channel": "D200", "channel_type": "im", "user": "U7",
                            "text": msg["text"], "ts": msg["ts"], "team": TEAM})
    assert replies(slack, "D200", msg["ts"]) == ["The answer is 42."]
    assert gateway.requests[0].body["messages"][-1] == {"role": "user", "content": "<@U7>: how do I rerun a failed GL batch?"}


def test_thinking_status_is_shown_before_the_answer(start_bot, slack, socket_mode, gateway):
    start_bot()
    release = threading.Event()
    gateway.script(Script(release=release))
    msg, _ = mention(slack, socket_mode)
    status = wait_for(lambda: slack.calls_to("assistant.threads.setStatus"), 5, "thinking status")[0]
    assert status.params["status"] == "is thinking…"
    assert status.params["thread_ts"] == msg["ts"]
    assert slack.bot_replies("C100", msg["ts"]) == []  # the answer has not arrived yet
    release.set()
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]


def test_placeholder_is_replaced_by_the_answer_when_status_is_refused(start_bot, slack, socket_mode, gateway):
    slack.status_supported = False
    start_bot()
    release = threading.Event()
    gateway.script(Script(text="Final answer.", release=release))
    msg, _ = mention(slack, socket_mode)
    wait_for(lambda: slack.reply_texts("C100", msg["ts"]) == ["_Thinking…_"], 10, "placeholder")
    release.set()
    wait_for(lambda: slack.reply_texts("C100", msg["ts"]) == ["Final answer."], 10, "placeholder replaced")
    assert slack.bot_replies("C100", msg["ts"])[0]["text"] == "Final answer."  # plain text for notifications


def test_ignored_events_get_no_reply(start_bot, slack, socket_mode, gateway):
    start_bot()
    base = {"channel": "C100", "team": TEAM}
    ignored = [
        {"type": "message", "channel_type": "im", "channel": "D1", "user": BOT_USER, "bot_id": BOT_ID, "text": "my own", "ts": "1.1"},
        {"type": "message", "channel_type": "im", "channel": "D1", "user": "U9", "bot_id": "BOTHER", "text": "other bot", "ts": "1.2"},
        {"type": "message", "channel_type": "im", "channel": "D1", "subtype": "bot_message", "bot_id": "BOTHER", "text": "x", "ts": "1.3"},
        {"type": "message", "channel_type": "im", "channel": "D1", "subtype": "message_changed", "message": {"text": "edit"}, "ts": "1.4"},
        {"type": "message", "channel_type": "im", "channel": "D1", "subtype": "message_deleted", "ts": "1.5"},
        {"type": "message", "channel_type": "channel", "user": "U1", "text": "chatter without a mention", "ts": "1.6", **base},
        {"type": "message", "channel_type": "channel", "subtype": "channel_join", "user": "U1", "text": "joined", "ts": "1.7", **base},
        {"type": "reaction_added", "user": "U1", "reaction": "eyes", "item": {"type": "message", "channel": "C100", "ts": "1.6"}},
        {"type": "app_mention", "user": BOT_USER, "bot_id": BOT_ID, "text": f"<@{BOT_USER}> me", "ts": "1.8", **base},
        {"type": "app_mention", "text": "malformed: no user", "ts": "1.9", **base},
    ]
    acks = [socket_mode.send_event(event) for event in ignored]
    msg, last = mention(slack, socket_mode, "the only real question")
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    for eid in [*acks, last]:
        socket_mode.wait_ack(eid)
    assert len(gateway.requests) == 1
    assert all(not m.get("bot_id") for ch in ("D1",) for m in slack.messages.get(ch, []))


def test_malformed_event_is_logged_and_skipped(start_bot, slack, socket_mode, gateway, capsys):
    start_bot()
    bad = socket_mode.send_event({"type": "app_mention", "channel": ["not", "a", "string"], "user": "U1", "ts": "1.0"})
    socket_mode.wait_ack(bad)
    msg, _ = mention(slack, socket_mode, "still working?")
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    rejected = [line for line in log_lines(capsys.readouterr().out) if line["event"] == "event_rejected"]
    assert rejected and rejected[0]["reason"] == "malformed"


def test_mention_that_also_arrives_as_channel_message_is_answered_once(start_bot, slack, socket_mode, gateway):
    start_bot()
    msg, _ = mention(slack, socket_mode)
    socket_mode.send_event({"type": "message", "channel": "C100", "channel_type": "channel", "user": "U1",
                            "text": msg["text"], "ts": msg["ts"], "team": TEAM})
    # A DM with the same ts in another channel is a different message and must be answered.
    other = slack.add_message("D5", user="U1", text="different message")
    socket_mode.send_event({"type": "message", "channel": "D5", "channel_type": "im", "user": "U1",
                            "text": other["text"], "ts": other["ts"], "team": TEAM})
    replies(slack, "D5", other["ts"])
    replies(slack, "C100", msg["ts"])
    assert len(slack.bot_replies("C100", msg["ts"])) == 1
    assert len(gateway.requests) == 2


def test_redelivered_event_is_acked_and_answered_once(start_bot, slack, socket_mode, gateway):
    start_bot()
    msg, eid = mention(slack, socket_mode, event_id="Ev0REDELIVER")
    replies(slack, "C100", msg["ts"])
    again = socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                                    "ts": msg["ts"], "team": TEAM}, event_id="Ev0REDELIVER", retry_attempt=1)
    socket_mode.wait_ack(again)
    follow, _ = mention(slack, socket_mode, "next question")
    replies(slack, "C100", follow["ts"])
    assert len(slack.bot_replies("C100", msg["ts"])) == 1
    assert len(gateway.requests) == 2


def test_long_answer_arrives_whole_in_several_messages(start_bot, slack, socket_mode, gateway):
    start_bot()
    paragraphs = [f"Paragraph {i}: " + ("ledger lines " * 60).strip() for i in range(60)]  # ~47,000 characters
    answer = "\n\n".join(paragraphs)
    gateway.script(Script(text=answer, chunk_size=2000))
    msg, _ = mention(slack, socket_mode)
    texts = wait_for(lambda: (t := slack.reply_texts("C100", msg["ts"])) and "Paragraph 59" in t[-1] and t, 20,
                     "the whole answer")
    assert len(texts) >= 4
    assert all(len(t) <= 12_000 for t in texts)
    assert "\n\n".join(t.strip() for t in texts) == answer


# ── failures ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("script", "words", "outcome"),
    [
        (Script(status=500), "gateway is down", "gateway_error"),
        (Script(status=429, error_body={"error": {"message": "rate limit exceeded", "code": 429}}), "rate limiting",
         "rate_limited"),
        (Script(hang=3), "timed out", "timeout"),
        (Script(status=400, error_body={"error": {
            "message": "This model's maximum context length is 200000 tokens. However, your messages resulted in 250000 tokens.",
            "type": "invalid_request_error", "code": "context_length_exceeded"}}), "too long", "context_too_long"),
    ],
    ids=["500", "429", "timeout", "context"],
)
def test_gateway_failure_becomes_friendly_reply_and_next_question_works(
        start_bot, slack, socket_mode, gateway, capsys, script, words, outcome):
    start_bot(LEDGER_BOT_LLM_TIMEOUT_SECONDS="1")
    gateway.script(script)
    msg, _ = mention(slack, socket_mode)
    notice = replies(slack, "C100", msg["ts"])[0]
    assert words in notice, notice
    assert "Traceback" not in notice and "status" not in notice.lower()
    ref = notice.split("ref `")[1].split("`")[0]
    # The notice is posted before the answer's log line is written: wait for that line.
    seen: list[dict] = []

    def answer_logged():
        seen.extend(log_lines(capsys.readouterr().out))
        return [line for line in seen if line["event"] == "answer" and line.get("ref") == ref]

    assert wait_for(answer_logged, 5, f"the log line of {ref}")[-1]["outcome"] == outcome

    follow, _ = mention(slack, socket_mode, "and now?")
    assert replies(slack, "C100", follow["ts"]) == ["The answer is 42."]


def test_upstream_errors_are_left_to_the_gateway_but_a_short_retry_after_is_honoured(
        start_bot, slack, socket_mode, gateway):
    start_bot()
    gateway.script(Script(status=503))  # the gateway has retried upstream already: no stacking
    first, _ = mention(slack, socket_mode, "one")
    assert "gateway is down" in replies(slack, "C100", first["ts"])[0]
    assert len(gateway.requests) == 1
    gateway.script(Script(status=429, retry_after="1"))  # short: worth one more try
    second, _ = mention(slack, socket_mode, "two")
    assert replies(slack, "C100", second["ts"]) == ["The answer is 42."]
    assert len(gateway.requests) == 3


def test_full_queue_answers_busy_instead_of_dropping(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_WORKERS="1", LEDGER_BOT_QUEUE_SIZE="1")
    release = threading.Event()
    gateway.default = lambda body: Script(release=release)
    first, _ = mention(slack, socket_mode, "one")
    wait_for(lambda: gateway.requests, 10, "first question at the gateway")
    # One of these waits in the queue, the other finds no room. Slack's listener threads may
    # dispatch them in either order, so the test only fixes that exactly one is turned away.
    second, _ = mention(slack, socket_mode, "two")
    third, _ = mention(slack, socket_mode, "three")
    turned_away = wait_for(
        lambda: [m for m in (second, third) if any("busy" in t for t in slack.reply_texts("C100", m["ts"]))],
        10, "a busy reply")
    assert len(turned_away) == 1
    busy = slack.reply_texts("C100", turned_away[0]["ts"])[0]
    assert "try again in a minute" in busy and "ref `lb-" in busy
    waiting = second if turned_away[0] is third else third
    release.set()
    assert replies(slack, "C100", first["ts"]) == ["The answer is 42."]
    assert replies(slack, "C100", waiting["ts"]) == ["The answer is 42."]
    assert slack.reply_texts("C100", turned_away[0]["ts"]) == [busy]


def test_slack_429_on_stream_start_degrades_to_posting_without_sleeping(start_bot, slack, socket_mode, gateway):
    bot = start_bot()
    slack.fail("chat.startStream", error="ratelimited", status=429, headers={"Retry-After": "30"})
    msg, _ = mention(slack, socket_mode)
    started = time.monotonic()
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    assert time.monotonic() - started < 10  # nobody slept on the 30 s Retry-After
    assert len(slack.calls_to("chat.startStream")) == 1
    assert "ledger_bot_slack_rate_limited_total{method=\"chat.startStream\"} 1.0" in bot.get("/metrics")[1]


def test_acks_stay_under_a_second_while_20_slow_answers_are_in_flight(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_WORKERS="20")
    release = threading.Event()
    gateway.default = lambda body: Script(release=release, chunk_delay=0.01)
    # Different channels: in one channel Slack's one-post-per-second limit would serialise them.
    first = [mention(slack, socket_mode, f"question {i}", channel=f"C1{i:02d}")[0] for i in range(20)]
    wait_for(lambda: len(gateway.requests) >= 20, 20, "20 questions at the gateway")
    late = [mention(slack, socket_mode, f"late {i}", channel=f"C2{i:02d}") for i in range(10)]
    ack_times = [socket_mode.wait_ack(eid) for _, eid in late]
    assert max(ack_times) < 1.0, ack_times
    release.set()
    for i, msg in enumerate(first):
        replies(slack, f"C1{i:02d}", msg["ts"], timeout=30)
    for i, (msg, _) in enumerate(late):
        replies(slack, f"C2{i:02d}", msg["ts"], timeout=30)


# ── connection and lifecycle ─────────────────────────────────────────────────────────────


def test_disconnect_envelope_is_survived(start_bot, slack, socket_mode, gateway):
    start_bot()
    socket_mode.send_disconnect()
    socket_mode.wait_connected(total=2)
    msg, _ = mention(slack, socket_mode, "after reconnect")
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]


def test_failed_first_connect_is_retried_and_probes_say_why(start_bot, slack, socket_mode, gateway):
    slack.fail("apps.connections.open", error="internal_error", times=2)
    bot = start_bot(wait_ready=False)
    wait_for(lambda: bot.get("/health")[0] == 200, 5, "/health 200 while not connected")
    status, body = bot.get("/ready")
    assert status == 503 and json.loads(body)["status"] == "not_ready"
    bot.wait_ready(timeout=20)
    assert len(slack.calls_to("apps.connections.open")) == 3
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    bot.stop_event.set()
    wait_for(lambda: bot.get("/ready")[0] in (0, 503), 5, "/ready 503 after stop")


def test_stop_finishes_the_answer_in_flight(start_bot, slack, socket_mode, gateway):
    bot = start_bot()
    gateway.script(Script(text="Answered during shutdown.", first_token_delay=1.5))
    msg, _ = mention(slack, socket_mode)
    wait_for(lambda: gateway.requests, 10, "question at the gateway")
    bot.stop_event.set()
    assert bot.stop() == 0
    assert slack.reply_texts("C100", msg["ts"]) == ["Answered during shutdown."]


def test_stop_closes_the_socket_at_once_so_new_events_go_elsewhere(start_bot, slack, socket_mode, gateway):
    bot = start_bot()
    release = threading.Event()
    gateway.script(Script(text="Finished after the socket closed.", release=release))
    msg, _ = mention(slack, socket_mode)
    wait_for(lambda: gateway.requests, 10, "question at the gateway")
    bot.stop_event.set()
    wait_for(lambda: bot.get("/ready")[0] == 503, 5, "/ready 503")
    wait_for(lambda: not socket_mode.live(), 5, "socket closed while the answer is still in flight")
    assert slack.bot_replies("C100", msg["ts"]) == []
    release.set()
    assert bot.stop() == 0
    assert slack.reply_texts("C100", msg["ts"]) == ["Finished after the socket closed."]


# ── the gateway as it really answers (issue 11) ──────────────────────────────────────────


def answer_lines(out: str) -> list[dict]:
    return [line for line in log_lines(out) if line["event"] == "answer"]


@pytest.mark.parametrize(("script", "overrides", "outcome", "notice"), [
    (Script(status=429, retry_after="60"), {}, "rate_limited", "rate limiting me"),
    (Script(status=400, error_body=None), {"LITELLM_DEVELOPER_KEY": "sk-litellm-WRONGKEY1"}, "gateway_auth_error",
     "misconfigured"),
    (Script(), {"LEDGER_BOT_MODEL": "no-such-alias"}, "gateway_config_error", "misconfigured"),
    (Script(status=422, error_body=__import__("fakes").BUDGET_EXCEEDED), {}, "gateway_budget_exhausted",
     "budget is spent"),
    (Script(status=400, error_body={"error": {"message": "prompt is too long: 210000 tokens > 200000 maximum",
                                              "type": "invalid_request_error", "code": "400"}}),
     {}, "context_too_long", "too long"),
    (Script(status=400, error_body={"error": {"message": "Output blocked by content filtering policy",
                                              "type": "content_filter", "code": "400"}}),
     {}, "content_policy", "declined"),
])
def test_gateway_failures_each_get_their_own_outcome_and_notice(start_bot, slack, socket_mode, gateway, capsys,
                                                               script, overrides, outcome, notice):
    start_bot(**overrides)
    gateway.script(script)
    msg, _ = mention(slack, socket_mode)
    started = time.monotonic()
    shown = replies(slack, "C100", msg["ts"])[-1]
    assert notice in shown and "(ref `lb-" in shown
    assert time.monotonic() - started < 5  # no Retry-After sleep, no stacked retries
    assert len(gateway.requests) == 1
    line = wait_for(lambda: answer_lines(capsys.readouterr().out), 5, "the answer line")[0]
    assert line["outcome"] == outcome
    assert line["level"] == ("error" if outcome in ("gateway_auth_error", "gateway_config_error",
                                                    "gateway_budget_exhausted") else line["level"])


def test_slow_first_token_times_out_within_the_setting_and_is_not_retried(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_LLM_TIMEOUT_SECONDS="2")
    gateway.script(Script(first_token_delay=20))
    msg, _ = mention(slack, socket_mode)
    started = time.monotonic()
    assert "took too long" in replies(slack, "C100", msg["ts"], timeout=20)[0]
    assert time.monotonic() - started <= 2 + 5
    assert len(gateway.requests) == 1  # a read timeout is never retried: the model may be generating


def test_mid_stream_error_event_keeps_its_type_and_counts_the_partial_answer(start_bot, slack, socket_mode, gateway,
                                                                             capsys):
    start_bot()
    gateway.script(Script(text="Partial answer that goes on " * 5, chunk_size=20, error_after_chunks=3,
                          error_event={"message": "Rate limit reached", "type": "rate_limit_error", "code": "429"}))
    msg, _ = mention(slack, socket_mode)
    shown = wait_for(lambda: (r := replies(slack, "C100", msg["ts"])) and "rate limiting" in r[-1] and r, 15,
                     "the rate-limit notice after the partial text")
    assert shown[-1].startswith("Partial answer that goes on")
    line = wait_for(lambda: answer_lines(capsys.readouterr().out), 5, "the answer line")[0]
    assert line["outcome"] == "rate_limited"
    assert line["tokens"]["estimated"] is True and line["tokens"]["completion"] > 0 and line["cost_usd"] > 0


def test_gateway_is_told_who_asked_without_slack_ids_and_tagged(start_bot, slack, socket_mode, gateway):
    start_bot()
    for _ in range(2):
        msg, _ = mention(slack, socket_mode, user="U42")
        replies(slack, "C100", msg["ts"])
    first, second = (r.body for r in gateway.requests)
    assert first["user"] == second["user"] and first["user"].startswith("lb-")
    assert "U42" not in first["user"] and TEAM not in first["user"]
    assert first["metadata"]["tags"] == ["ledger-bot", "env:local"]


def test_gateway_spend_is_tagged_with_the_environment(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_ENVIRONMENT="staging")
    msg, _ = mention(slack, socket_mode)
    replies(slack, "C100", msg["ts"])
    assert gateway.requests[0].body["metadata"]["tags"] == ["ledger-bot", "env:staging"]


def test_the_main_thread_returns_free_memory_to_the_os_while_it_waits(start_bot, monkeypatch):
    import ledger_bot as lb

    trims: list[str] = []
    monkeypatch.setattr(lb, "TRIM_EVERY_SECONDS", 0.05)
    monkeypatch.setattr(lb, "release_free_memory", lambda: trims.append(threading.current_thread().name))
    bot = start_bot()
    wait_for(lambda: len(trims) >= 3, 10, "three trims")
    assert set(trims) == {"bot-main"}  # the thread main() runs on, never a worker
    assert bot.stop() == 0


def test_objects_alive_at_start_up_are_frozen_out_of_garbage_collection(start_bot):
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    start_bot()
    # litellm's import alone is ~380,000 objects; a full collection walking them took ~270 ms.
    assert gc.get_freeze_count() > 100_000


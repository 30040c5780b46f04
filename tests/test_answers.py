"""Answers that feel native in Slack: streaming, fallbacks, long answers, knowledge, options,
limits and metrics, through the fakes."""

from __future__ import annotations

import json
import threading

import pytest
from fakes import BOT_USER, TEAM, Script, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_bot import log_lines, mention, replies


def metrics(bot) -> dict[tuple[str, tuple], float]:
    status, body = bot.get("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def answers(bot, outcome):
    return metrics(bot).get(("ledger_bot_answers_total", (("outcome", outcome),)), 0.0)


# ── streaming ────────────────────────────────────────────────────────────────────────────


def test_streamed_answer_arrives_whole_and_in_order_with_time_based_flushes(start_bot, slack, socket_mode, gateway,
                                                                           tune):
    tune(STREAM_FLUSH_CHARS=100_000, STREAM_FLUSH_SECONDS=0.2)
    start_bot()
    text = " ".join(f"word{i}" for i in range(40))
    gateway.script(Script(text=text, chunk_size=10, chunk_delay=0.05))
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == [text]
    start = slack.calls_to("chat.startStream")
    appends = slack.calls_to("chat.appendStream")
    # The buffer never fills (100,000 chars), so every append is a time-based flush.
    assert len(start) == 1 and len(appends) >= 3
    assert start[0].params["recipient_user_id"] == "U1" and start[0].params["recipient_team_id"] == TEAM
    stop = slack.calls_to("chat.stopStream")[0].params
    assert stop["blocks"][0]["type"] == "context_actions"
    assert stop["blocks"][0]["elements"][0]["type"] == "feedback_buttons"
    assert stop["metadata"]["event_type"] == "ledger_bot_answer"


def test_text_buffered_when_the_model_goes_quiet_is_shown_without_waiting_for_more(
        start_bot, slack, socket_mode, gateway, tune):
    tune(STREAM_FLUSH_CHARS=100_000, STREAM_FLUSH_SECONDS=0.3)
    start_bot()
    release = threading.Event()
    gateway.script(Script(text="first second third fourth", chunk_size=6, pause_after_chunks=3, pause=30))
    gateway.shutdown = release  # the pause ends when the test says so
    msg, _ = mention(slack, socket_mode)
    # The first chunk is shown at once; the next two arrive right after it and sit in the
    # buffer while the model is quiet. They must appear well before the model speaks again.
    wait_for(lambda: slack.reply_texts("C100", msg["ts"]) == ["first second third"], 5, "buffered text shown")
    release.set()
    assert replies(slack, "C100", msg["ts"]) == ["first second third fourth"]


def test_answer_that_repeats_a_chunk_many_times_arrives_whole(start_bot, slack, socket_mode, gateway):
    # A Markdown table separator streams as the same chunk over and over; litellm's stream
    # wrapper would take that for a stuck model and raise.
    table = "| account | balance |\n" + "|---" * 150 + "|\n| 1000 | 5.00 |"
    gateway.script(Script(text=table, chunk_size=4))
    start_bot()
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == [table]


def test_stream_that_dies_halfway_finishes_by_update_with_nothing_lost_or_doubled(start_bot, slack, socket_mode, gateway,
                                                                                  tune):
    tune(STREAM_FLUSH_CHARS=20, STREAM_FLUSH_SECONDS=5)
    start_bot()
    first_half = "First half of the answer, streamed. " * 3
    second_half = "Second half, after the stream expired."
    gateway.script(Script(text=first_half + second_half, chunk_size=len(first_half)))
    # Kill the stream after the first append, as Slack does after ~5 minutes.
    slack.fail("chat.appendStream", error="message_not_in_streaming_state", times=5)
    msg, _ = mention(slack, socket_mode)
    # The message shows the first half as finished before the update lands: wait for the update.
    wait_for(lambda: slack.calls_to("chat.update"), 15, "the answer finished by chat.update")
    texts = replies(slack, "C100", msg["ts"])
    assert texts == [first_half + second_half]  # one message, the whole text, nothing doubled
    assert len(slack.calls_to("chat.startStream")) == 1 and slack.calls_to("chat.update")


def test_gateway_dropping_mid_answer_ends_the_stream_with_a_notice_not_a_spinner(start_bot, slack, socket_mode, gateway,
                                                                                  tune):
    tune(STREAM_FLUSH_CHARS=1)
    start_bot()
    gateway.script(Script(text="Partial answer that gets cut off here", chunk_size=8, cut_after_chunks=2))
    msg, _ = mention(slack, socket_mode)
    texts = replies(slack, "C100", msg["ts"])
    assert len(texts) == 1 and texts[0].startswith("Partial answer ")
    assert "gateway is down or returned an error" in texts[0] and "ref `lb-" in texts[0]
    stop = slack.calls_to("chat.stopStream")[0].params
    assert stop["metadata"]["event_type"] == "ledger_bot_notice" and "blocks" not in stop


def test_stream_refused_from_the_start_falls_back_to_posting(start_bot, slack, socket_mode, gateway):
    start_bot()
    slack.fail("chat.startStream", error="method_not_supported_for_channel_type", times=10)
    gateway.script(Script(text="Posted instead of streamed."))
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == ["Posted instead of streamed."]
    posted = slack.bot_replies("C100", msg["ts"])[0]
    assert posted["blocks"][0] == {"type": "markdown", "text": "Posted instead of streamed."}
    assert posted["text"] == "Posted instead of streamed."
    assert posted["blocks"][1]["type"] == "context_actions"


def test_long_streamed_answer_with_code_rolls_over_within_limits(start_bot, slack, socket_mode, gateway, tune):
    tune(STREAM_FLUSH_CHARS=3000)
    start_bot()
    block = "```sql\n" + "\n".join(f"select {i} from gl_je_lines;" for i in range(300)) + "\n```\n\n"
    answer = "Here are the queries.\n\n" + block * 4 + "Done."
    assert len(answer) > 30_000
    gateway.script(Script(text=answer, chunk_size=1000))
    msg, _ = mention(slack, socket_mode)
    texts = wait_for(lambda: (t := replies(slack, "C100", msg["ts"])) and t[-1].endswith("Done.") and t, 30,
                     "the whole answer")
    assert len(texts) >= 3 and all(len(t) <= 12_000 for t in texts)
    assert all(t.count("```") % 2 == 0 for t in texts)
    strip = [ln for t in texts for ln in t.split("\n") if not ln.startswith("```") and ln]
    assert strip == [ln for ln in answer.split("\n") if not ln.startswith("```") and ln]


def test_streaming_off_posts_markdown_blocks(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_STREAMING="false", LEDGER_BOT_FEEDBACK="false")
    gateway.script(Script(text="**Bold** and `code`"))
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == ["**Bold** and `code`"]
    posted = slack.bot_replies("C100", msg["ts"])[0]
    assert posted["blocks"] == [{"type": "markdown", "text": "**Bold** and `code`"}]
    assert slack.calls_to("chat.startStream") == []


# ── knowledge ────────────────────────────────────────────────────────────────────────────


def system_text(request) -> tuple[str, list]:
    content = request.body["messages"][0]["content"]
    return json.dumps(content, ensure_ascii=False), content


def test_small_knowledge_is_sent_whole_marked_for_caching(start_bot, slack, socket_mode, gateway):
    start_bot()
    msg, _ = mention(slack, socket_mode)
    replies(slack, "C100", msg["ts"])
    _, content = system_text(gateway.requests[0])
    assert content[1]["cache_control"] == {"type": "ephemeral"}
    assert 'source="ledger-bot.md § ledger-bot > Reporting a bad answer"' in content[1]["text"]


def test_large_knowledge_sends_only_relevant_sections(start_bot, slack, socket_mode, gateway, tmp_path, tune):
    (tmp_path / "journals.md").write_text("# Journal import\n" + "The journal import reads GL_INTERFACE rows. " * 40)
    (tmp_path / "fx.md").write_text("# FX revaluation\n" + "Revaluation runs at month end with the corporate rate. " * 40)
    (tmp_path / "filler.txt").write_text("# Filler\n" + "unrelated cafeteria menu text " * 4000)
    tune(context_tokens=lambda model: 8192, KNOWLEDGE_SHARE=0.3)
    start_bot(LEDGER_BOT_KNOWLEDGE=str(tmp_path))
    msg, _ = mention(slack, socket_mode, "why does the journal import skip GL_INTERFACE rows?")
    replies(slack, "C100", msg["ts"])
    text, content = system_text(gateway.requests[0])
    assert "journals.md § Journal import" in text
    assert "filler.txt" not in text and "cafeteria" not in text
    assert "cache_control" not in content[1]


def test_question_too_long_for_the_model_is_refused_without_calling_it(start_bot, slack, socket_mode, gateway, tune):
    tune(context_tokens=lambda model: 4096, ANSWER_MAX_TOKENS=256, HISTORY_MAX_CHARS=1_000_000)
    start_bot()
    msg, _ = mention(slack, socket_mode, "ledger " * 6000)
    notice = replies(slack, "C100", msg["ts"])[0]
    assert "too long" in notice and gateway.requests == []


# ── options ──────────────────────────────────────────────────────────────────────────────


def test_follow_ups_in_a_thread_started_with_a_mention_are_answered(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_FOLLOW_UPS="true")
    root, _ = mention(slack, socket_mode, "first question")
    replies(slack, "C100", root["ts"])
    follow = slack.add_message("C100", user="U1", text="and a follow-up without a mention", thread_ts=root["ts"])
    socket_mode.send_event({"type": "message", "channel": "C100", "channel_type": "channel", "user": "U1",
                            "text": follow["text"], "ts": follow["ts"], "thread_ts": root["ts"], "team": TEAM})
    replies(slack, "C100", root["ts"], n=2)
    assert gateway.requests[-1].body["messages"][-1]["content"].endswith("<@U1>: and a follow-up without a mention")
    # A thread the bot was never mentioned in stays quiet.
    other = slack.add_message("C100", user="U3", text="people talking")
    reply = slack.add_message("C100", user="U4", text="among themselves", thread_ts=other["ts"])
    eid = socket_mode.send_event({"type": "message", "channel": "C100", "channel_type": "channel", "user": "U4",
                                  "text": reply["text"], "ts": reply["ts"], "thread_ts": other["ts"], "team": TEAM})
    socket_mode.wait_ack(eid)
    wait_for(lambda: len(slack.calls_to("conversations.replies")) >= 2, 5, "the root check")
    check, _ = mention(slack, socket_mode, "sync point")
    replies(slack, "C100", check["ts"])
    assert slack.bot_replies("C100", other["ts"]) == [] and len(gateway.requests) == 3


def test_allow_list_says_once_that_it_is_not_enabled_here(start_bot, slack, socket_mode, gateway):
    bot = start_bot(LEDGER_BOT_ALLOWED_CHANNELS="C100")
    first, _ = mention(slack, socket_mode, "hello?", channel="C999")
    notice = replies(slack, "C999", first["ts"])[0]
    assert "not enabled here" in notice
    second, eid = mention(slack, socket_mode, "hello again?", channel="C999")
    socket_mode.wait_ack(eid)
    allowed, _ = mention(slack, socket_mode, "in the right channel")
    assert replies(slack, "C100", allowed["ts"]) == ["The answer is 42."]
    assert slack.bot_replies("C999", second["ts"]) == []
    assert len(gateway.requests) == 1 and answers(bot, "not_allowed") == 2


def test_feedback_click_is_logged_with_ref_and_thanked_ephemerally(start_bot, slack, socket_mode, gateway, capsys):
    bot = start_bot()
    before = metrics(bot).get(("ledger_bot_feedback_total", (("value", "down"),)), 0.0)
    msg, _ = mention(slack, socket_mode)
    replies(slack, "C100", msg["ts"])
    buttons = slack.calls_to("chat.stopStream")[0].params["blocks"][0]["elements"][0]
    down = buttons["negative_button"]["value"]
    vote, _, ref = down.partition(":")

    def click(value):
        return socket_mode.send_block_action({
            "type": "block_actions", "user": {"id": "U1"}, "channel": {"id": "C100"},
            "message": {"ts": "1.0", "thread_ts": msg["ts"]},
            "actions": [{"action_id": "feedback", "value": value, "type": "feedback_buttons"}]})

    eid = click(down)
    socket_mode.wait_ack(eid)
    wait_for(lambda: slack.calls_to("chat.postEphemeral"), 5, "ephemeral thanks")
    thanks = slack.calls_to("chat.postEphemeral")[0].params
    assert thanks["user"] == "U1" and "Thanks" in thanks["text"]
    feedback = [line for line in log_lines(capsys.readouterr().out) if line["event"] == "feedback"]
    assert vote == "down" and feedback == [{**feedback[0], "ref": ref, "value": "down", "user": "U1"}]
    assert metrics(bot)[("ledger_bot_feedback_total", (("value", "down"),))] == before + 1
    # One vote per person per answer: the same click again counts nothing, a change is logged.
    socket_mode.wait_ack(click(down))
    socket_mode.wait_ack(click(buttons["positive_button"]["value"]))
    changed = wait_for(lambda: [line for line in log_lines(capsys.readouterr().out) if line["event"] == "feedback"],
                       5, "the changed vote logged")
    assert [(line["value"], line["changed_from"]) for line in changed] == [("up", "down")]
    assert metrics(bot)[("ledger_bot_feedback_total", (("value", "down"),))] == before + 1
    assert len(slack.calls_to("chat.postEphemeral")) == 1


# ── limits and metrics ───────────────────────────────────────────────────────────────────


def test_rate_limited_user_gets_one_friendly_reply(start_bot, slack, socket_mode, gateway, tune):
    tune(USER_RATE_WINDOW_SECONDS=600)
    bot = start_bot(LEDGER_BOT_USER_RATE_LIMIT="1")
    first, _ = mention(slack, socket_mode, "one")
    replies(slack, "C100", first["ts"])
    second, _ = mention(slack, socket_mode, "two")
    notice = replies(slack, "C100", second["ts"])[0]
    assert "Please try again in 10 minutes" in notice
    assert len(gateway.requests) == 1 and answers(bot, "user_rate_limited") >= 1


def test_spent_daily_budget_is_announced_politely(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_USER_DAILY_BUDGET_USD="0.001")
    gateway.script(Script(prompt_tokens=1000, completion_tokens=100))  # $0.0045 at Sonnet prices
    first, _ = mention(slack, socket_mode, "one")
    replies(slack, "C100", first["ts"])
    second, _ = mention(slack, socket_mode, "two")
    assert "per-person LLM budget" in replies(slack, "C100", second["ts"])[0]
    assert len(gateway.requests) == 1


def test_metrics_move_across_a_session(start_bot, slack, socket_mode, gateway):
    bot = start_bot()
    m0 = metrics(bot)
    assert m0[("ledger_bot_socket_connected", ())] == 1
    assert any(name == "ledger_bot_build_info" for name, _ in m0)
    gateway.script(Script(prompt_tokens=1000, completion_tokens=200), Script(status=500))
    ok, eid = mention(slack, socket_mode, "one")
    replies(slack, "C100", ok["ts"])
    socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": ok["text"], "ts": ok["ts"],
                            "team": TEAM})  # a duplicate
    bad, _ = mention(slack, socket_mode, "two")
    replies(slack, "C100", bad["ts"])
    socket_mode.send_disconnect()
    socket_mode.wait_connected(total=2)
    wait_for(lambda: metrics(bot)[("ledger_bot_socket_connected", ())] == 1, 10, "reconnected")
    m1 = metrics(bot)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0) - m0.get(key, 0)

    assert delta("ledger_bot_answers_total", outcome="ok") == 1
    assert delta("ledger_bot_answers_total", outcome="gateway_error") == 1
    assert delta("ledger_bot_events_total", type="app_mention", outcome="accepted") == 2
    assert delta("ledger_bot_events_total", type="app_mention", outcome="duplicate") == 1
    assert delta("ledger_bot_llm_tokens_total", kind="prompt") == 1000
    assert delta("ledger_bot_llm_cost_usd_total") == pytest.approx(1000 * 3e-6 + 200 * 15e-6)
    assert delta("ledger_bot_socket_reconnects_total") == 1
    assert delta("ledger_bot_answer_duration_seconds_count") == 2
    assert delta("ledger_bot_first_feedback_seconds_count") == 2
    assert delta("ledger_bot_first_token_seconds_count") >= 1
    assert delta("ledger_bot_ack_latency_seconds_count") >= 3
    assert BOT_USER  # the fakes' bot identity is what the bot learned from auth.test

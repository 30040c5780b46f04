"""The bot against a Slack as strict as the real one: the Stop button, streams never left open,
rate tiers, half-open sockets, revoked tokens, crowd mentions, big frames (issue 10)."""

from __future__ import annotations

import json
import threading
import time

from fakes import BOT_USER, TEAM, Script, wait_for
from test_bot import log_lines, mention, replies


def test_stop_button_means_stopped_nothing_more_is_posted_and_the_gateway_stream_is_closed(
        start_bot, slack, socket_mode, gateway, capsys, tune):
    tune(STREAM_FLUSH_CHARS=10, STREAM_FLUSH_SECONDS=0.05)
    bot = start_bot()
    gateway.script(Script(text="A long answer " * 200, chunk_size=14, chunk_delay=0.02))
    msg, _ = mention(slack, socket_mode)
    stream = wait_for(lambda: slack.calls_to("chat.startStream") and slack.bot_replies("C100", msg["ts"]), 10,
                      "the stream to start")[0]
    slack.press_stop(stream["ts"])
    line = wait_for(lambda: [x for x in log_lines(capsys.readouterr().out) if x["event"] == "answer"], 10,
                    "the answer line")[0]
    assert line["outcome"] == "stopped_by_user"
    shown = slack.bot_replies("C100", msg["ts"])
    assert len(shown) == 1 and len(slack.shown_text(shown[0])) < len("A long answer " * 200)
    assert not slack.calls_to("chat.update") and not slack.calls_to("chat.postMessage")
    assert 'ledger_bot_answers_total{outcome="stopped_by_user"} 1.0' in bot.get("/metrics")[1]


def test_a_stream_that_fails_mid_way_is_stopped_before_it_is_updated(start_bot, slack, socket_mode, gateway, tune):
    tune(STREAM_FLUSH_CHARS=10)
    start_bot()
    slack.fail("chat.appendStream", error="internal_error", times=50)
    gateway.script(Script(text="Never left streaming, never doubled.", chunk_size=6, chunk_delay=0.02))
    msg, _ = mention(slack, socket_mode)
    wait_for(lambda: slack.reply_texts("C100", msg["ts"]) == ["Never left streaming, never doubled."], 15,
             "the whole answer in one message")
    methods = [c.method for c in slack.calls if c.method.startswith("chat.")]
    # chat.update on a streaming message fails streaming_state_conflict: the stop comes first.
    assert methods.index("chat.stopStream") < methods.index("chat.update")
    assert not any(m.get("streaming") for m in slack.bot_replies("C100", msg["ts"]))


def test_twenty_answers_at_once_stay_inside_the_tiers_and_arrive_whole(start_bot, slack, socket_mode, gateway,
                                                                       tune):
    tune(STREAM_FLUSH_CHARS=50, STREAM_FLUSH_SECONDS=0.05,
         SLACK_RATE_TIERS={"chat.startStream": 8, "chat.appendStream": 30, "chat.stopStream": 8})
    start_bot(LEDGER_BOT_WORKERS="20", LEDGER_BOT_SLACK_RATE_SHARE="1")
    slack.tiers.update({"chat.startStream": 8, "chat.appendStream": 30, "chat.stopStream": 8})
    texts = {i: f"Answer {i}: " + " ".join(f"w{i}-{j}" for j in range(120)) for i in range(20)}
    gateway.default = lambda body: Script(text=texts[int(body["messages"][-1]["content"].split("#")[1])],
                                          chunk_size=25, chunk_delay=0.01)
    asked = [mention(slack, socket_mode, f"question #{i}", user=f"U{i}")[0] for i in range(20)]
    for i, msg in enumerate(asked):
        assert "".join(replies(slack, "C100", msg["ts"], timeout=60)) == texts[i]
    assert slack.rate_limited == []  # no 429 ever reached the bot
    assert len(slack.calls_to("chat.startStream")) <= 8  # the rest degraded to posting


def test_a_half_open_connection_is_detected_and_replaced(start_bot, slack, socket_mode, gateway, capsys):
    bot = start_bot()
    socket_mode.go_silent()
    started = time.monotonic()
    wait_for(lambda: bot.get("/ready")[0] == 503, 15, "/ready 503 once the link is dead")
    assert time.monotonic() - started <= 15
    socket_mode.wait_connected(total=2, timeout=20)
    wait_for(lambda: bot.get("/ready")[0] == 200, 15, "/ready 200 after a new hello")
    events = [x["event"] for x in log_lines(capsys.readouterr().out)]
    assert "slack_connection_dead" in events and events.count("slack_connected") == 2
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]


def test_reconnect_refused_by_slack_is_retried_and_ready_stays_503_until_hello(start_bot, slack, socket_mode,
                                                                               gateway, capsys):
    bot = start_bot()
    slack.fail("apps.connections.open", error="internal_error", status=500, times=2)
    socket_mode.send_disconnect()
    wait_for(lambda: bot.get("/ready")[0] == 503, 5, "/ready 503 after disconnect")
    socket_mode.wait_connected(total=2, timeout=30)
    wait_for(lambda: bot.get("/ready")[0] == 200, 10, "/ready 200 after the retried reconnect")
    assert len(slack.calls_to("apps.connections.open")) >= 3


def test_token_revoked_while_running_exits_1_naming_the_token(start_bot, slack, socket_mode, gateway, capsys):
    bot = start_bot()
    slack.revoke()
    mention(slack, socket_mode)
    wait_for(lambda: not bot.thread.is_alive(), 30, "the bot to exit")
    assert bot.result["exit"] == 1
    failed = [x for x in log_lines(capsys.readouterr().out) if x["event"] == "slack_auth_failed"]
    assert len(failed) == 1 and failed[0]["token"] == "SLACK_BOT_TOKEN" and failed[0]["error"] == "token_revoked"
    assert failed[0]["level"] == "error"


def test_app_token_revoked_during_a_reconnect_exits_1(start_bot, slack, socket_mode, gateway, capsys):
    bot = start_bot()
    slack.revoke()
    socket_mode.send_disconnect()
    wait_for(lambda: not bot.thread.is_alive(), 30, "the bot to exit")
    assert bot.result["exit"] == 1
    failed = [x for x in log_lines(capsys.readouterr().out) if x["event"] == "slack_auth_failed"]
    assert [(x["token"], x["error"]) for x in failed] == [("SLACK_APP_TOKEN", "invalid_auth")]


def test_nothing_the_bot_posts_pings_a_crowd(start_bot, slack, socket_mode, gateway):
    start_bot()
    gateway.script(Script(text="Heads up <!here> and <!channel|channel>, also @everyone and <!subteam^S123|@gl-team>.",
                          chunk_size=5))
    msg, _ = mention(slack, socket_mode)
    shown = replies(slack, "C100", msg["ts"])[0]
    for loud in ("<!here>", "<!channel", "<!subteam", "@everyone"):
        assert loud not in shown
    assert "@\u2060here" in shown and "@\u2060gl-team" in shown
    sent = json.dumps([c.params for c in slack.calls if c.method.startswith("chat.")])
    assert "<!here>" not in sent and "<!subteam" not in sent


def test_a_frame_over_a_megabyte_is_acked_and_its_text_never_logged_above_debug(start_bot, slack, socket_mode,
                                                                                gateway, capsys):
    start_bot()
    huge = "journal line " * 100_000  # ~1.3 MB
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> {huge}")
    eid = socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                                  "ts": msg["ts"], "team": TEAM})
    socket_mode.wait_ack(eid, timeout=10)
    assert replies(slack, "C100", msg["ts"], timeout=30)  # answered or refused as too long: not lost
    out = capsys.readouterr().out
    assert "journal line journal line" not in out


def test_status_carries_ledger_loading_messages(start_bot, slack, socket_mode, gateway):
    start_bot()
    release = threading.Event()
    gateway.script(Script(release=release))
    mention(slack, socket_mode)
    status = wait_for(lambda: slack.calls_to("assistant.threads.setStatus"), 5, "status")[0].params
    release.set()
    assert status["loading_messages"] and all(isinstance(m, str) for m in status["loading_messages"])

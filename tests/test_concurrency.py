"""The concurrent edge (issue 9): races and faults found by review and by a fault/fuzz probe,
each through the real SocketModeClient and the fakes, asserting on what people would see."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading

import pytest
from fakes import BOT_USER, TEAM, Script, wait_for
from test_bot import log_lines, mention, replies

import ledger_bot as lb


def channel_reply(slack, socket_mode, *, thread_ts, text, user="U5", event_id=None):
    """A person replies in a channel thread (a ``message`` event, as Slack sends it)."""
    msg = slack.add_message("C100", user=user, text=text, thread_ts=thread_ts)
    socket_mode.send_event({"type": "message", "channel": "C100", "channel_type": "channel", "user": user,
                            "text": text, "ts": msg["ts"], "thread_ts": thread_ts, "team": TEAM}, event_id=event_id)
    return msg


def test_followups_in_a_thread_that_never_mentioned_the_bot_stay_private_even_while_checking(
        start_bot, slack, socket_mode, gateway, capsys):
    start_bot(LEDGER_BOT_FOLLOW_UPS="true", LOG_LEVEL="DEBUG")
    slack.delay("conversations.replies", 0.5)  # the root check is slow: the other replies race it
    root = slack.add_message("C100", user="U1", text="payroll numbers for the team, do not share")
    for text in ("first private reply", "second private reply", "third private reply"):
        channel_reply(slack, socket_mode, thread_ts=root["ts"], text=text)
    ignored = []
    wait_for(lambda: len(ignored.__iadd__([x for x in log_lines(capsys.readouterr().out)
                                            if x["event"] == "followup_ignored"]) or ignored) == 3,
             15, "all three replies judged")
    assert len(slack.calls_to("conversations.replies")) == 1  # one check per thread
    assert gateway.requests == [] and slack.bot_replies("C100", root["ts"]) == []


def test_followups_in_the_bots_thread_are_answered(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_FOLLOW_UPS="true")
    root, _ = mention(slack, socket_mode, "what is a journal source?")
    replies(slack, "C100", root["ts"])
    channel_reply(slack, socket_mode, thread_ts=root["ts"], text="and a category?")
    assert replies(slack, "C100", root["ts"], n=2)[-1] == "The answer is 42."


def test_the_ack_uses_the_top_level_envelope_id_and_unackable_envelopes_are_not_answered(
        start_bot, slack, socket_mode, gateway):
    start_bot()
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> nested ids?")
    event = {"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"], "ts": msg["ts"],
             "team": TEAM}
    # A nested "envelope_id" comes first in the text of the frame; the top-level one is the real one.
    socket_mode.send_raw(f'{{"payload": {{"event_id": "EvNEST", "envelope_id": "nested-decoy", "team_id": "{TEAM}", '
                         f'"event": {json.dumps(event)}}}, "type": "events_api", "envelope_id": "top-level-id", '
                         '"accepts_response_payload": false}')
    wait_for(lambda: "top-level-id" in socket_mode.acks, 5, "the top-level id acked")
    assert "nested-decoy" not in socket_mode.acks
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    for odd_id in (12345, ""):
        other = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> id {odd_id!r}")
        socket_mode.send({"type": "events_api", "envelope_id": odd_id, "accepts_response_payload": False,
                          "payload": {"event_id": f"Ev{odd_id}x", "team_id": TEAM,
                                      "event": {**event, "text": other["text"], "ts": other["ts"]}}})
    answered = len(gateway.requests)
    mention(slack, socket_mode, "a normal one after them")
    wait_for(lambda: len(gateway.requests) == answered + 1, 10, "the next normal question")
    assert answered == 1  # neither odd envelope was answered: Slack will redeliver them


def test_events_without_an_event_id_are_not_mistaken_for_duplicates(start_bot, slack, socket_mode, gateway):
    start_bot()
    asked = []
    for text in ("first without id", "second without id"):
        msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> {text}")
        socket_mode.send({"type": "events_api", "accepts_response_payload": False, "payload": {
            "team_id": TEAM, "event": {"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                                       "ts": msg["ts"], "team": TEAM}}})
        asked.append(msg)
    for msg in asked:
        assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]


def test_a_lone_surrogate_in_a_message_is_answered_and_logs_cleanly(start_bot, slack, socket_mode, gateway,
                                                                    capfd):
    start_bot()
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> broken \ud800 emoji?")
    socket_mode.send_raw(json.dumps({"type": "events_api", "envelope_id": "env-surrogate",
                                     "accepts_response_payload": False,
                                     "payload": {"event_id": "EvSUR", "team_id": TEAM, "event": {
                                         "type": "app_mention", "channel": "C100", "user": "U1",
                                         "text": msg["text"], "ts": msg["ts"], "team": TEAM}}}))
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    assert "\ufffd" in gateway.requests[0].body["messages"][-1]["content"]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("secret", ['sk-quote"in-it-12345', "sk-back\\slash-12345", 'mixed"\\\\key-abcdef'])
def test_secrets_with_quotes_or_backslashes_are_redacted_in_json_logs(secret):
    redactor = lb.redact
    redactor.add_secrets(secret)
    stream = io.StringIO()
    lb.setup_logging("INFO", "json", stream)
    lb.log_event(logging.INFO, "leak_probe", error=f"upstream said {secret}", nested={"k": [secret]})
    line = stream.getvalue()
    assert json.dumps(secret)[1:-1] not in line and secret not in line
    assert json.loads(line)["nested"] == {"k": [lb.REDACTED]}


def test_idle_connections_to_the_health_port_are_dropped(start_bot):
    bot = start_bot()
    port = int(bot.env["HEALTH_PORT"])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in idle:
        s.settimeout(15)
    assert all(s.recv(1) == b"" for s in idle)  # the server hung up on every one
    for s in idle:
        s.close()
    assert bot.get("/health")[0] == 200


def test_dms_are_governed_by_the_user_allow_list_not_the_channel_list(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_ALLOWED_CHANNELS="C100", LEDGER_BOT_ALLOWED_USERS="U7")

    def dm(user, text):
        msg = slack.add_message(f"D{user}", user=user, text=text)
        socket_mode.send_event({"type": "message", "channel": f"D{user}", "channel_type": "im", "user": user,
                                "text": text, "ts": msg["ts"], "team": TEAM})
        return msg

    allowed = dm("U7", "allowed person in a DM")
    assert replies(slack, "DU7", allowed["ts"]) == ["The answer is 42."]
    refused = dm("U8", "someone else in a DM")
    assert "not enabled here" in replies(slack, "DU8", refused["ts"])[0]
    assert len(gateway.requests) == 1


def test_a_busy_refusal_does_not_use_up_the_persons_rate_limit(start_bot, slack, socket_mode, gateway, tune):
    # The held answer must outlast the whole test (the default 5 s could expire on a busy machine).
    tune(USER_RATE_WINDOW_SECONDS=600)
    start_bot(LEDGER_BOT_WORKERS="1", LEDGER_BOT_QUEUE_SIZE="1", LEDGER_BOT_USER_RATE_LIMIT="2",
              LEDGER_BOT_LLM_TIMEOUT_SECONDS="60")
    release = threading.Event()
    gateway.default = lambda body: Script(release=release)
    first, _ = mention(slack, socket_mode, "one", user="U3")
    wait_for(lambda: gateway.requests, 10, "the first question at the gateway")
    second, _ = mention(slack, socket_mode, "two", user="U4")  # fills the queue
    third, _ = mention(slack, socket_mode, "three", user="U3")
    assert "busy" in replies(slack, "C100", third["ts"])[0]
    release.set()
    replies(slack, "C100", first["ts"])
    replies(slack, "C100", second["ts"])
    fourth, _ = mention(slack, socket_mode, "four", user="U3")  # U3's second question, not its third
    assert replies(slack, "C100", fourth["ts"]) == ["The answer is 42."]


def test_a_long_thread_gives_the_model_its_newest_messages(start_bot, slack, socket_mode, gateway, tune):
    tune(HISTORY_MAX_MESSAGES=10)
    start_bot()
    root = slack.add_message("C100", user="U1", text="a very long incident thread")
    for i in range(450):
        slack.add_message("C100", user="U1", text=f"update {i}", thread_ts=root["ts"])
    question, _ = mention(slack, socket_mode, "summary please?", thread_ts=root["ts"])
    replies(slack, "C100", root["ts"])
    sent = json.dumps(gateway.requests[0].body["messages"])
    assert "update 449" in sent and "update 10\"" not in sent  # the newest, not the oldest


def test_slack_refusing_connections_mid_answer_is_a_counted_slack_error(start_bot, slack, socket_mode, gateway,
                                                                        capsys):
    bot = start_bot()
    release = threading.Event()
    gateway.script(Script(release=release))
    mention(slack, socket_mode)
    wait_for(lambda: gateway.requests, 10, "the question at the gateway")
    slack.server.stop()  # Slack's Web API now refuses connections
    release.set()
    line = wait_for(lambda: [x for x in log_lines(capsys.readouterr().out) if x["event"] == "answer"], 30,
                    "the answer line")[0]
    assert line["outcome"] == "slack_error"
    assert 'ledger_bot_answers_total{outcome="slack_error"} 1.0' in bot.get("/metrics")[1]
    slack.server.start()


def test_stopping_a_bot_leaves_no_threads_behind(start_bot, slack, socket_mode, gateway):
    baseline = {t.ident for t in threading.enumerate()}
    bot = start_bot(LEDGER_BOT_WORKERS="4")
    msg, _ = mention(slack, socket_mode)
    replies(slack, "C100", msg["ts"])
    assert bot.stop() == 0

    def leftovers():
        return [t.name for t in threading.enumerate() if t.ident not in baseline and t.is_alive()
                and not t.name.startswith(("Thread-", "socket-close"))]
    wait_for(lambda: not leftovers(), 10, "the bot's threads to end")


def test_questions_acked_before_sigterm_are_answered_or_told_to_ask_again(start_bot, slack, socket_mode, gateway,
                                                                          capsys):
    bot = start_bot(LEDGER_BOT_WORKERS="1", LEDGER_BOT_SHUTDOWN_GRACE_SECONDS="1")
    release = threading.Event()
    gateway.default = lambda body: Script(text="Too slow for the rollout.", release=release)
    asked = [mention(slack, socket_mode, f"q{i}")[0] for i in range(3)]
    for msg in asked:
        wait_for(lambda m=msg: m["ts"] in json.dumps([c.params for c in slack.calls]) or gateway.requests, 10,
                 "questions taken on")
    wait_for(lambda: gateway.requests, 10, "the first question at the gateway")
    assert bot.stop() == 0
    release.set()
    for msg in asked:
        shown = slack.reply_texts("C100", msg["ts"])
        assert shown and "I'm restarting" in shown[-1], shown
    outcomes = [x["outcome"] for x in log_lines(capsys.readouterr().out) if x["event"] == "answer"]
    assert outcomes.count("interrupted") == 3
    assert not any(m.get("streaming") for msg in asked for m in slack.bot_replies("C100", msg["ts"]))

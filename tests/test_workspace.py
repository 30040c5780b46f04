"""Day one in a real workspace (issue 19): Slack's own rules, as the stricter fakes hold them,
met end to end: the modal and its trigger, group DMs and channels the bot is not in, the AI
pane on any replica, screenshots, a pooled gateway connection, bursts and 429s."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from conftest import _http_server
from fakes import BOT_USER, TEAM, Script, free_port, wait_for
from test_bot import log_lines, mention, replies
from test_slack_native import open_modal, submit_modal

import ledger_bot as lb

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def answers(capsys, seen: list) -> list[dict]:
    seen.extend(log_lines(capsys.readouterr().out))
    return [line for line in seen if line["event"] == "answer"]


def answer_of(capsys, event_id: str) -> dict:
    """The ``answer`` log line of the question Slack sent as ``event_id``."""
    seen: list = []
    return wait_for(lambda: [x for x in answers(capsys, seen) if x.get("event_id") == event_id], 15,
                    f"the answer line of {event_id}")[0]


# ── the shortcut's modal ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("value", "error"), [("   \n ", "Please type a question."),
                                              ("x" * 3_001, "under 3,000 characters")])
def test_a_modal_question_that_asks_nothing_gets_the_modals_own_error(start_bot, slack, socket_mode, gateway,
                                                                       value, error):
    start_bot()
    root = slack.add_message("C100", user="U1", text="batch 42 failed")
    modal = open_modal(slack, socket_mode, channel="C100", message={"ts": root["ts"], "text": root["text"]})
    eid = submit_modal(socket_mode, modal, value)
    socket_mode.wait_ack(eid)
    ack = socket_mode.ack_payloads[eid]
    assert ack["payload"]["response_action"] == "errors"
    assert error in ack["payload"]["errors"][modal["blocks"][0]["block_id"]]
    assert modal["blocks"][0]["element"]["max_length"] == 3_000  # Slack stops typing there
    later = mention(slack, socket_mode, "a later question")[0]  # handled after the submission
    assert replies(slack, "C100", later["ts"]) == ["The answer is 42."]
    assert len(gateway.requests) == 1 and slack.bot_replies("C100", root["ts"]) == []


def test_a_modal_submission_naming_another_thread_or_person_is_refused(start_bot, slack, socket_mode, gateway,
                                                                        capsys):
    start_bot()
    mine = slack.add_message("C100", user="U1", text="my thread")
    secret = slack.add_message("C999", user="U9", text="payroll numbers for Q3")
    modal = open_modal(slack, socket_mode, channel="C100", message={"ts": mine["ts"], "text": mine["text"]})
    where = json.loads(modal["private_metadata"])
    forged = {**modal, "private_metadata": json.dumps({**where, "c": "C999", "t": secret["ts"]})}
    submit_modal(socket_mode, forged, "Summarize this thread")
    submit_modal(socket_mode, modal, "Summarize this thread", user="U4")  # signed for U3, submitted by U4
    seen: list = []

    def rejected() -> bool:
        seen.extend(x for x in log_lines(capsys.readouterr().out) if x["event"] == "event_rejected")
        return len(seen) >= 2

    wait_for(rejected, 10, "two rejected submissions")
    assert {x["reason"] for x in seen} == {"modal: not signed for this person"}
    assert gateway.requests == []
    assert slack.bot_replies("C999", secret["ts"]) == [] and slack.bot_replies("C100", mine["ts"]) == []
    submit_modal(socket_mode, modal, "Summarize this thread")  # the real one still works
    assert replies(slack, "C100", mine["ts"]) == ["The answer is 42."]


def test_the_modal_opens_even_behind_a_queue_of_rate_limited_notices(start_bot, slack, socket_mode, gateway):
    """Seven 'busy' refusals in one channel wait for chat.postMessage's one per second there
    (about 7 s); the shortcut's views.open (its trigger dies after 3 s) does not wait behind them."""
    start_bot(LEDGER_BOT_WORKERS="1", LEDGER_BOT_QUEUE_SIZE="1")
    release = threading.Event()
    gateway.default = lambda body: Script(release=release)
    held = [mention(slack, socket_mode, f"q{i}")[0] for i in range(9)]
    wait_for(lambda: len(slack.calls_to("chat.postMessage")) >= 2, 15, "the busy notices to start")
    root = slack.add_message("C200", user="U1", text="another thread")
    modal = open_modal(slack, socket_mode, channel="C200", message={"ts": root["ts"], "text": root["text"]})
    assert modal["callback_id"] == "ask_ledger_bot_modal"
    told = [m for m in held if slack.bot_replies("C100", m["ts"])]
    assert len(told) < 7, "the notices were all out before the modal: the test proved nothing"
    release.set()
    for m in held:  # every question gets its answer or its notice; nothing outlives the test
        replies(slack, "C100", m["ts"], timeout=30)


def test_a_flood_of_home_tab_opens_delays_neither_the_modal_nor_a_thank_you(start_bot, slack, socket_mode, gateway):
    start_bot()
    slack.delay("views.publish", 0.1)  # 50 publishes within the budget: 5 s of Slack time
    for i in range(60):
        socket_mode.send_event({"type": "app_home_opened", "user": f"U{i:03d}", "channel": f"D{i:03d}", "tab": "home"})
    wait_for(lambda: slack.calls_to("views.publish"), 10, "the Home tab publishes to start")
    root = slack.add_message("C100", user="U1", text="a thread")
    open_modal(slack, socket_mode, channel="C100", message={"ts": root["ts"], "text": root["text"]})
    socket_mode.send_block_action({"type": "block_actions", "user": {"id": "U7"}, "channel": {"id": "C100"},
                                   "message": {"ts": root["ts"]}, "actions": [
                                       {"action_id": "feedback", "value": "up:lb-00000001"}]})
    wait_for(lambda: slack.messages.get("ephemeral:C100"), 10, "the thank-you")
    assert len(slack.calls_to("views.publish")) < 50, "every Home tab was out first: the test proved nothing"


def test_home_tab_opens_by_one_person_waiting_in_line_are_published_once(start_bot, slack, socket_mode, gateway):
    start_bot()
    slack.delay("views.publish", 0.5)
    for user in ("U1", "U2", "U2", "U2"):  # U2's opens arrive while U1's publish is in flight
        socket_mode.send_event({"type": "app_home_opened", "user": user, "channel": "D1", "tab": "home"})
    wait_for(lambda: "U2" in slack.views, 10, "U2's Home tab")
    socket_mode.send_event({"type": "app_home_opened", "user": "U3", "channel": "D3", "tab": "home"})
    wait_for(lambda: "U3" in slack.views, 10, "a later Home tab")
    assert [c.params["user_id"] for c in slack.calls_to("views.publish")] == ["U1", "U2", "U3"]


# ── group DMs, channels the bot is not in ────────────────────────────────────────────────


def test_a_thread_in_a_group_dm_is_read_and_answered(start_bot, slack, socket_mode, gateway):
    start_bot()
    slack.add_channel("G300", type="mpim")
    root = slack.add_message("G300", user="U1", text="Why is batch 7 unposted?")
    slack.add_message("G300", user="U2", text="It has a line on a closed period", thread_ts=root["ts"])
    msg = slack.add_message("G300", user="U1", text=f"<@{BOT_USER}> what do we do?", thread_ts=root["ts"])
    socket_mode.send_event({"type": "app_mention", "channel": "G300", "channel_type": "mpim", "user": "U1",
                            "text": msg["text"], "ts": msg["ts"], "thread_ts": root["ts"], "team": TEAM})
    assert replies(slack, "G300", root["ts"], n=1)[-1] == "The answer is 42."
    assert "closed period" in json.dumps(gateway.requests[0].body["messages"])


def test_a_scope_slack_never_granted_is_a_configuration_error_not_slack_is_down(start_bot, slack, socket_mode,
                                                                                gateway, capsys):
    slack.scopes.remove("mpim:history")  # installed before the manifest asked for it
    start_bot()
    slack.add_channel("G300", type="mpim")
    root = slack.add_message("G300", user="U1", text="thread")
    msg = slack.add_message("G300", user="U1", text=f"<@{BOT_USER}> help", thread_ts=root["ts"])
    socket_mode.send_event({"type": "app_mention", "channel": "G300", "channel_type": "mpim", "user": "U1",
                            "text": msg["text"], "ts": msg["ts"], "thread_ts": root["ts"], "team": TEAM},
                           event_id="EvMISSINGSCOPE")
    notice = replies(slack, "G300", root["ts"])[-1]
    assert "misconfigured" in notice and "permission" in notice
    line = answer_of(capsys, "EvMISSINGSCOPE")
    assert line["outcome"] == "slack_config_error" and "mpim:history" in line["error"] and line["level"] == "error"


def test_the_shortcut_where_the_bot_is_not_a_member_tells_the_person_how_to_invite_it(start_bot, slack,
                                                                                        socket_mode, gateway,
                                                                                        capsys):
    start_bot()
    slack.add_channel("C500", bot_member=False)
    root = slack.add_message("C500", user="U1", text="a thread the bot cannot post in")
    modal = open_modal(slack, socket_mode, channel="C500", message={"ts": root["ts"], "text": root["text"]},
                       response_url=slack.new_response_url())
    submit_modal(socket_mode, modal, "Summarize this thread")
    told = wait_for(lambda: slack.responses, 10, "the private notice")[0]
    assert told["response_type"] == "ephemeral" and "/invite @ledger-bot" in told["text"]
    assert slack.bot_replies("C500", root["ts"]) == []
    line = wait_for(lambda: [x for x in answers(capsys, []) if x["kind"] == "shortcut"], 10, "the answer line")[0]
    assert line["outcome"] == "not_in_channel"


# ── the AI pane on any replica ───────────────────────────────────────────────────────────


def test_two_replicas_share_an_ai_pane_thread_and_name_it_once(start_bot, slack, socket_mode, gateway):
    """The thread starts on one replica; its questions reach the other (the fake sends every
    event to the newest connection)."""
    first = start_bot()
    thread_ts = slack.new_ts()
    socket_mode.send_event({"type": "assistant_thread_started", "assistant_thread": {
        "user_id": "U1", "channel_id": "D1", "thread_ts": thread_ts, "context": {}}})
    wait_for(lambda: slack.suggested.get(f"D1:{thread_ts}"), 10, "suggested prompts")
    second = start_bot(HEALTH_PORT=str(free_port()))
    socket_mode.wait_connected(total=2)
    for n, text in enumerate(["How do I reverse a JE?", "and in Fusion?"]):
        msg = slack.add_message("D1", user="U1", text=text, thread_ts=thread_ts)
        socket_mode.send_event({"type": "message", "channel": "D1", "channel_type": "im", "user": "U1",
                                "text": text, "ts": msg["ts"], "thread_ts": thread_ts, "team": TEAM})
        wait_for(lambda n=n: len(slack.bot_replies("D1", thread_ts)) == n + 1, 15, f"answer {n + 1}")
    assert wait_for(lambda: slack.titles.get(f"D1:{thread_ts}"), 5, "the title") == "How do I reverse a JE?"
    assert len(slack.calls_to("assistant.threads.setTitle")) == 1
    assert first.thread.is_alive() and second.thread.is_alive()


# ── screenshots ──────────────────────────────────────────────────────────────────────────


def ask_with(slack, socket_mode, files: list[dict], text: str = "what does this mean?") -> dict:
    msg = slack.add_message("D1", user="U1", text=text, files=files, subtype="file_share")
    socket_mode.send_event({"type": "message", "subtype": "file_share", "channel": "D1", "channel_type": "im",
                            "user": "U1", "text": text, "ts": msg["ts"], "files": files, "team": TEAM})
    return msg


def images_sent(gateway) -> list[str]:
    question = gateway.requests[0].body["messages"][-1]["content"]
    return [p["image_url"]["url"] for p in question if isinstance(question, list) and p["type"] == "image_url"]


def test_a_download_redirected_within_slack_is_followed(start_bot, slack, socket_mode, gateway):
    start_bot()
    origin = slack.add_file("real.png", "image/png", PNG)
    moved = {**slack.add_file("moved.png", "image/png", b"", redirect_to=origin["url_private"]), "size": len(PNG)}
    msg = ask_with(slack, socket_mode, [moved])
    assert replies(slack, "D1", msg["ts"])[0] == "The answer is 42."
    assert images_sent(gateway) == ["data:image/png;base64," + base64.b64encode(PNG).decode()]
    assert all(c.token.startswith("xoxb-") for c in slack.calls_to("files.download"))


def test_a_download_redirected_off_slack_is_not_fetched_and_no_token_leaves(start_bot, slack, socket_mode,
                                                                              gateway):
    start_bot()
    foreign = _http_server()
    try:
        seen: list[dict] = []

        def record(request):
            from werkzeug import Response
            seen.append(dict(request.headers))
            return Response(PNG, mimetype="image/png")

        foreign.expect_request("/evil.png").respond_with_handler(record)
        away = {**slack.add_file("away.png", "image/png", b"", redirect_to=foreign.url_for("/evil.png")),
                "size": len(PNG)}
        msg = ask_with(slack, socket_mode, [away])
        shown = replies(slack, "D1", msg["ts"])[0]
        assert "couldn't open" in shown and "away.png" in shown
        assert seen == [] and images_sent(gateway) == []
    finally:
        foreign.clear()
        foreign.stop()


def test_a_trickling_download_is_cut_off_and_the_answer_goes_ahead(start_bot, slack, socket_mode, gateway, capsys,
                                                                    monkeypatch):
    import ledger_bot

    monkeypatch.setattr(ledger_bot, "DOWNLOAD_SECONDS", 2.0)
    bot = start_bot()
    slow = slack.add_file("slow.png", "image/png", PNG, trickle=1.0)  # ~70 s at this pace
    msg = ask_with(slack, socket_mode, [slow])
    shown = replies(slack, "D1", msg["ts"], timeout=20)[0]
    assert "couldn't open" in shown and "slow.png" in shown
    assert bot.get("/health")[0] == 200
    unreadable = [x for x in log_lines(capsys.readouterr().out) if x["event"] == "file_unreadable"]
    assert unreadable and unreadable[0]["error"] in ("too_slow", "TimeoutError")


def test_bytes_that_are_not_the_image_they_claim_never_reach_the_model(start_bot, slack, socket_mode, gateway):
    start_bot()
    fake_png = slack.add_file("notes.png", "image/png", b"%PDF-1.4 not an image at all")
    jpeg = b"\xff\xd8\xff\xe0" + bytes(64)
    mislabelled = slack.add_file("photo.png", "image/png", jpeg)  # a JPEG called PNG: sent as what it is
    msg = ask_with(slack, socket_mode, [fake_png, mislabelled])
    shown = replies(slack, "D1", msg["ts"])[0]
    assert "couldn't open" in shown and "notes.png" in shown and "photo.png" not in shown
    assert images_sent(gateway) == ["data:image/jpeg;base64," + base64.b64encode(jpeg).decode()]


# ── the gateway's pooled connections ─────────────────────────────────────────────────────


def test_a_pooled_connection_the_gateway_closed_as_the_request_went_out_is_retried_fresh(
        start_bot, slack, socket_mode, gateway, capsys):
    start_bot()
    first, _ = mention(slack, socket_mode, "warm the pool")
    replies(slack, "C100", first["ts"])
    gateway.script(Script(drop_connection=True))
    second, _ = mention(slack, socket_mode, "lands on the closing connection")
    assert replies(slack, "C100", second["ts"]) == ["The answer is 42."]
    assert len(gateway.requests) == 3
    ports = [r.headers["X-Client-Port"] for r in gateway.requests[1:]]
    assert ports[0] != ports[1], "the retry went out on the connection that was closed"
    assert any(x["event"] == "llm_retry" for x in log_lines(capsys.readouterr().out))


def test_a_refused_gateway_connection_is_retried_once_then_told(start_bot, slack, socket_mode, gateway, capsys):
    start_bot(LITELLM_BASE_URL="http://127.0.0.1:9/api/v2")
    msg, _ = mention(slack, socket_mode)
    assert "gateway is down" in replies(slack, "C100", msg["ts"])[0]
    lines = log_lines(capsys.readouterr().out)
    assert [x["attempt"] for x in lines if x["event"] == "llm_retry"] == [1]


# ── bursts and 429s ──────────────────────────────────────────────────────────────────────


def test_a_429_on_the_placeholder_post_is_a_wait_not_an_error(start_bot, slack, socket_mode, gateway, capsys):
    slack.status_supported = False  # no status: the placeholder is the first feedback
    start_bot(LEDGER_BOT_STREAMING="false")
    slack.fail("chat.postMessage", error="ratelimited", status=429, headers={"Retry-After": "1"})
    msg, _ = mention(slack, socket_mode, event_id="Ev429PLACEHOLDER")
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    assert answer_of(capsys, "Ev429PLACEHOLDER")["outcome"] == "ok"


def test_a_429_on_the_post_that_replaces_a_stream_is_a_wait_not_an_error(start_bot, slack, socket_mode, gateway,
                                                                           capsys):
    start_bot()
    slack.fail("chat.startStream", error="ratelimited", status=429, headers={"Retry-After": "30"})
    slack.fail("chat.postMessage", error="ratelimited", status=429, headers={"Retry-After": "1"})
    msg, _ = mention(slack, socket_mode, event_id="Ev429STREAMPOST")
    assert replies(slack, "C100", msg["ts"]) == ["The answer is 42."]
    assert answer_of(capsys, "Ev429STREAMPOST")["outcome"] == "ok"
    assert len(slack.calls_to("chat.postMessage")) == 2


def test_every_question_in_a_burst_shows_something_at_once(start_bot, slack, socket_mode, gateway, tune):
    """Once the status and stream budgets are spent, a question still shows that it was heard:
    a 👀 on it, from the reactions budget."""
    tune(SLACK_RATE_TIERS={"assistant.threads.setStatus": 10})
    start_bot(LEDGER_BOT_WORKERS="40")
    release = threading.Event()
    gateway.default = lambda body: Script(release=release)
    # 30 people (one person's daily budget holds ~27 reservations at once).
    asked = [mention(slack, socket_mode, f"q{i}", channel=f"C{i % 4 + 1}00", user=f"U{i}")[0] for i in range(30)]

    def heard(m: dict) -> bool:
        key = f"{m.get('channel', '')}"
        return bool(m.get("reactions")) or any(
            k.endswith(m["ts"]) for k in slack.statuses) or bool(slack.bot_replies(key, m["ts"]))

    def all_heard():
        msgs = [next(x for ch in slack.messages.values() for x in ch if x["ts"] == m["ts"]) for m in asked]
        return all(m.get("reactions") or any(k.endswith(":" + m["ts"]) for k in slack.statuses) for m in msgs)

    wait_for(all_heard, 15, "feedback on every question")
    reacted = [m for ch in slack.messages.values() for m in ch if m.get("reactions")]
    assert reacted and all(r["reactions"][0]["name"] == "eyes" for r in reacted)
    release.set()
    for i, m in enumerate(asked):
        replies(slack, f"C{i % 4 + 1}00", m["ts"], timeout=60)


def test_when_the_reactions_budget_is_spent_too_the_asker_gets_a_line_only_they_see(
        start_bot, slack, socket_mode, gateway, tune):
    """A burst larger than the status and 👀 budgets together: the rest are told ephemerally,
    where they are looking (a top-level mention: just under it, in the channel)."""
    tune(SLACK_RATE_TIERS={"assistant.threads.setStatus": 3, "reactions.add": 3})
    start_bot(LEDGER_BOT_WORKERS="12")
    release = threading.Event()
    gateway.default = lambda body: Script(release=release)
    asked = [mention(slack, socket_mode, f"q{i}", channel=f"C{i % 2 + 1}00", user=f"U{i}") for i in range(10)]
    people = {f"U{i}" for i in range(10)}

    def heard() -> tuple[set, set, set]:
        statuses = {m["user"] for m, _ in asked if any(k.endswith(":" + m["ts"]) for k in slack.statuses)}
        msgs = [x for ch in ("C100", "C200") for x in slack.messages.get(ch, [])]
        reacted = {x["user"] for x in msgs if x.get("reactions")}
        told = {e["user_only"] for ch in ("C100", "C200") for e in slack.messages.get("ephemeral:" + ch, [])}
        return statuses, reacted, told

    wait_for(lambda: set().union(*heard()) == people, 15, "every asker shown something")
    statuses, reacted, told = heard()
    # Each budget is this replica's share of the tier; once it is spent the next way is used.
    assert statuses and reacted and told and len(statuses) + len(reacted) + len(told) == 10, heard()
    ephemerals = [e for ch in ("C100", "C200") for e in slack.messages.get("ephemeral:" + ch, [])]
    assert all(e["thread_ts"] is None and e["text"] == lb.HEARD_TEXT for e in ephemerals)
    release.set()
    for i, (m, _) in enumerate(asked):
        replies(slack, f"C{i % 2 + 1}00", m["ts"], timeout=60)


# ── Block Kit limits the bot must stay within ────────────────────────────────────────────


def test_an_answer_citing_45_long_labels_keeps_its_sources_and_buttons(start_bot, slack, socket_mode, gateway,
                                                                        tmp_path, capsys):
    headings = [f"A rather long section heading about journal import number {i:02d}" for i in range(45)]
    (tmp_path / "kb.md").write_text("".join(f"# {h}\nfact {i}\n" for i, h in enumerate(headings)))
    start_bot(LEDGER_BOT_KNOWLEDGE=str(tmp_path))
    gateway.script(Script(text="The answer.\nSources: " + " ; ".join(f"kb.md § {h}" for h in headings)))
    msg, _ = mention(slack, socket_mode, event_id="EvMANYSOURCES")
    assert replies(slack, "C100", msg["ts"]) == ["The answer."]
    final = slack.bot_replies("C100", msg["ts"])[0]
    sources = next(b for b in final["blocks"] if b["block_id"].startswith("lb_sources_"))
    text = sources["elements"][0]["text"]
    assert len(text) <= 3_000 and text.startswith("Sources: kb.md § " + headings[0]) and text.endswith(" more")
    assert any(b["type"] == "context_actions" for b in final["blocks"])  # the buttons survived
    assert final["metadata"]["event_type"] == "ledger_bot_answer"
    assert answer_of(capsys, "EvMANYSOURCES")["outcome"] == "ok"


def test_the_home_tab_stays_within_slacks_view_limits_for_a_large_knowledge_folder(start_bot, slack, socket_mode,
                                                                                    gateway, tmp_path):
    for f in range(150):
        (tmp_path / f"document-with-a-long-name-{f:03d}.md").write_text(
            "".join(f"## A section heading that goes on for a while {h}\ntext\n" for h in range(60)))
    start_bot(LEDGER_BOT_KNOWLEDGE=str(tmp_path))
    socket_mode.send_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
    view = wait_for(lambda: slack.views.get("U1"), 10, "the Home tab")
    assert len(view["blocks"]) <= 100 and len(json.dumps(view).encode()) <= 250_000
    assert "more files" in view["blocks"][-1]["text"]["text"]


# ── what Slack keeps of a streamed answer ────────────────────────────────────────────────


def test_an_earlier_streamed_answer_is_context_for_the_next_question_in_the_thread(start_bot, slack, socket_mode,
                                                                                     gateway):
    start_bot()
    gateway.script(Script(text="Post it again with the period open."), Script(text="Yes, the same batch."))
    root, _ = mention(slack, socket_mode, "batch 7 was rejected, what now?")
    replies(slack, "C100", root["ts"])
    assert slack.calls_to("chat.startStream"), "the first answer was not streamed: the test proved nothing"
    mention(slack, socket_mode, "the same batch?", thread_ts=root["ts"])
    replies(slack, "C100", root["ts"], n=2)
    sent = gateway.requests[1].body["messages"]
    assert {"role": "assistant", "content": "Post it again with the period open."} in sent


# ── SIGTERM ──────────────────────────────────────────────────────────────────────────────


def test_a_signal_is_handled_off_the_main_thread_at_once():
    """The C-level handler writes to a pipe; the signal-watch thread, not the main thread (which
    may be busy or waiting for the interpreter lock), marks the process stopping."""
    import os
    import signal

    import ledger_bot as lb

    seen: list[str] = []
    done = threading.Event()
    signals = lb.Signals(lambda: (seen.append(threading.current_thread().name), done.set()))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(done.is_set, 5, "the signal seen")
        assert seen == ["signal-watch"]
    finally:
        signals.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not any(t.name == "signal-watch" for t in threading.enumerate())

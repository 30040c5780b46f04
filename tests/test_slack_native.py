"""A Slack-native assistant (issue 14): the AI pane, the thread shortcut, the Home tab and
screenshots, each end to end over the fakes."""

from __future__ import annotations

import base64
import json

from fakes import BOT_USER, TEAM, Script, wait_for
from test_bot import answer_lines, log_lines, replies

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def test_ai_pane_thread_gets_prompts_a_title_and_answers(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_SUGGESTED_PROMPTS="How do I reverse a JE?|What is a CCID?")
    thread_ts = slack.new_ts()
    socket_mode.send_event({"type": "assistant_thread_started", "assistant_thread": {
        "user_id": "U1", "channel_id": "D1", "thread_ts": thread_ts,
        "context": {"channel_id": "C100", "team_id": TEAM}}, "event_ts": thread_ts})
    prompts = wait_for(lambda: slack.suggested.get(f"D1:{thread_ts}"), 10, "suggested prompts")
    assert [p["message"] for p in prompts] == ["How do I reverse a JE?", "What is a CCID?"]
    msg = slack.add_message("D1", user="U1", text="How do I reverse a JE?", thread_ts=thread_ts)
    socket_mode.send_event({"type": "message", "channel": "D1", "channel_type": "im", "user": "U1",
                            "text": msg["text"], "ts": msg["ts"], "thread_ts": thread_ts, "team": TEAM})
    assert replies(slack, "D1", thread_ts) == ["The answer is 42."]
    assert wait_for(lambda: slack.titles.get(f"D1:{thread_ts}"), 5, "the title") == "How do I reverse a JE?"
    assert slack.calls_to("assistant.threads.setStatus")  # same pipeline: status, stream, feedback
    assert slack.calls_to("chat.stopStream")[-1].params["blocks"][-1]["type"] == "context_actions"


def test_ai_pane_thread_started_elsewhere_is_named_by_its_first_question_only(start_bot, slack, socket_mode,
                                                                              gateway):
    """Another replica (or this one before a restart) saw assistant_thread_started: the thread
    is still recognised from the message itself, and only its first question names it."""
    start_bot()
    thread_ts = slack.new_ts()
    for n, text in enumerate(["What is a CCID?", "And a segment?"]):
        msg = slack.add_message("D1", user="U1", text=text, thread_ts=thread_ts)
        socket_mode.send_event({"type": "message", "channel": "D1", "channel_type": "im", "user": "U1",
                                "text": text, "ts": msg["ts"], "thread_ts": thread_ts, "team": TEAM})
        wait_for(lambda n=n: len(slack.bot_replies("D1", thread_ts)) == n + 1, 10, f"answer {n + 1}")
    assert wait_for(lambda: slack.titles.get(f"D1:{thread_ts}"), 5, "the title") == "What is a CCID?"
    assert len(slack.calls_to("assistant.threads.setTitle")) == 1


def test_a_dm_outside_a_thread_gets_no_title(start_bot, slack, socket_mode, gateway):
    start_bot()
    msg = slack.add_message("D1", user="U1", text="What is a CCID?")
    socket_mode.send_event({"type": "message", "channel": "D1", "channel_type": "im", "user": "U1",
                            "text": msg["text"], "ts": msg["ts"], "team": TEAM})
    assert replies(slack, "D1", msg["ts"]) == ["The answer is 42."]
    assert slack.calls_to("assistant.threads.setTitle") == []


def test_thread_shortcut_asks_about_the_whole_thread_and_answers_in_it(start_bot, slack, socket_mode, gateway):
    start_bot()
    root = slack.add_message("C100", user="U1", text="Posting failed for batch 42 overnight")
    slack.add_message("C100", user="U2", text="Suspense account got 3 lines", thread_ts=root["ts"])
    trigger = slack.new_trigger()
    socket_mode.send_interactive({"type": "message_action", "callback_id": "ask_ledger_bot", "trigger_id": trigger,
                                  "user": {"id": "U3", "team_id": TEAM}, "channel": {"id": "C100"},
                                  "message": {"ts": root["ts"], "text": root["text"], "user": "U1"}})
    modal = wait_for(lambda: [v for k, v in slack.views.items() if k.startswith("modal:")], 5, "the modal")[0]
    field = modal["blocks"][0]
    assert field["element"]["initial_value"] == "Summarize this thread"
    socket_mode.send_interactive({"type": "view_submission", "user": {"id": "U3", "team_id": TEAM}, "view": {
        **modal, "state": {"values": {field["block_id"]: {field["element"]["action_id"]: {
            "type": "plain_text_input", "value": "Summarize this thread"}}}}}})
    assert replies(slack, "C100", root["ts"]) == ["The answer is 42."]
    sent = gateway.requests[0].body["messages"]
    assert "Posting failed for batch 42" in json.dumps(sent) and "Suspense account got 3 lines" in json.dumps(sent)
    assert sent[-1]["content"].endswith("<@U3>: Summarize this thread")


def open_modal(slack, socket_mode, *, channel: str, message: dict, user: str = "U3", **extra) -> dict:
    """A person uses the message shortcut; returns the modal Slack opened."""
    before = {k for k in slack.views if k.startswith("modal:")}
    socket_mode.send_interactive({"type": "message_action", "callback_id": "ask_ledger_bot",
                                  "trigger_id": slack.new_trigger(), "user": {"id": user, "team_id": TEAM},
                                  "channel": {"id": channel}, "message": message, **extra})
    key = wait_for(lambda: [k for k in slack.views if k.startswith("modal:") and k not in before], 5, "the modal")
    return slack.views[key[0]]


def submit_modal(socket_mode, modal: dict, value: str, *, user: str = "U3") -> str:
    field = modal["blocks"][0]
    return socket_mode.send_interactive({"type": "view_submission", "user": {"id": user, "team_id": TEAM}, "view": {
        **modal, "state": {"values": {field["block_id"]: {field["element"]["action_id"]: {
            "type": "plain_text_input", "value": value}}}}}})


def test_thread_shortcut_obeys_the_allow_list(start_bot, slack, socket_mode, gateway):
    start_bot(LEDGER_BOT_ALLOWED_CHANNELS="C100")
    root = slack.add_message("C999", user="U1", text="off-limits thread")
    modal = open_modal(slack, socket_mode, channel="C999", message={"ts": root["ts"], "text": root["text"]})
    submit_modal(socket_mode, modal, "Summarize this thread")
    assert "not enabled here" in replies(slack, "C999", root["ts"])[0]
    assert gateway.requests == []


def test_home_tab_shows_purpose_documents_and_limits_but_no_usage(start_bot, slack, socket_mode, gateway,
                                                                  tmp_path, tune):
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "publisher.md").write_text("# GL Publisher\nintro\n## Retries\nhow retries work\n")
    tune(KNOWLEDGE_RELOAD_SECONDS=0)
    start_bot(LEDGER_BOT_KNOWLEDGE=str(folder), LEDGER_BOT_USER_RATE_LIMIT="10",
              LEDGER_BOT_USER_DAILY_BUDGET_USD="5")
    socket_mode.send_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
    view = wait_for(lambda: slack.views.get("U1"), 5, "the Home tab")
    text = json.dumps(view, ensure_ascii=False)
    assert "publisher.md" in text and "Retries" in text and "10 questions per 60 seconds" in text
    assert "$5.00" in text and "👎" in text
    assert not any(w in text.lower() for w in ("remaining", "you have used", "spent today"))  # no usage figure
    (folder / "close.md").write_text("# Period close\nsteps\n")
    socket_mode.send_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
    wait_for(lambda: "close.md" in json.dumps(slack.views.get("U1")), 5, "the Home tab after a reload")


def test_screenshots_reach_the_model_and_other_files_get_a_note(start_bot, slack, socket_mode, gateway):
    start_bot()
    png = slack.add_file("error.png", "image/png", PNG)
    pdf = slack.add_file("report.pdf", "application/pdf", b"%PDF-1.4")
    msg = slack.add_message("D1", user="U1", text="what does this error mean?", files=[png, pdf],
                            subtype="file_share")
    socket_mode.send_event({"type": "message", "subtype": "file_share", "channel": "D1", "channel_type": "im",
                            "user": "U1", "text": msg["text"], "ts": msg["ts"], "files": [png, pdf], "team": TEAM})
    shown = replies(slack, "D1", msg["ts"])[0]
    assert shown.startswith("The answer is 42.") and "I can read images only" in shown and "report.pdf" in shown
    question = gateway.requests[0].body["messages"][-1]["content"]
    image = [p for p in question if p["type"] == "image_url"]
    assert image[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    downloads = slack.calls_to("files.download")
    assert len(downloads) == 1 and downloads[0].token.startswith("xoxb-")


def test_a_screenshot_the_bot_cannot_fetch_never_fails_the_answer(start_bot, slack, socket_mode, gateway, capsys):
    start_bot()
    png = slack.add_file("gone.png", "image/png", PNG)
    slack.files.clear()  # deleted before the bot fetched it: Slack answers its login page
    oversized = {**slack.add_file("huge.png", "image/png", PNG), "size": 50_000_000}
    elsewhere = {**png, "id": "FEVIL", "url_private_download": "https://attacker.example/x.png"}
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> see screenshots")
    socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                            "ts": msg["ts"], "files": [png, oversized, elsewhere], "team": TEAM})
    shown = replies(slack, "C100", msg["ts"])[0]
    assert shown.startswith("The answer is 42.") and "couldn't open" in shown and "huge.png" in shown
    assert all(c.params["file"] != "FEVIL" for c in slack.calls_to("files.download"))
    assert any(x["event"] == "file_unreadable" for x in log_lines(capsys.readouterr().out))


def test_a_cut_answer_counts_a_screenshot_as_an_image_not_as_its_base64(start_bot, slack, socket_mode, gateway,
                                                                         capsys, tmp_path):
    (tmp_path / "gl.md").write_text("# Suspense\nUnbalanced lines go to suspense.\n")
    start_bot(LEDGER_BOT_KNOWLEDGE=str(tmp_path))
    gateway.script(Script(text="Partial answer about the screenshot " * 5, chunk_size=20, error_after_chunks=3,
                          error_event={"message": "overloaded", "type": "api_error", "code": "500"}))
    shot = slack.add_file("error.png", "image/png", PNG + bytes(300_000))  # ~400,000 base64 characters
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> what does this mean?")
    socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                            "ts": msg["ts"], "files": [shot], "team": TEAM})
    line = wait_for(lambda: answer_lines(capsys.readouterr().out), 15, "the answer line")[0]
    assert line["tokens"]["estimated"] is True
    # The system prompt, the question and one image (1,600): a few thousand, not ~100,000.
    assert 1_600 < line["tokens"]["prompt"] < 20_000


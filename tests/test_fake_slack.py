"""FakeSlack is as strict as Slack: every payload Slack refuses, the fake refuses with Slack's
error code, and the valid form next to it is accepted. Each case goes through slack_sdk's real
WebClient (or WebhookClient for response URLs), as the bot's own calls do.

Sources: the method reference (docs.slack.dev/reference/methods/<method>) and the Block Kit
reference (docs.slack.dev/reference/block-kit/...); see tests/fakes.py for each rule's source.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml
from conftest import ROOT, SECRETS, _http_server
from fakes import BOT_USER, TEAM, FakeSlack
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient
from werkzeug import Response

import ledger_bot as lb


def web(slack: FakeSlack) -> WebClient:
    return WebClient(token=SECRETS["SLACK_BOT_TOKEN"], base_url=slack.api_url)


def call(slack: FakeSlack, method: str, **body) -> dict:
    """The call as the bot makes it (JSON body); its answer, which must be ok."""
    return web(slack).api_call(method, json=body).data


def refused(slack: FakeSlack, method: str, **body) -> dict:
    """The call, which Slack would refuse: its ``ok: false`` answer."""
    with pytest.raises(SlackApiError) as e:
        web(slack).api_call(method, json=body)
    return e.value.response.data


def channel() -> str:
    """A fresh public channel: chat.postMessage allows about one post per second per channel."""
    return f"C{uuid.uuid4().hex[:9].upper()}"


def root(slack: FakeSlack, ch: str) -> str:
    return slack.add_message(ch, user="U1", text="a question")["ts"]


def section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def post(slack: FakeSlack, blocks: list, **extra) -> dict:
    return call(slack, "chat.postMessage", channel=channel(), text="fallback", blocks=blocks, **extra)


def post_refused(slack: FakeSlack, blocks, **extra) -> dict:
    return refused(slack, "chat.postMessage", channel=channel(), text="fallback", blocks=blocks, **extra)


def start(slack: FakeSlack, ch: str | None = None, **extra) -> tuple[str, str]:
    ch = ch or channel()
    ts = call(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="Hello",
              recipient_user_id="U1", recipient_team_id=TEAM, **extra)["ts"]
    return ch, ts


def config() -> lb.Config:
    return lb.load_config({**SECRETS, "LITELLM_BASE_URL": "http://127.0.0.1:9/api/v2"})


# ── Block Kit, in messages ───────────────────────────────────────────────────────────────


def test_an_unknown_block_type_is_invalid_blocks(slack):
    answer = post_refused(slack, [{"type": "fancy_banner", "text": "hi"}])
    assert answer["error"] == "invalid_blocks"
    assert any("/blocks/0/type" in m for m in answer["response_metadata"]["messages"])
    assert post(slack, [section("hi")])["ok"]


def test_fifty_one_blocks_are_invalid_blocks_and_fifty_are_fine(slack):
    assert post_refused(slack, [section(f"line {i}") for i in range(51)])["error"] == "invalid_blocks"
    assert post(slack, [section(f"line {i}") for i in range(50)])["ok"]


def test_a_markdown_block_over_12000_characters_is_msg_blocks_too_long(slack):
    assert post_refused(slack, [{"type": "markdown", "text": "x" * 13_000}])["error"] == "msg_blocks_too_long"
    assert post(slack, [{"type": "markdown", "text": "x" * 12_000}])["ok"]


def test_markdown_blocks_count_together_against_12000_characters(slack):
    two = [{"type": "markdown", "text": "x" * 7_000}, {"type": "markdown", "text": "y" * 7_000}]
    assert post_refused(slack, two)["error"] == "msg_blocks_too_long"
    assert post(slack, [{"type": "markdown", "text": "x" * 6_000}, {"type": "markdown", "text": "y" * 6_000}])["ok"]


def test_a_markdown_block_needs_its_text(slack):
    assert post_refused(slack, [{"type": "markdown", "text": ""}])["error"] == "invalid_blocks"
    assert post_refused(slack, [{"type": "markdown"}])["error"] == "invalid_blocks"


def test_a_header_over_150_characters_is_invalid_blocks(slack):
    header = {"type": "header", "text": {"type": "plain_text", "text": "h" * 200}}
    assert post_refused(slack, [header])["error"] == "invalid_blocks"
    assert post(slack, [{"type": "header", "text": {"type": "plain_text", "text": "h" * 150}}])["ok"]


def test_a_header_is_plain_text_only(slack):
    header = {"type": "header", "text": {"type": "mrkdwn", "text": "*bold*"}}
    assert post_refused(slack, [header])["error"] == "invalid_blocks"


def test_a_context_block_with_eleven_elements_is_invalid_blocks(slack):
    element = {"type": "mrkdwn", "text": "a"}
    assert post_refused(slack, [{"type": "context", "elements": [element] * 11}])["error"] == "invalid_blocks"
    assert post(slack, [{"type": "context", "elements": [element] * 10}])["ok"]


def test_a_section_text_of_3001_characters_is_invalid_blocks(slack):
    answer = post_refused(slack, [section("s" * 3_001)])
    assert answer["error"] == "invalid_blocks"
    assert answer["errors"] == ["must be less than 3001 characters [json-pointer:/blocks/0/text/text]"]
    assert post(slack, [section("s" * 3_000)])["ok"]


def test_a_context_element_text_over_3000_characters_is_invalid_blocks(slack):
    context = {"type": "context", "elements": [{"type": "mrkdwn", "text": "c" * 3_001}]}
    assert post_refused(slack, [context])["error"] == "invalid_blocks"


def test_an_empty_text_object_is_invalid_blocks(slack):
    assert post_refused(slack, [section("")])["error"] == "invalid_blocks"


def test_section_fields_are_at_most_ten_of_2000_characters(slack):
    field = {"type": "mrkdwn", "text": "f"}
    assert post_refused(slack, [{"type": "section", "fields": [field] * 11}])["error"] == "invalid_blocks"
    assert post_refused(slack, [{"type": "section", "fields": [{"type": "mrkdwn", "text": "f" * 2_001}]}])[
        "error"] == "invalid_blocks"
    assert post(slack, [{"type": "section", "fields": [field] * 10}])["ok"]


def test_slack_sdk_models_refuse_what_they_model(slack):
    """An image block without alt_text: slack_sdk's ImageBlock refuses it, and so does Slack."""
    assert post_refused(slack, [{"type": "image", "image_url": "https://example.com/a.png"}])["error"] == "invalid_blocks"
    assert post(slack, [{"type": "image", "image_url": "https://example.com/a.png", "alt_text": "a"}])["ok"]


def test_blocks_that_are_not_an_array_are_invalid_blocks_format(slack):
    answer = refused(slack, "chat.postMessage", channel=channel(), text="x", blocks={"type": "section"})
    assert answer["error"] == "invalid_blocks_format"
    with pytest.raises(SlackApiError) as form:  # form-encoded, as a JSON string that is not JSON
        web(slack).api_call("chat.postMessage", params={"channel": channel(), "text": "x", "blocks": "[{not json"})
    assert form.value.response.data == {"ok": False, "error": "invalid_blocks_format"}


def test_a_block_id_twice_in_a_message_is_invalid_blocks(slack):
    blocks = [{**section("a"), "block_id": "same"}, {**section("b"), "block_id": "same"}]
    assert post_refused(slack, blocks)["error"] == "invalid_blocks"


def test_an_update_needs_new_block_ids(slack):
    ch = channel()
    ts = call(slack, "chat.postMessage", channel=ch, text="v1", blocks=[{**section("v1"), "block_id": "b1"}])["ts"]
    assert refused(slack, "chat.update", channel=ch, ts=ts, text="v2",
                   blocks=[{**section("v2"), "block_id": "b1"}])["error"] == "invalid_blocks"
    assert call(slack, "chat.update", channel=ch, ts=ts, text="v2", blocks=[{**section("v2"), "block_id": "b2"}])["ok"]


def test_a_markdown_blocks_block_id_is_not_kept(slack):
    """The markdown block reference: its block_id "is ignored ... and will not be retained"."""
    ch = channel()
    ts = call(slack, "chat.postMessage", channel=ch, text="v1", blocks=[{"type": "markdown", "text": "v1",
                                                                          "block_id": "m"}])["ts"]
    assert "block_id" not in slack.messages[ch][0]["blocks"][0]
    assert call(slack, "chat.update", channel=ch, ts=ts, text="v2",
                blocks=[{"type": "markdown", "text": "v2", "block_id": "m"}])["ok"]


def test_feedback_buttons_are_checked_by_hand_against_their_reference(slack):
    good = lb.feedback_blocks("lb-abc", 1)
    assert post(slack, good)["ok"]
    element = good[0]["elements"][0]
    long_label = {**element, "positive_button": {**element["positive_button"], "accessibility_label": "l" * 76}}
    long_text = {**element, "negative_button": {**element["negative_button"],
                                                "text": {"type": "plain_text", "text": "t" * 76}}}
    mrkdwn_text = {**element, "negative_button": {**element["negative_button"], "text": {"type": "mrkdwn", "text": "no"}}}
    no_value = {**element, "positive_button": {"text": element["positive_button"]["text"]}}
    one_sided = {k: v for k, v in element.items() if k != "negative_button"}
    for bad in (long_label, long_text, mrkdwn_text, no_value, one_sided):
        assert post_refused(slack, [{**good[0], "elements": [bad]}])["error"] == "invalid_blocks", bad


def test_context_actions_hold_at_most_five_feedback_or_icon_buttons(slack):
    element = lb.feedback_blocks("lb-abc", 1)[0]["elements"][0]
    assert post_refused(slack, [{"type": "context_actions", "elements": [element] * 6}])["error"] == "invalid_blocks"
    assert post_refused(slack, [{"type": "context_actions", "elements": []}])["error"] == "invalid_blocks"
    assert post_refused(slack, [{"type": "context_actions", "elements": [{"type": "mrkdwn", "text": "x"}]}])[
        "error"] == "invalid_blocks"


def test_update_and_ephemeral_blocks_are_checked_too(slack):
    ch = channel()
    ts = call(slack, "chat.postMessage", channel=ch, text="v1")["ts"]
    assert refused(slack, "chat.update", channel=ch, ts=ts, text="v2", blocks=[{"type": "nope"}])["error"] == "invalid_blocks"
    assert refused(slack, "chat.postEphemeral", channel=ch, user="U1", text="x",
                   blocks=[section("s" * 3_001)])["error"] == "invalid_blocks"
    assert call(slack, "chat.postEphemeral", channel=ch, user="U1", text="x", blocks=[section("fine")])["ok"]


# ── messages ─────────────────────────────────────────────────────────────────────────────


def test_a_message_with_neither_text_nor_blocks_is_no_text(slack):
    assert refused(slack, "chat.postMessage", channel=channel())["error"] == "no_text"
    assert refused(slack, "chat.postMessage", channel=channel(), text="")["error"] == "no_text"
    ch = channel()
    ts = call(slack, "chat.postMessage", channel=ch, text="hi")["ts"]
    assert refused(slack, "chat.update", channel=ch, ts=ts)["error"] == "no_text"
    assert refused(slack, "chat.postEphemeral", channel=ch, user="U1")["error"] == "no_text"
    assert call(slack, "chat.postMessage", channel=channel(), blocks=[section("blocks alone will do")])["ok"]


def test_text_over_40000_characters_is_msg_too_long(slack):
    assert refused(slack, "chat.postMessage", channel=channel(), text="t" * 40_001)["error"] == "msg_too_long"
    assert call(slack, "chat.postMessage", channel=channel(), text="t" * 40_000)["ok"]


def test_markdown_text_is_at_most_12000_characters_and_not_with_text_or_blocks(slack):
    assert refused(slack, "chat.postMessage", channel=channel(), markdown_text="m" * 12_001)["error"] == "msg_too_long"
    assert refused(slack, "chat.postMessage", channel=channel(), markdown_text="m", text="t")[
        "error"] == "markdown_text_conflict"
    assert call(slack, "chat.postMessage", channel=channel(), markdown_text="m" * 12_000)["ok"]


def test_metadata_must_have_an_event_type_and_payload(slack):
    assert refused(slack, "chat.postMessage", channel=channel(), text="x", metadata={"event_type": "answer"})[
        "error"] == "invalid_metadata_format"
    assert call(slack, "chat.postMessage", channel=channel(), text="x",
                metadata=lb.message_metadata(lb.ANSWER_METADATA, "lb-1"))["ok"]


def test_a_missing_required_argument_is_invalid_arguments(slack):
    answer = refused(slack, "chat.postMessage", text="no channel")
    assert answer["error"] == "invalid_arguments"
    assert answer["response_metadata"]["messages"] == ["[ERROR] missing required field: channel"]
    assert refused(slack, "chat.update", channel=channel(), text="no ts")["error"] == "invalid_arguments"


# ── chat.postEphemeral ───────────────────────────────────────────────────────────────────


def test_post_ephemeral_without_user_is_invalid_arguments(slack):
    answer = refused(slack, "chat.postEphemeral", channel=channel(), text="only you")
    assert answer["error"] == "invalid_arguments"
    assert answer["response_metadata"]["messages"] == ["[ERROR] missing required field: user"]
    assert call(slack, "chat.postEphemeral", channel=channel(), user="U1", text="only you")["ok"]


def test_post_ephemeral_to_someone_not_in_the_channel_is_user_not_in_channel(slack):
    slack.add_channel("C777", members=["U1"])
    assert refused(slack, "chat.postEphemeral", channel="C777", user="U2", text="x")["error"] == "user_not_in_channel"
    assert call(slack, "chat.postEphemeral", channel="C777", user="U1", text="x")["ok"]


# ── streaming ────────────────────────────────────────────────────────────────────────────


def test_start_stream_with_13000_characters_is_msg_too_long(slack):
    ch = channel()
    assert refused(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="x" * 13_000,
                   recipient_user_id="U1", recipient_team_id=TEAM)["error"] == "msg_too_long"
    assert call(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="x" * 12_000,
                recipient_user_id="U1", recipient_team_id=TEAM)["ok"]


def test_append_stream_with_13000_characters_is_msg_too_long(slack):
    ch, ts = start(slack)
    assert refused(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text="x" * 13_000)["error"] == "msg_too_long"
    assert call(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text="x" * 12_000)["ok"]


def test_stop_stream_with_13000_characters_is_msg_too_long(slack):
    ch, ts = start(slack)
    assert refused(slack, "chat.stopStream", channel=ch, ts=ts, markdown_text="x" * 13_000)["error"] == "msg_too_long"
    assert call(slack, "chat.stopStream", channel=ch, ts=ts, markdown_text="x" * 12_000)["ok"]


def test_start_stream_without_thread_ts_is_invalid_arguments(slack):
    answer = refused(slack, "chat.startStream", channel=channel(), markdown_text="hi", recipient_user_id="U1",
                     recipient_team_id=TEAM)
    assert answer["error"] == "invalid_arguments"
    assert answer["response_metadata"]["messages"] == ["[ERROR] missing required field: thread_ts"]


def test_start_stream_outside_a_dm_names_its_recipient(slack):
    ch = channel()
    assert refused(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="hi",
                   recipient_team_id=TEAM)["error"] == "missing_recipient_user_id"
    assert refused(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="hi",
                   recipient_user_id="U1")["error"] == "missing_recipient_team_id"
    assert call(slack, "chat.startStream", channel="D200", thread_ts=root(slack, "D200"), markdown_text="hi")["ok"]


def test_append_stream_needs_text_or_chunks_and_keeps_the_mode_the_stream_started_in(slack):
    ch, ts = start(slack)  # started with markdown_text
    assert refused(slack, "chat.appendStream", channel=ch, ts=ts)["error"] == "markdown_text_or_chunks_required"
    more = [{"type": "markdown_text", "text": " more"}]
    assert refused(slack, "chat.appendStream", channel=ch, ts=ts, chunks=more)["error"] == "streaming_mode_mismatch"
    assert call(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text=" and more")["ok"]
    assert refused(slack, "chat.stopStream", channel=ch, ts=ts, chunks=more)["error"] == "streaming_mode_mismatch"
    assert slack.messages[ch][-1]["text"] == "Hello and more"


def test_a_stream_started_with_chunks_takes_only_chunks_and_never_both_at_once(slack):
    ch = channel()
    hello = [{"type": "markdown_text", "text": "Hello"}]
    ts = call(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), chunks=hello,
              recipient_user_id="U1", recipient_team_id=TEAM)["ts"]
    assert refused(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text="x")["error"] == "streaming_mode_mismatch"
    both = refused(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text="x", chunks=hello)
    assert both["error"] == "cannot_provide_both_markdown_text_and_chunks"
    assert call(slack, "chat.appendStream", channel=ch, ts=ts, chunks=[{"type": "markdown_text", "text": ", world"}])["ok"]
    assert call(slack, "chat.stopStream", channel=ch, ts=ts)["ok"]  # nothing more to say: no mode
    assert slack.messages[ch][-1]["text"] == "Hello, world"


def task(**fields) -> dict:
    return {"type": "task_update", "id": "t1", "title": "Searching ADRs", "status": "in_progress", **fields}


def test_task_updates_are_checked_like_slack_and_shown_by_id(slack):
    ch = channel()
    ts = call(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), chunks=[task()],
              recipient_user_id="U1", recipient_team_id=TEAM)["ts"]
    for bad in (task(status="done"), task(id=""), task(title="x" * 257), task(output="x" * 257),
                task(sources=[{"type": "url", "url": "ftp://x", "text": "x"}]),
                task(sources=[{"type": "url", "url": "https://x"}]), {"type": "task_update", "title": "t"}):
        assert refused(slack, "chat.appendStream", channel=ch, ts=ts, chunks=[bad])["error"] == "invalid_chunks", bad
    done = task(status="complete", output="3 files",
                sources=[{"type": "url", "url": "https://github.com/o/r/blob/abc/a.md", "text": "a.md"}])
    assert call(slack, "chat.appendStream", channel=ch, ts=ts, chunks=[done])["ok"]
    shown = slack.messages[ch][-1]["tasks"]["t1"]
    assert shown["status"] == "complete" and shown["output"] == "3 files" and shown["sources"][0]["text"] == "a.md"


def test_task_display_mode_is_timeline_or_plan(slack):
    ch = channel()
    assert refused(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="hi",
                   recipient_user_id="U1", recipient_team_id=TEAM, task_display_mode="dense")["error"] == "invalid_arguments"
    assert call(slack, "chat.startStream", channel=ch, thread_ts=root(slack, ch), markdown_text="hi",
                recipient_user_id="U1", recipient_team_id=TEAM, task_display_mode="plan")["ok"]


def test_stream_chunks_of_an_unknown_type_are_invalid_chunks(slack):
    ch, ts = start(slack)
    assert refused(slack, "chat.appendStream", channel=ch, ts=ts, chunks=[{"type": "confetti"}])["error"] == "invalid_chunks"


def test_stop_stream_blocks_are_block_kit_and_at_most_fifty(slack):
    ch, ts = start(slack)
    assert refused(slack, "chat.stopStream", channel=ch, ts=ts, blocks=[{"type": "nope"}])["error"] == "invalid_blocks"
    assert refused(slack, "chat.stopStream", channel=ch, ts=ts, blocks=[section("s")] * 51)["error"] == "msg_blocks_too_many"
    assert call(slack, "chat.stopStream", channel=ch, ts=ts, blocks=lb.feedback_blocks("lb-1", 1))["ok"]


def test_a_streamed_message_is_kept_as_slack_keeps_it(slack):
    """chat.stopStream answers the finished message; its ``text`` holds what was streamed, and
    conversations.replies shows it the same way later."""
    ch, ts = start(slack)
    call(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text=", world")
    stopped = call(slack, "chat.stopStream", channel=ch, ts=ts, markdown_text="!",
                   metadata=lb.message_metadata(lb.ANSWER_METADATA, "lb-1"))
    message = stopped["message"]
    assert stopped["ts"] == ts and message["ts"] == ts and message["text"] == "Hello, world!"
    assert message["bot_id"] and message["type"] == "message" and "markdown_text" not in message
    assert "streaming" not in message
    thread_ts = slack.messages[ch][0]["ts"]
    replies = call(slack, "conversations.replies", channel=ch, ts=thread_ts, include_all_metadata=True)["messages"]
    assert replies[-1]["text"] == "Hello, world!" and replies[-1]["metadata"]["event_payload"] == {"ref": "lb-1"}
    assert slack.reply_texts(ch, thread_ts) == ["Hello, world!"]


def test_the_existing_stream_rules_still_hold(slack):
    ch, ts = start(slack)
    assert refused(slack, "chat.update", channel=ch, ts=ts, text="edit")["error"] == "streaming_state_conflict"
    slack.press_stop(ts)
    assert refused(slack, "chat.appendStream", channel=ch, ts=ts, markdown_text="x")["error"] == "stopped_by_user"
    assert refused(slack, "chat.stopStream", channel=ch, ts=ts)["error"] == "message_not_in_streaming_state"


# ── the assistant pane ───────────────────────────────────────────────────────────────────


def test_set_status_without_status_is_invalid_arguments(slack):
    answer = refused(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1")
    assert answer["error"] == "invalid_arguments"
    assert answer["response_metadata"]["messages"] == ["[ERROR] missing required field: status"]


def test_an_empty_status_clears_it(slack):
    assert call(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="is thinking…")["ok"]
    assert "D200:1.1" in slack.statuses
    assert call(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="")["ok"]
    assert "D200:1.1" not in slack.statuses


def test_set_status_with_eleven_loading_messages_is_invalid_arguments(slack):
    assert refused(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="is thinking…",
                   loading_messages=[f"step {i}" for i in range(11)])["error"] == "invalid_arguments"
    assert call(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="is thinking…",
                loading_messages=[f"step {i}" for i in range(10)])["ok"]


def test_set_status_with_a_60_character_loading_message_is_invalid_arguments(slack):
    assert refused(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="is thinking…",
                   loading_messages=["l" * 60])["error"] == "invalid_arguments"
    assert call(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="is thinking…",
                loading_messages=["l" * 50])["ok"]


def test_the_bots_loading_messages_are_accepted(slack):
    assert call(slack, "assistant.threads.setStatus", channel_id="D200", thread_ts="1.1", status="is thinking…",
                loading_messages=list(lb.LOADING_MESSAGES))["ok"]


def test_at_most_four_suggested_prompts(slack):
    prompts = [{"title": f"t{i}", "message": f"m{i}"} for i in range(5)]
    assert refused(slack, "assistant.threads.setSuggestedPrompts", channel_id="D200", thread_ts="1.1",
                   prompts=prompts)["error"] == "invalid_arguments"
    assert call(slack, "assistant.threads.setSuggestedPrompts", channel_id="D200", thread_ts="1.1",
                prompts=prompts[:4])["ok"]


# ── views ────────────────────────────────────────────────────────────────────────────────


def test_a_300_kb_views_publish_is_view_too_large(slack):
    view = {"type": "home", "blocks": [section("v" * 3_000) for _ in range(100)]}  # every block within its limits
    assert refused(slack, "views.publish", user_id="U1", view=view)["error"] == "view_too_large"
    assert call(slack, "views.publish", user_id="U1", view={"type": "home", "blocks": [section("v" * 3_000)] * 60})["ok"]


def test_views_publish_needs_a_user_id(slack):
    answer = refused(slack, "views.publish", view={"type": "home", "blocks": [section("hi")]})
    assert answer["error"] == "invalid_arguments"


def test_a_view_is_block_kit_and_views_rules(slack):
    home = {"type": "home", "blocks": [section("hi")]}
    for bad in ({**home, "type": "modal"}, {**home, "blocks": []}, {**home, "blocks": [section("b")] * 101},
                {**home, "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "h" * 200}}]},
                {**home, "blocks": [{"type": "nope"}]}):
        assert refused(slack, "views.publish", user_id="U1", view=bad)["error"] == "invalid_arguments", bad
    assert call(slack, "views.publish", user_id="U1", view=home)["ok"]


def test_a_modal_title_is_at_most_24_characters(slack):
    modal = lb.ask_modal(lb.modal_where(b"k", channel="C100", thread_ts="1.1", user="U1", response_url="", now=0))
    answer = refused(slack, "views.open", trigger_id=slack.new_trigger(),
                     view={**modal, "title": {"type": "plain_text", "text": "t" * 25}})
    assert answer["error"] == "invalid_arguments"
    untitled = {k: v for k, v in modal.items() if k != "title"}
    assert refused(slack, "views.open", trigger_id=slack.new_trigger(), view=untitled)["error"] == "invalid_arguments"


def test_a_trigger_is_valid_once_for_three_seconds(slack):
    modal = lb.ask_modal(lb.modal_where(b"k", channel="C100", thread_ts="1.1", user="U1", response_url="", now=0))
    assert refused(slack, "views.open", view=modal)["error"] == "invalid_arguments"
    assert refused(slack, "views.open", trigger_id="1.2.abc", view=modal)["error"] == "invalid_trigger_id"
    trigger = slack.new_trigger()
    assert call(slack, "views.open", trigger_id=trigger, view=modal)["ok"]
    assert refused(slack, "views.open", trigger_id=trigger, view=modal)["error"] == "exchanged_trigger_id"
    late = slack.new_trigger()
    slack.triggers[late] -= 4
    assert refused(slack, "views.open", trigger_id=late, view=modal)["error"] == "expired_trigger_id"


# ── the bot's own payloads ───────────────────────────────────────────────────────────────


def test_the_bots_answer_blocks_are_accepted(slack):
    sections = [lb.Section("runbook.md", "Runbook > Restarting", "text", "https://wiki.example/runbook"),
                lb.Section("faq.md", "", "text")]
    closing = [lb.sources_block(sections, "lb-abc", 1), *lb.feedback_blocks("lb-abc", 1)]
    ch = channel()
    ts = call(slack, "chat.postMessage", channel=ch, text="The answer.", blocks=lb.markdown_blocks("The answer.", closing),
              metadata=lb.message_metadata(lb.ANSWER_METADATA, "lb-abc"))["ts"]
    closing2 = [lb.sources_block(sections, "lb-abc", 2), *lb.feedback_blocks("lb-abc", 2)]
    assert call(slack, "chat.update", channel=ch, ts=ts, text="Edited.", blocks=lb.markdown_blocks("Edited.", closing2))["ok"]
    ch, ts = start(slack)
    assert call(slack, "chat.stopStream", channel=ch, ts=ts, blocks=closing,
                metadata=lb.message_metadata(lb.ANSWER_METADATA, "lb-abc"))["ok"]


def test_the_bots_modal_is_accepted(slack):
    answer = call(slack, "views.open", trigger_id=slack.new_trigger(), view=lb.ask_modal(lb.modal_where(b"k", channel="C100", thread_ts="1.1", user="U1", response_url="", now=0)))
    assert answer["view"]["callback_id"] == lb.MODAL_CALLBACK


def test_the_bots_home_tab_is_accepted(slack):
    limits = lb.Limits(rate_limit=10, daily_budget_usd=50, user_daily_budget_usd=5)
    view = lb.home_view(lb.load_knowledge(ROOT / "knowledge"), prompts=list(lb.DEFAULT_PROMPTS),
                        limits=limits.describe())
    assert call(slack, "views.publish", user_id="U1", view=view)["ok"]
    assert slack.views["U1"]["blocks"] == view["blocks"]


# ── scopes ───────────────────────────────────────────────────────────────────────────────


def test_the_bot_has_exactly_the_manifests_bot_scopes(slack):
    manifest = yaml.safe_load((ROOT / "slack-app-manifest.yaml").read_text(encoding="utf-8"))
    assert slack.scopes == manifest["oauth_config"]["scopes"]["bot"]


def test_replies_in_an_mpim_need_mpim_history(slack):
    slack.scopes.remove("mpim:history")  # an app installed before the manifest asked for it
    slack.add_channel("G300", type="mpim")
    ts = root(slack, "G300")
    answer = refused(slack, "conversations.replies", channel="G300", ts=ts)
    assert answer == {"ok": False, "error": "missing_scope", "needed": "mpim:history", "provided": ",".join(slack.scopes)}
    slack.scopes.append("mpim:history")
    assert call(slack, "conversations.replies", channel="G300", ts=ts)["messages"][0]["ts"] == ts


@pytest.mark.parametrize(("kind", "scope"), [("C", "channels:history"), ("G", "groups:history"), ("D", "im:history")])
def test_replies_need_the_history_scope_of_the_conversation_type(socket_mode, kind, scope):
    server = _http_server()
    try:
        slack = FakeSlack(server, socket_mode, scopes=["chat:write"])
        ch = f"{kind}123"
        answer = refused(slack, "conversations.replies", channel=ch, ts=root(slack, ch))
        assert (answer["error"], answer["needed"], answer["provided"]) == ("missing_scope", scope, "chat:write")
    finally:
        server.clear()
        server.stop()


def test_methods_need_their_scopes(slack):
    slack.scopes = ["channels:history"]
    ch = channel()
    for method, body, scope in [
        ("chat.postMessage", {"channel": ch, "text": "x"}, "chat:write"),
        ("chat.startStream", {"channel": ch, "thread_ts": "1.1", "markdown_text": "x"}, "chat:write"),
        ("chat.postEphemeral", {"channel": ch, "user": "U1", "text": "x"}, "chat:write"),
        ("assistant.threads.setStatus", {"channel_id": "D1", "thread_ts": "1.1", "status": "x"}, "chat:write"),
        ("assistant.threads.setTitle", {"channel_id": "D1", "thread_ts": "1.1", "title": "x"}, "assistant:write"),
        ("reactions.add", {"channel": ch, "timestamp": "1.1", "name": "eyes"}, "reactions:write"),
    ]:
        answer = refused(slack, method, **body)
        assert (answer["error"], answer["needed"], answer["provided"]) == ("missing_scope", scope, "channels:history")


def test_a_file_download_without_files_read_is_the_login_page(slack):
    shot = slack.add_file("error.png", "image/png", b"\x89PNG")
    slack.scopes.remove("files:read")
    status, kind, _ = download(shot["url_private"])
    assert (status, kind) == (200, "text/html")


# ── membership ───────────────────────────────────────────────────────────────────────────


def test_a_bot_not_in_a_public_channel_cannot_post_stream_whisper_or_react(slack):
    slack.scopes.append("reactions:write")
    ch = channel()
    ts = root(slack, ch)
    slack.remove_bot(ch)
    assert refused(slack, "chat.postMessage", channel=ch, text="x")["error"] == "not_in_channel"
    assert refused(slack, "chat.startStream", channel=ch, thread_ts=ts, markdown_text="x", recipient_user_id="U1",
                   recipient_team_id=TEAM)["error"] == "not_in_channel"
    assert refused(slack, "chat.postEphemeral", channel=ch, user="U1", text="x")["error"] == "not_in_channel"
    assert refused(slack, "reactions.add", channel=ch, timestamp=ts, name="eyes")["error"] == "not_in_channel"
    # conversations.replies documents no not_in_channel: a public channel reads with channels:history.
    assert call(slack, "conversations.replies", channel=ch, ts=ts)["ok"]
    slack.add_bot(ch)
    assert call(slack, "chat.postEphemeral", channel=ch, user="U1", text="x")["ok"]
    assert call(slack, "reactions.add", channel=ch, timestamp=ts, name="eyes")["ok"]


def test_a_private_channel_the_bot_is_not_in_does_not_exist_for_it(slack):
    ts = root(slack, "G500")
    slack.remove_bot("G500")
    assert refused(slack, "chat.postMessage", channel="G500", text="x")["error"] == "channel_not_found"
    assert refused(slack, "conversations.replies", channel="G500", ts=ts)["error"] == "channel_not_found"


def test_removing_the_bot_never_affects_a_dm(slack):
    slack.remove_bot("D200")
    assert call(slack, "chat.postMessage", channel="D200", text="x")["ok"]


# ── response_url ─────────────────────────────────────────────────────────────────────────


def test_a_response_url_takes_a_message_and_records_it(slack):
    url = slack.new_response_url()
    answer = WebhookClient(url).send_dict({"text": "Only you can see this", "response_type": "ephemeral"})
    assert (answer.status_code, answer.body) == (200, "ok")
    assert slack.responses == [{"text": "Only you can see this", "response_type": "ephemeral"}]
    replace = WebhookClient(url).send(text="Updated", replace_original=True, blocks=[section("Updated")])
    assert replace.status_code == 200 and slack.responses[-1]["replace_original"] is True


def test_a_response_url_refuses_what_it_cannot_read(slack):
    url = slack.new_response_url()
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc)
    conn.request("POST", urllib.parse.urlsplit(url).path, body="{not json", headers={"Content-Type": "application/json"})
    raw = conn.getresponse()
    assert (raw.status, raw.read()) == (400, b"invalid_payload")
    assert WebhookClient(url).send_dict({"response_type": "ephemeral"}).body == "invalid_payload"
    assert WebhookClient(url).send_dict({"text": "x", "response_type": "everyone"}).status_code == 400
    bad_blocks = WebhookClient(url).send_dict({"text": "x", "blocks": [section("s" * 3_001)]})
    assert (bad_blocks.status_code, bad_blocks.body) == (400, "invalid_blocks")
    assert slack.responses == []


def test_a_response_url_is_good_for_five_uses_in_thirty_minutes(slack):
    url = slack.new_response_url()
    for i in range(5):
        assert WebhookClient(url).send(text=f"update {i}").status_code == 200
    used = WebhookClient(url).send(text="one too many")
    assert (used.status_code, used.body) == (404, "used_url")
    old = slack.new_response_url()
    slack.response_urls[old]["issued"] -= 31 * 60
    assert WebhookClient(old).send(text="late").body == "expired_url"
    assert len(slack.responses) == 5


# ── reactions ────────────────────────────────────────────────────────────────────────────


def test_reactions_are_added_and_removed_as_slack_shows_them(slack):
    slack.scopes.append("reactions:write")
    ch = channel()
    ts = root(slack, ch)
    assert call(slack, "reactions.add", channel=ch, timestamp=ts, name="eyes")["ok"]
    assert refused(slack, "reactions.add", channel=ch, timestamp=ts, name="eyes")["error"] == "already_reacted"
    shown = call(slack, "conversations.replies", channel=ch, ts=ts)["messages"][0]
    assert shown["reactions"] == [{"name": "eyes", "users": [BOT_USER], "count": 1}]
    assert call(slack, "reactions.remove", channel=ch, timestamp=ts, name="eyes")["ok"]
    assert "reactions" not in call(slack, "conversations.replies", channel=ch, ts=ts)["messages"][0]
    assert refused(slack, "reactions.remove", channel=ch, timestamp=ts, name="eyes")["error"] == "no_reaction"


def test_reaction_errors(slack):
    slack.scopes.append("reactions:write")
    ch = channel()
    ts = root(slack, ch)
    assert refused(slack, "reactions.add", channel=ch, timestamp="1.999", name="eyes")["error"] == "message_not_found"
    assert refused(slack, "reactions.add", channel=ch, timestamp=ts, name=":eyes:")["error"] == "invalid_name"
    assert refused(slack, "reactions.add", channel=ch, timestamp=ts, name="Big Eyes")["error"] == "invalid_name"
    slack.known_emoji = {"white_check_mark"}
    assert refused(slack, "reactions.add", channel=ch, timestamp=ts, name="eyes")["error"] == "invalid_name"
    assert refused(slack, "reactions.add", channel=ch, name="white_check_mark")["error"] == "invalid_arguments"
    assert refused(slack, "reactions.remove", name="white_check_mark")["error"] == "no_item_specified"


def test_reactions_have_their_rate_tiers(slack):
    assert (slack.tiers["reactions.add"], slack.tiers["reactions.remove"]) == (50, 20)  # Tier 3, Tier 2
    slack.scopes.append("reactions:write")
    slack.tiers["reactions.add"] = 2
    ch = channel()
    ts = root(slack, ch)
    call(slack, "reactions.add", channel=ch, timestamp=ts, name="eyes")
    call(slack, "reactions.add", channel=ch, timestamp=ts, name="tada")
    with pytest.raises(SlackApiError) as e:
        web(slack).api_call("reactions.add", json={"channel": ch, "timestamp": ts, "name": "rocket"})
    assert e.value.response.status_code == 429 and int(e.value.response.headers["Retry-After"]) >= 1


# ── file downloads ───────────────────────────────────────────────────────────────────────


def download(url: str, token: str | None = SECRETS["SLACK_BOT_TOKEN"], follow: bool = True) -> tuple[int, str, bytes]:
    """GET ``url`` the way the bot does: the token on the first request only."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url)
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(*([] if follow else [NoRedirect()]))
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


def test_a_file_is_served_as_declared_even_when_its_bytes_are_something_else(slack):
    pdf_named_png = slack.add_file("error.png", "image/png", b"%PDF-1.4 not a png")
    assert download(pdf_named_png["url_private"]) == (200, "image/png", b"%PDF-1.4 not a png")
    assert download(pdf_named_png["url_private"], token=None)[1] == "text/html"  # the login page


def test_a_file_can_redirect_to_another_path_on_the_fake(slack):
    target = slack.add_file("real.png", "image/png", b"\x89PNG real")
    moved = slack.add_file("moved.png", "image/png", b"", redirect_to=target["url_private"])
    status, _, _ = download(moved["url_private"], follow=False)
    assert status == 302
    # Followed without the token (it is never carried across a redirect): Slack's login page.
    assert download(moved["url_private"])[1] == "text/html"


def test_a_file_can_redirect_to_a_foreign_server(slack):
    foreign = _http_server()
    try:
        foreign.expect_request("/elsewhere.png").respond_with_handler(
            lambda request: Response(b"foreign bytes" if "Authorization" not in request.headers else b"leaked",
                                     mimetype="image/png"))
        moved = slack.add_file("moved.png", "image/png", b"", redirect_to=foreign.url_for("/elsewhere.png"))
        assert download(moved["url_private"]) == (200, "image/png", b"foreign bytes")
    finally:
        foreign.clear()
        foreign.stop()


def test_a_file_can_trickle_in_one_byte_at_a_time(slack):
    slow = slack.add_file("slow.png", "image/png", b"\x89PNGabcd", trickle=0.05)
    request = urllib.request.Request(slow["url_private"], headers={"Authorization": f"Bearer {SECRETS['SLACK_BOT_TOKEN']}"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=10) as resp:
        first = resp.read(1)
        first_at = time.monotonic() - started
        rest = resp.read()
    total = time.monotonic() - started
    assert first + rest == b"\x89PNGabcd" and resp.headers["Content-Length"] == "8"
    assert total >= 7 * 0.05 and first_at < total

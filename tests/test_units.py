"""The pure parts, tested directly: configuration, redaction, event classification, thread ->
LLM messages, splitting long answers, knowledge selection, limits."""

from __future__ import annotations

import inspect
import io
import json
import logging
import threading

import pytest
from conftest import SECRETS
from fakes import wait_for
from slack_sdk import WebClient
from slack_sdk.socket_mode.builtin.client import SocketModeClient
from slack_sdk.socket_mode.builtin.connection import Connection

import ledger_bot as lb

ME = lb.BotIdentity(user_id="UBOT", bot_id="BBOT", team_id="T1")
VALID = {**SECRETS, "LITELLM_BASE_URL": "https://llm.example.com/api/v2"}


# ── configuration ────────────────────────────────────────────────────────────────────────


def test_valid_config_uses_documented_defaults():
    config = lb.load_config(VALID)
    assert config.ledger_bot_model == "bedrock-claude-4.5-sonnet"
    assert config.health_port == 8080 and config.ledger_bot_shutdown_grace_seconds is None
    # The drain waits as long as an answer may take, plus Slack time.
    assert config.drain_seconds == config.ledger_bot_answer_max_seconds + 10 == 250
    assert lb.load_config({**VALID, "LEDGER_BOT_SHUTDOWN_GRACE_SECONDS": "30"}).drain_seconds == 30
    assert config.knowledge_path == lb.DEFAULT_KNOWLEDGE


def test_every_bad_variable_is_reported_at_once_without_its_value():
    env = {"SLACK_BOT_TOKEN": "xoxp-NOT-A-BOT-TOKEN-SECRET", "HEALTH_PORT": "eighty", "LEDGER_BOT_WORKERS": "0",
           "LEDGER_BOT_STREAMING": "maybe", "LEDGER_BOT_KNOWLEDGE": "/no/such/dir"}
    with pytest.raises(lb.ConfigError) as err:
        lb.load_config(env)
    named = [p.split(":")[0] for p in err.value.problems]
    assert named == ["SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "LITELLM_DEVELOPER_KEY", "LITELLM_BASE_URL", "HEALTH_PORT",
                     "LEDGER_BOT_WORKERS", "LEDGER_BOT_STREAMING", "LEDGER_BOT_KNOWLEDGE"]
    assert "NOT-A-BOT-TOKEN" not in str(err.value.problems)


def test_lists_booleans_and_case_are_parsed_as_people_write_them():
    config = lb.load_config({**VALID, "LEDGER_BOT_ALLOWED_CHANNELS": " C1, C2 ,", "LEDGER_BOT_FOLLOW_UPS": "TRUE",
                             "LOG_LEVEL": "debug", "LOG_FORMAT": "Text"})
    assert config.ledger_bot_allowed_channels == ("C1", "C2")
    assert config.ledger_bot_follow_ups is True and config.log_level == "DEBUG" and config.log_format == "text"


def test_each_terminal_mode_reads_only_the_settings_it_uses():
    assert lb.load_config({}, lb.KnowledgeSettings).knowledge_path == lb.DEFAULT_KNOWLEDGE  # offline --eval
    with pytest.raises(lb.ConfigError) as err:
        lb.load_config({}, lb.GatewaySettings)  # --ask, --eval --online: no Slack token asked for
    assert [p.split(":")[0] for p in err.value.problems] == ["LITELLM_DEVELOPER_KEY", "LITELLM_BASE_URL"]


# ── redaction ────────────────────────────────────────────────────────────────────────────


def test_log_lines_redact_configured_secrets_and_token_shapes():
    redactor = lb.Redactor()
    redactor.add_secrets("plain-gateway-key-123")
    line = redactor("key=plain-gateway-key-123 auth=Bearer abcdef123456 xoxb-9-9-zz xapp-1-A-b ticket=tkt-1 sk-abcdefgh")
    assert "plain-gateway-key-123" not in line and "xoxb-9" not in line and "xapp-1" not in line
    assert "abcdef123456" not in line and "tkt-1" not in line and "sk-abcdefgh" not in line
    assert line.count(lb.REDACTED) == 6


def test_json_log_lines_have_the_stable_keys():
    stream = io.StringIO()
    lb.setup_logging("INFO", "json", stream)
    lb.log_event(logging.INFO, "answer", ref="lb-1", channel="C1", user="U1", latency_ms=5, outcome="ok",
                 tokens={"prompt": 1}, cost_usd=0.1, error=None)
    entry = json.loads(stream.getvalue())
    assert list(entry)[:3] == ["ts", "level", "event"]
    assert {k: entry[k] for k in ("event", "ref", "channel", "user", "outcome", "cost_usd")} == {
        "event": "answer", "ref": "lb-1", "channel": "C1", "user": "U1", "outcome": "ok", "cost_usd": 0.1}


# ── events ───────────────────────────────────────────────────────────────────────────────


def event(**fields):
    return lb.SlackEvent(**{"type": "app_mention", "channel": "C1", "user": "U1", "ts": "10.1", "text": "hi", **fields})


@pytest.mark.parametrize(("kind", "fields", "reason"), [
    ("message", {"type": "message", "channel_type": "channel"}, "not_addressed"),
    ("message", {"type": "message", "channel_type": "channel", "text": "<@UBOT> hi"}, "mention_twin"),
    ("message", {"type": "message", "channel_type": "im", "subtype": "message_changed"}, "subtype"),
    ("message", {"type": "message", "channel_type": "im", "bot_id": "BOTHER"}, "bot"),
    ("app_mention", {"user": "UBOT"}, "own_message"),
    ("app_mention", {"user": ""}, "malformed"),
    ("reaction_added", {}, "unsupported_event"),
])
def test_events_that_are_not_questions_are_ignored_with_a_reason(kind, fields, reason):
    assert lb.classify_event(kind, event(**fields), "Ev1", "T1", ME) == lb.Ignored(reason)


def test_thread_reply_in_a_channel_is_a_followup_only_when_enabled():
    e = event(type="message", channel_type="channel", thread_ts="9.0")
    assert lb.classify_event("message", e, "Ev1", "T1", ME) == lb.Ignored("not_addressed")
    q = lb.classify_event("message", e, "Ev1", "T1", ME, follow_ups=True)
    assert isinstance(q, lb.Question) and q.kind == "followup" and q.thread_ts == "9.0"


def test_mention_replies_in_its_thread_or_starts_one():
    top = lb.classify_event("app_mention", event(), "Ev1", "T1", ME)
    inner = lb.classify_event("app_mention", event(thread_ts="9.0"), "Ev2", "T1", ME)
    assert (top.thread_ts, top.in_thread) == ("10.1", False)
    assert (inner.thread_ts, inner.in_thread) == ("9.0", True)


# ── thread -> messages ───────────────────────────────────────────────────────────────────


def question(text="<@UBOT> and now?", ts="20.0", thread_ts="1.0"):
    return lb.Question(event_id="Ev", kind="mention", channel="C1", user="U2", team="T1", text=text, ts=ts,
                       thread_ts=thread_ts, in_thread=True)


def thread(n):
    return [{"ts": f"{i + 1}.0", "user": "U1", "text": f"message {i}"} for i in range(n)]


def test_history_is_bounded_oldest_first_and_the_question_always_stays():
    msgs = lb.build_llm_messages(question=question(), thread=thread(19), me=ME, system_prompt="S",
                                 max_messages=5, max_chars=100_000)
    # consecutive user turns are merged into one
    assert msgs[-1]["content"].endswith("<@U2>: and now?")
    assert "message 15" in msgs[-1]["content"] and "message 14" not in msgs[-1]["content"]
    tight = lb.build_llm_messages(question=question("<@UBOT> " + "q" * 1500), thread=thread(19), me=ME,
                                  system_prompt="S", max_messages=50, max_chars=1000)
    assert tight[-1]["content"] == "<@U2>: " + "q" * 1500


def test_question_that_cannot_fit_the_token_budget_is_refused():
    with pytest.raises(lb.QuestionTooLong):
        lb.build_llm_messages(question=question("x" * 5000), thread=[], me=ME, system_prompt="S", max_messages=5,
                              max_chars=100_000, token_budget=1000, count_tokens=len)


def test_token_budget_drops_oldest_history_first():
    msgs = lb.build_llm_messages(question=question(), thread=thread(10), me=ME, system_prompt="S", max_messages=50,
                                 max_chars=100_000, token_budget=120, count_tokens=len)
    assert "message 9" in msgs[-1]["content"] and "message 0" not in msgs[-1]["content"]


# ── splitting ────────────────────────────────────────────────────────────────────────────


def test_thirty_thousand_characters_with_code_blocks_split_within_limits_fences_balanced():
    parts = []
    for i in range(45):
        parts.append(f"Step {i}: run the journal import for ledger {i}.\n")
        parts.append("```sql\n" + "\n".join(f"select * from gl_je_lines where je_header_id = {i}{j};"
                                          for j in range(12)) + "\n```\n")
    text = "\n".join(parts)
    assert len(text) > 30_000
    pieces = lb.split_message(text, 12_000)
    assert len(pieces) >= 3 and all(len(p) <= 12_000 for p in pieces)
    assert all(p.count("```") % 2 == 0 for p in pieces)
    # Nothing lost: every original line is there, in order.
    lines = [ln for p in pieces for ln in p.split("\n") if not ln.startswith("```")]
    assert [ln for ln in lines if ln] == [ln for ln in text.split("\n") if ln and not ln.startswith("```")]


def test_a_cut_inside_a_code_block_closes_and_reopens_it_with_its_language():
    text = "intro\n\n```python\n" + "\n".join(f"x{i} = {i}" for i in range(200)) + "\n```\nend"
    first, second, *_ = lb.split_message(text, 500)
    assert first.endswith("\n```") and second.startswith("```python\n")


# ── knowledge ────────────────────────────────────────────────────────────────────────────


def test_markdown_is_split_at_headings_but_not_inside_code():
    sections = lb.split_sections("gl.md", "# GL\nintro\n## Journals\nimport them\n```\n# not a heading\n```\n")
    assert [s.label for s in sections] == ["gl.md § GL", "gl.md § GL > Journals"]
    assert "# not a heading" in sections[1].text


def test_relevant_sections_are_chosen_when_the_whole_base_does_not_fit():
    sections = [lb.Section("a.md", "Journal import", "journal import fails when the period is closed " * 5),
                lb.Section("b.md", "FX revaluation", "revaluation uses the month end rate " * 5),
                lb.Section("c.md", "Period close", "close the period after all journal batches post " * 5)]
    tokens = [len(s.render()) for s in sections]
    index = lb.BM25(sections)
    whole = lb.choose_knowledge(index, tokens, "why did the journal import fail", sum(tokens))
    assert whole.whole and len(whole.labels) == 3
    some = lb.choose_knowledge(index, tokens, "why did the journal import fail", tokens[0] + 10)
    assert not some.whole and some.labels == ("a.md § Journal import",)


# ── limits ───────────────────────────────────────────────────────────────────────────────


def test_rate_limit_says_when_to_try_again_and_recovers_after_the_window():
    now = [1_000_000.0]
    limits = lb.Limits(rate_limit=2, daily_budget_usd=50, user_daily_budget_usd=5, clock=lambda: now[0])
    assert isinstance(limits.admit("U1"), lb.Reservation) and isinstance(limits.admit("U1"), lb.Reservation)
    refusal = limits.admit("U1")
    assert refusal.outcome == "user_rate_limited" and "try again in 60 seconds" in refusal.text
    assert isinstance(limits.admit("U2"), lb.Reservation)
    now[0] += 61
    assert isinstance(limits.admit("U1"), lb.Reservation)


def test_daily_budgets_per_user_and_in_total_reset_at_utc_midnight():
    day = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    now = [day + 3600]
    limits = lb.Limits(rate_limit=0, daily_budget_usd=3, user_daily_budget_usd=1, clock=lambda: now[0])
    limits.settle(limits.admit("U1"), 1.0)
    assert limits.admit("U1").outcome == "user_budget_exhausted"
    limits.settle(limits.admit("U2"), 2.5)
    assert limits.admit("U3").outcome == "fleet_budget_exhausted"
    assert "today's LLM budget" in lb.OUTCOMES["fleet_budget_exhausted"].notice
    now[0] = day + 86_400 + 1
    assert isinstance(limits.admit("U1"), lb.Reservation)


def test_questions_arriving_together_reserve_budget_so_they_cannot_overspend():
    limits = lb.Limits(rate_limit=0, daily_budget_usd=1, user_daily_budget_usd=0)
    admitted = [r for r in (limits.admit(f"U{i}", reserve_usd=0.3) for i in range(30))
                if isinstance(r, lb.Reservation)]
    assert len(admitted) == 3  # 3 x 0.30 fits in 1.00; the 4th would not
    for r in admitted:
        limits.settle(r, 0.01)  # the real cost replaces the reservation
    assert isinstance(limits.admit("U99", reserve_usd=0.3), lb.Reservation)


def test_without_images_takes_back_exactly_what_with_images_added():
    messages = [{"role": "system", "content": [{"type": "text", "text": "sys", "cache_control": {"type": "x"}}]},
                {"role": "user", "content": "<@U1>: what is this?"}]
    shown = lb.with_images(messages, [("image/png", b"png-1"), ("image/jpeg", b"jpg-2")])
    text_only, images = lb.without_images(shown)
    assert images == 2
    assert text_only == [messages[0], {"role": "user", "content": [{"type": "text", "text": "<@U1>: what is this?"}]}]
    assert lb.without_images(messages) == (messages, 0)


def test_cost_comes_from_the_registered_prices_with_anthropic_cache_rates():
    model = lb.load_config(VALID).ledger_bot_model  # a gateway alias litellm does not know: Sonnet 4.5's prices
    assert lb.cost_usd(model, lb.Usage(prompt_tokens=1_000_000)) == pytest.approx(3.0)
    assert lb.cost_usd(model, lb.Usage(completion_tokens=1_000_000)) == pytest.approx(15.0)
    # Cache reads at 0.1x and cache writes at 1.25x of the input price.
    read = lb.cost_usd(model, lb.Usage(prompt_tokens=1_000_000, cached_tokens=1_000_000))
    written = lb.cost_usd(model, lb.Usage(prompt_tokens=1_000_000, cache_creation_tokens=1_000_000))
    assert read == pytest.approx(0.3) and written == pytest.approx(3.75)


def test_cost_is_what_litellm_computes_for_the_registered_alias():
    model = lb.load_config(VALID).ledger_bot_model
    lb.register_alias(model)
    for usage in (lb.Usage(prompt_tokens=12_345, completion_tokens=678, cached_tokens=9_000,
                           cache_creation_tokens=2_000),
                  lb.Usage(prompt_tokens=500, completion_tokens=40),
                  lb.Usage(prompt_tokens=100, cached_tokens=100)):
        prompt, completion = lb._litellm().cost_per_token(
            model=lb.model_id(model), prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, cache_read_input_tokens=usage.cached_tokens,
            cache_creation_input_tokens=usage.cache_creation_tokens)
        assert lb.cost_usd(model, usage) == pytest.approx(prompt + completion, rel=1e-9)


def test_token_counts_are_remembered_per_text():
    model = lb.load_config(VALID).ledger_bot_model
    count = lb.token_counter(model)
    text = "Reverse the journal in the next open period. " * 200
    before = lb._count_remembered.cache_info()
    first = count(text)
    assert count(text) == first == lb._litellm().token_counter(model=lb.model_id(model), text=text)
    after = lb._count_remembered.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert count("Reverse the journal.") == lb._litellm().token_counter(model=lb.model_id(model),
                                                                        text="Reverse the journal.")
    assert lb._count_remembered.cache_info() == after  # a short text is counted, not kept
    assert after.maxsize == 16  # one-off long texts cannot pile up
    assert count("") == 0


# ── health ───────────────────────────────────────────────────────────────────────────────


def test_health_turns_503_when_a_worker_is_stuck_and_recovers_when_it_finishes():
    release = threading.Event()
    metrics = lb.Metrics(lb.new_registry(), tuple(lb.OUTCOMES))
    pool = lb.WorkerPool(lambda job: release.wait(10), workers=1, queue_size=1, metrics=metrics)
    health = lb.Health()
    health.liveness_checks.append(lambda: pool.problem(stuck_after=0.05))
    assert health.live()[0] is True
    assert pool.submit(lb.Job(question=None, received=0.0))
    ok, body = wait_for(lambda: (r := health.live()) and not r[0] and r, 5, "a stuck worker reported")
    assert body["status"] == "unhealthy" and "stuck" in body["problems"][0]
    release.set()
    wait_for(lambda: health.live()[0], 5, "healthy again")
    pool.close()
    assert not any(t.is_alive() for t in pool.threads)


def test_ready_only_while_connected_and_never_after_stop_begins():
    health = lb.Health()
    assert health.readiness() == (False, {"status": "not_ready", "reason": "no live Slack Socket Mode connection"})
    health.ready()
    assert health.readiness()[0] is True
    health.stop()
    assert health.readiness()[0] is False and health.readiness()[1]["status"] == "stopping"
    health.ready()  # a reconnect while draining does not make it ready again
    assert health.readiness()[1]["status"] == "stopping"


# ── memory ───────────────────────────────────────────────────────────────────────────────


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(lb._malloc_trim() is None, reason="needs glibc's malloc_trim (the image has it)")
def test_freed_heap_pages_in_a_worker_arena_go_back_to_the_os():
    kept: list[bytes] = []

    def work() -> None:  # 60 MB in one thread's arena; every other block freed, leaving holes
        blocks = [bytes(100_000) + bytes([i % 256]) for i in range(600)]
        kept.extend(blocks[::2])

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    before = _rss_mib()
    assert lb.release_free_memory() is True
    assert before - _rss_mib() >= 10  # ~30 MB of holes; glibc alone keeps them resident
    assert len(kept) == 300


def test_releasing_memory_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(lb, "_malloc_trim", lambda: None)
    assert lb.release_free_memory() is False


# ── reply planning, mentions, budgets (pure) ─────────────────────────────────────────────


def test_rollover_planner_ends_a_message_at_a_paragraph_break_near_the_limit():
    shown = "x" * 900
    send, rest, end = lb.next_piece(shown, "more text\n\nnext paragraph", limit=1000, soft_zone=200)
    assert (send, rest, end) == ("more text\n\n", "next paragraph", True)
    assert lb.next_piece("short", " and more", limit=1000, soft_zone=200) == (" and more", "", False)


def test_rollover_planner_closes_and_reopens_a_code_fence_it_cuts():
    shown = "```sql\n" + "select 1;\n" * 90
    send, rest, end = lb.next_piece(shown, "select 2;\n" * 20, limit=1000, soft_zone=200)
    assert end and send.endswith("```") and rest.startswith("```sql\n")
    assert len(shown + send) <= 1000


def test_fence_seam_is_empty_outside_code_and_repairs_inside():
    assert lb.fence_seam("plain text") == ("", "")
    assert lb.fence_seam("```python\nx = 1") == ("\n```", "```python\n")


@pytest.mark.parametrize("loud", ["<!here>", "<!channel>", "<!everyone>", "<!here|here>", "<!subteam^S1|@gl>",
                                  "<!subteam^S1>", "@here", "@channel", "@everyone"])
def test_crowd_mentions_are_made_inert_and_stay_inert(loud):
    once = lb.neutralise_broadcasts(f"hey {loud} look")
    assert "<!" not in once and not any(f"@{w}" in once for w in ("here", "channel", "everyone"))
    assert lb.neutralise_broadcasts(once) == once


def test_answer_text_never_releases_half_a_crowd_mention():
    text = lb.AnswerText()
    shown = text.feed("ping <!he") + text.feed("re> now")
    rest, _ = text.end()
    assert "<!here>" not in shown + rest and "@\u2060here" in shown + rest


def test_rate_budget_is_a_sliding_window_per_method_and_per_channel_for_posts():
    now = [0.0]
    budget = lb.RateBudget({"chat.update": 2, "chat.postMessage": 60}, clock=lambda: now[0])
    assert budget.take("chat.update") and budget.take("chat.update") and not budget.take("chat.update")
    assert budget.take("chat.postMessage", channel="C1") and not budget.take("chat.postMessage", channel="C1")
    assert budget.take("chat.postMessage", channel="C2")
    now[0] = lb.RATE_WINDOW_SECONDS + 0.1
    assert budget.take("chat.update")
    budget.block("chat.update", 30)
    now[0] += 1
    assert not budget.take("chat.update")


def test_every_rate_budget_is_this_replicas_share_of_slacks_one_tier_table():
    share = lb.load_config({**VALID, "LEDGER_BOT_SLACK_RATE_SHARE": "0.5"}).ledger_bot_slack_rate_share
    limits = lb.rate_limits(share)
    assert limits.keys() == lb.SLACK_RATE_TIERS.keys()
    assert limits["chat.appendStream"] == 50 and limits["chat.startStream"] == 10
    assert limits["chat.postMessage"] == 60  # per channel: not shared between replicas


def test_every_outcome_has_a_level_and_failures_have_notices():
    assert {"ok", "stopped_by_user", "interrupted", "gateway_auth_error", "gateway_config_error",
            "gateway_budget_exhausted", "content_policy", "user_budget_exhausted",
            "fleet_budget_exhausted"} <= set(lb.OUTCOMES)
    for kind, outcome in lb.OUTCOMES.items():
        assert (outcome.notice is None) == (kind in ("ok", "stopped_by_user")), kind


@pytest.mark.parametrize(("chunks", "shown", "labels"), [
    (["Answer\n\n", "Sources: Manual", " and Spreadsheet are journal sources.\n\nRun it.\n\nSources: kb/gl.md"],
     "Answer\n\nSources: Manual and Spreadsheet are journal sources.\n\nRun it.", ["kb/gl.md"]),
    (["Answer.\n\nSources: doc-a ; doc-b\n"], "Answer.", ["doc-a", "doc-b"]),
    (["x <!subteam^S123|@" + "a" * 90, "> hi"], "x @\u2060" + "a" * 90 + " hi", []),
    (["South of ", "the border"], "South of the border", []),
])
def test_answer_text_shows_everything_but_the_last_sources_line(chunks, shown, labels):
    text = lb.AnswerText()
    out = "".join(text.feed(c) for c in chunks)
    rest, cited = text.end()
    assert out + rest == shown and cited == labels


class StubSlack:
    """A SlackApi (and SlackSurfaces) stand-in for Reply's own logic: streams work,
    chat.stopStream can be made to fail, and every call is recorded."""

    def __init__(self, stop_error=None, post_failures=0):
        self.calls, self.stop_error, self.streaming = [], stop_error, set()
        self.post_failures = post_failures

    def set_status(self, **kw):
        self.calls.append(("status", kw["thread_ts"]))
        return True

    def call(self, method, **kw):
        if method == "chat.startStream":
            self.calls.append(("start", kw["markdown_text"]))
            self.streaming.add("S1")
            return {"ok": True, "ts": "S1"}
        if method == "chat.appendStream":
            self.calls.append(("append", kw["markdown_text"]))
            return {"ok": True}
        assert method == "chat.stopStream", method
        self.calls.append(("stop", kw.get("markdown_text") or ""))
        if self.stop_error:
            raise lb.SlackError("chat.stopStream", self.stop_error)
        self.streaming.discard(kw["ts"])
        return {"ok": True}

    def post_message(self, **kw):
        if self.post_failures:
            self.post_failures -= 1
            raise lb.SlackError("chat.postMessage", "internal_error")
        self.calls.append(("post", kw["markdown"]))
        return f"P{len(self.calls)}"

    def update_message(self, **kw):
        self.calls.append(("update", kw["markdown"]))


def a_question() -> lb.Question:
    return lb.Question(event_id="e", kind="mention", channel="C1", user="U1", team="T1", text="q", ts="1.0",
                       thread_ts="1.0", in_thread=False)


@pytest.fixture
def stub_reply(tune):
    tune(STREAM_FLUSH_CHARS=1, STREAM_FLUSH_SECONDS=0.01, FINAL_WAIT_SECONDS=0.1)

    def make(api):
        metrics = lb.Metrics(lb.new_registry(), tuple(lb.OUTCOMES))
        reply = lb.Reply(api, api, a_question(), "lb-1", streaming=True, feedback=True, received=0.0,
                         metrics=metrics)
        reply.show_feedback()
        return reply

    return make


def test_a_stream_that_cannot_be_stopped_ends_in_a_posted_message(stub_reply, tune):
    api = StubSlack(stop_error="internal_error")
    reply = stub_reply(api)
    reply.add("Shown first.")
    tune(STREAM_FLUSH_CHARS=10_000)
    reply.add(" And the tail.")
    reply.finish()
    assert api.calls[-1] == ("post", " And the tail.")
    assert reply.state == "finished"


def test_a_failed_final_delivery_still_gets_a_notice_out(stub_reply):
    api = StubSlack(stop_error="internal_error")
    reply = stub_reply(api)
    reply.add("All of it shown.")
    with pytest.raises(lb.SlackError):
        reply.finish()  # nothing left to carry the ending: the reply is not finished
    assert reply.state == "closing"
    assert reply.fail("Sorry, Slack failed. (ref `lb-1`)")
    assert api.calls[-1] == ("post", "Sorry, Slack failed. (ref `lb-1`)")
    assert reply.state == "failed"


def test_shutdown_ends_a_reply_and_its_worker_stops_reading(stub_reply):
    api = StubSlack()
    reply = stub_reply(api)
    reply.add("Partial")
    assert reply.state == "streaming"
    assert reply.interrupt("I'm restarting (ref `lb-1`)")
    with pytest.raises(lb.Interrupted):
        reply.add(" more text the model keeps sending")
    assert not reply.fail("late notice") and api.streaming == set()
    assert api.calls[-1] == ("stop", " I'm restarting (ref `lb-1`)".replace(" I", "\n\nI"))
    assert reply.state == "interrupted"


def test_the_status_is_renewed_while_the_model_is_silent_and_not_after_text(stub_reply):
    api = StubSlack()
    reply = stub_reply(api)
    reply.feedback.status_at -= lb.STATUS_RENEW_SECONDS + 1  # Slack clears it after two minutes
    reply.flush_if_due()
    assert [c for c in api.calls if c[0] == "status"] == [("status", "1.0")] * 2
    reply.add("First text.")
    reply.feedback.status_at -= lb.STATUS_RENEW_SECONDS + 1
    reply.flush_if_due()
    assert len([c for c in api.calls if c[0] == "status"]) == 2  # a post clears it anyway


def test_a_reply_moves_only_as_its_table_says():
    assert set(lb.REPLY_MOVES) == lb.OPEN_STATES | lb.ENDED_STATES | {"closing"}
    assert all(not lb.REPLY_MOVES[state] for state in lb.ENDED_STATES)  # an ended reply stays ended
    reply = lb.Reply(StubSlack(), StubSlack(), a_question(), "lb-1", streaming=True, feedback=False, received=0.0,
                     metrics=lb.Metrics(lb.new_registry(), tuple(lb.OUTCOMES)))
    with pytest.raises(AssertionError, match="no move from thinking to finished"):
        reply._to("finished")


# ── what the module relies on ────────────────────────────────────────────────────────────


def _litellm_stream_response():
    """A streaming completion from litellm against a local server, as stream_completion gets it."""
    import http.server

    class SSE(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SSE)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        return lb._litellm().completion(model="litellm_proxy/x", messages=[{"role": "user", "content": "hi"}],
                                        api_base=url, api_key="k", stream=True, max_retries=0)
    finally:
        server.shutdown()


RELIANCE_CHECKS = {
    "slack_sdk WebClient._perform_urllib_http_request_internal(url, req)": lambda: list(
        inspect.signature(WebClient._perform_urllib_http_request_internal).parameters) == ["self", "url", "req"],
    "slack_sdk WebClient.proxy and .ssl": lambda: all(
        hasattr(WebClient(token="xoxb-x"), name) for name in ("proxy", "ssl")),
    "slack_sdk SocketModeClient.connect_operation_lock": lambda: hasattr(
        SocketModeClient(app_token="xapp-x", auto_reconnect_enabled=False).connect_operation_lock, "locked"),
    "slack_sdk SocketModeClient.current_session.last_ping_pong_time": lambda: "last_ping_pong_time" in inspect.getsource(
        Connection.__init__) and "current_session" in inspect.getsource(SocketModeClient.__init__),
    "slack_sdk SocketModeClient.current_session.sock": lambda: "self.sock" in inspect.getsource(Connection.connect),
    "slack_sdk SocketModeClient.message_processor": lambda: hasattr(
        SocketModeClient(app_token="xapp-x", auto_reconnect_enabled=False).message_processor, "is_alive"),
    "litellm streaming response .completion_stream (an openai Stream with .response)": lambda: hasattr(
        _litellm_stream_response().completion_stream.response, "iter_lines"),
    "litellm.model_cost entries with max_input_tokens and the four prices": lambda: set(lb.MODEL_FACTS) <= set(
        lb._litellm().model_cost[lb.FALLBACK_MODEL]),
}


def test_every_reliance_on_a_dependencys_internals_is_listed_and_checked():
    assert RELIANCE_CHECKS.keys() == lb.RELIED_ON.keys()


@pytest.mark.parametrize("reliance", sorted(lb.RELIED_ON))
def test_a_dependency_still_has_what_the_module_relies_on(reliance):
    assert RELIANCE_CHECKS[reliance](), f"{reliance} changed: {lb.RELIED_ON[reliance]}"

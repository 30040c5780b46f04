"""The bot against the REAL LiteLLM proxy (the pinned litellm's own proxy, under /api/v2, default
retries) in front of the fake upstream: what a person sees, the answer's outcome, how long the
notice takes and how many upstream calls one question costs, for every way the gateway fails.

Needs the proxy's server dependencies (requirements-proxy.lock); skipped without them.
The proxy starts once per session (~7 s); tests/proxy/harness.py says how it is set up.
"""

from __future__ import annotations

import json
import time

import pytest
from fakes import Script, wait_for
from proxy.harness import (
    BOT_KEY,
    CONTEXT_EXCEEDED,
    OVER_BUDGET_KEY,
    PROXY_RETRIES,
    UPSTREAM_MODEL,
    missing_dependencies,
    session_proxy,
    upstream_error,
)
from test_answers import answers
from test_bot import log_lines, mention, replies

MISSING = missing_dependencies()
pytestmark = [
    pytest.mark.proxy,
    pytest.mark.skipif(bool(MISSING), reason=(
        f"the LiteLLM proxy's server dependencies are not installed (missing: {', '.join(MISSING)}); "
        "install them with: pip install --require-hashes -r requirements-dev.lock -r requirements-proxy.lock")),
]

TIMEOUT = 8  # LEDGER_BOT_LLM_TIMEOUT_SECONDS: above the proxy's own retry time (~5 s for 3 upstream calls)
NOTICE_WITHIN = TIMEOUT + 5  # issue 11: question -> failure notice
MAX_UPSTREAM_CALLS = 1 + PROXY_RETRIES  # issue 11: no retries stacked on the proxy's own


@pytest.fixture(scope="session")
def real_proxy():
    yield from session_proxy()


@pytest.fixture
def proxy(real_proxy):
    real_proxy.reset()
    yield real_proxy
    real_proxy.reset()  # releases an upstream answer still waiting, so the bot's teardown is quick


@pytest.fixture
def bot_via_proxy(start_bot, proxy):
    """The bot with the gateway = the real proxy, and its production retry default."""

    def start(**overrides: str):
        return start_bot(**{
            "LITELLM_BASE_URL": proxy.api_base,
            "LITELLM_DEVELOPER_KEY": BOT_KEY,
            "LEDGER_BOT_LLM_TIMEOUT_SECONDS": str(TIMEOUT),
            **overrides,
        })

    return start


def ask(slack, socket_mode, capsys, question="why did the journal import skip GL_INTERFACE rows?"):
    """Ask once; return (texts of the bot's finished replies, seconds from question to them,
    the question's `answer` log line). Waits a little past the notice bound, no longer, so a
    slow notice fails on the bound itself."""
    started = time.monotonic()
    msg, _ = mention(slack, socket_mode, question)
    wait = NOTICE_WITHIN + 3
    try:
        texts = replies(slack, "C100", msg["ts"], timeout=wait)
    except AssertionError:
        shown = slack.reply_texts("C100", msg["ts"])
        raise AssertionError(f"no finished reply {wait} s after the question (bound: LEDGER_BOT_LLM_TIMEOUT_SECONDS"
                             f" + 5 = {NOTICE_WITHIN} s); Slack shows {shown!r}") from None
    seconds = time.monotonic() - started
    seen: list[dict] = []

    def answer_logged():
        seen.extend(log_lines(capsys.readouterr().out))
        return [line for line in seen if line.get("event") == "answer"]

    lines = wait_for(answer_logged, 5, "the answer's log line")
    assert len(lines) == 1, lines
    return texts, seconds, lines[0]


# ── the happy path ───────────────────────────────────────────────────────────────────────


def test_answer_through_the_real_proxy(bot_via_proxy, proxy, slack, socket_mode, capsys):
    bot = bot_via_proxy()
    before = answers(bot, "ok")  # the counters live in the process, across tests
    proxy.upstream.script(Script(text="Check the GL_INTERFACE status column first.", chunk_size=6))
    texts, seconds, line = ask(slack, socket_mode, capsys)
    assert texts == ["Check the GL_INTERFACE status column first."]
    assert line["outcome"] == "ok"
    wait_for(lambda: answers(bot, "ok") == before + 1, 5, "ledger_bot_answers_total{outcome=ok} + 1")
    assert len(proxy.upstream.requests) == 1
    sent = proxy.upstream.requests[0].body
    assert sent["model"] == UPSTREAM_MODEL and sent["stream"] is True
    assert sent["messages"][-1]["content"].endswith("why did the journal import skip GL_INTERFACE rows?")
    # The proxy took the bot's key as its virtual key and finished the request.
    logged = wait_for(proxy.request_log, 5, "the proxy's request log")
    assert [(e["key_alias"], e["status"]) for e in logged] == [("ledger-bot", "success")]


# ── failures: one row per way the gateway fails ──────────────────────────────────────────

E500 = upstream_error(500, "upstream exploded", type_="server_error", headers={})
E429 = upstream_error(429, "Rate limit reached for requests", type_="rate_limit_error", headers={})

FAILURES = {
    # id: (bot env overrides, upstream default script or None, outcome, words in the notice, upstream calls allowed)
    "wrong_key": ({"LITELLM_DEVELOPER_KEY": "sk-revoked-or-mistyped-key"}, None,
                  "gateway_auth_error", "misconfigured", 0),
    "unknown_alias": ({"LEDGER_BOT_MODEL": "no-such-alias"}, None, "gateway_config_error", "misconfigured", 0),
    "key_over_budget": ({"LITELLM_DEVELOPER_KEY": OVER_BUDGET_KEY}, None,
                        "gateway_budget_exhausted", "budget", 0),
    "upstream_500": ({}, E500, "gateway_error", "gateway", MAX_UPSTREAM_CALLS),
    "upstream_429": ({}, E429, "rate_limited", "rate limit", MAX_UPSTREAM_CALLS),
    # The proxy itself never times out a slow upstream (its default request timeout is 6000 s):
    # the bot's deadline is all there is.
    "slow_first_token": ({}, Script(first_token_delay=TIMEOUT + 30), "timeout", "took too long", MAX_UPSTREAM_CALLS),
    "context_window": ({}, CONTEXT_EXCEEDED, "context_too_long", "too long", MAX_UPSTREAM_CALLS),
}


@pytest.mark.parametrize(("overrides", "upstream_script", "outcome", "words", "max_calls"),
                         list(FAILURES.values()), ids=list(FAILURES))
def test_gateway_failure_through_the_real_proxy(bot_via_proxy, proxy, slack, socket_mode, capsys,
                                                overrides, upstream_script, outcome, words, max_calls):
    bot = bot_via_proxy(**overrides)
    if upstream_script is not None:
        proxy.upstream.default = lambda body: upstream_script  # every upstream call, retries included
    before = answers(bot, outcome)
    texts, seconds, line = ask(slack, socket_mode, capsys)
    calls = len(proxy.upstream.requests)
    assert len(texts) == 1, texts
    notice = texts[0]
    assert seconds <= NOTICE_WITHIN, f"notice after {seconds:.1f} s (bound {NOTICE_WITHIN} s): {notice!r}"
    assert calls <= max_calls, f"{calls} upstream calls for one question (at most {max_calls}); notice {notice!r}"
    assert line["outcome"] == outcome, (line, notice)
    assert words in notice.lower(), notice
    assert "ref `lb-" in notice and "Traceback" not in notice and "status" not in notice.lower()
    wait_for(lambda: answers(bot, outcome) == before + 1, 5, f"ledger_bot_answers_total{{outcome={outcome}}} + 1")


def test_upstream_dying_mid_stream_through_the_real_proxy(bot_via_proxy, proxy, slack, socket_mode, capsys, tune):
    # The proxy turns the upstream's dropped connection into an SSE error event (code "500")
    # after the chunks it already sent, then [DONE]; it cannot retry a stream already under way.
    tune(STREAM_FLUSH_CHARS=1)
    bot = bot_via_proxy()
    proxy.upstream.script(Script(text="Partial answer that gets cut off here", chunk_size=8, cut_after_chunks=2))
    before = answers(bot, "gateway_error")
    texts, seconds, line = ask(slack, socket_mode, capsys)
    assert len(proxy.upstream.requests) == 1
    assert len(texts) == 1 and texts[0].startswith("Partial answer"), texts  # what was shown stays
    notice = texts[0]
    assert seconds <= NOTICE_WITHIN, f"notice after {seconds:.1f} s (bound {NOTICE_WITHIN} s)"
    assert line["outcome"] == "gateway_error", line
    assert "gateway" in notice.lower() and "ref `lb-" in notice, notice
    wait_for(lambda: answers(bot, "gateway_error") == before + 1, 5,
             "ledger_bot_answers_total{outcome=gateway_error} + 1")


# ── who asked (issue 11, item 6) ─────────────────────────────────────────────────────────


def test_gateway_can_tell_who_asked_without_seeing_slack_ids(bot_via_proxy, proxy, slack, socket_mode, capsys):
    bot_via_proxy()
    ask(slack, socket_mode, capsys)
    entry = wait_for(proxy.request_log, 5, "the proxy's request log")[0]
    entry = {"end_user": entry["end_user"], "request_tags": entry["request_tags"]}  # not the headers: they hold the key
    assert entry["end_user"], f"no `user` reached the proxy's spend tracking: {entry}"
    assert "U1" not in entry["end_user"] and "T0000001" not in entry["end_user"], entry
    assert "ledger-bot" in entry["request_tags"], entry


# ── keep-alive ───────────────────────────────────────────────────────────────────────────


@pytest.mark.timeout(180)
def test_questions_at_the_proxys_keep_alive_boundary_are_all_answered(start_bot, real_proxy, slack, socket_mode,
                                                                      tmp_path, capsys):
    """uvicorn under the proxy closes a keep-alive connection idle for --keepalive_timeout (1 s
    here; 5 s by default). A question that goes out on a pooled connection just as the proxy
    closes it meets a connection closed without an answer, and is retried on a fresh one."""
    from proxy.harness import start_proxy

    proxy = start_proxy(real_proxy.upstream, tmp_path, keepalive_seconds=1)
    try:
        start_bot(LITELLM_BASE_URL=proxy.api_base, LITELLM_DEVELOPER_KEY=BOT_KEY,
                  LEDGER_BOT_LLM_TIMEOUT_SECONDS=str(TIMEOUT))
        shown = []
        for i in range(15):
            msg, _ = mention(slack, socket_mode, f"question {i} at the boundary")
            shown.append(replies(slack, "C100", msg["ts"], timeout=NOTICE_WITHIN + 3))
            # The scenario, not synchronisation: stay idle across the proxy's 1 s boundary.
            time.sleep(0.94 + 0.01 * i)
        assert shown == [["The answer is 42."]] * 15
        outcomes = [x["outcome"] for x in log_lines(capsys.readouterr().out) if x["event"] == "answer"]
        assert outcomes == ["ok"] * 15
    finally:
        proxy.stop()


# ── a tool round (issue 22) ──────────────────────────────────────────────────────────────


def test_one_tool_round_through_the_real_proxy(bot_via_proxy, proxy, slack, socket_mode, capsys):
    from test_tools import FIXTURE, TRADE_BUY, tool_then_answer

    bot_via_proxy(LEDGER_BOT_REPO=str(FIXTURE))
    proxy.upstream.default = tool_then_answer([[("find_impact_builders", {"query": "TradeBuy"})]],
                                              f"TradeBuyImpactBuilder puts payload.tradeId in ATTRIBUTE6.\n"
                                              f"Sources: {TRADE_BUY}")
    texts, _, line = ask(slack, socket_mode, capsys, "what does TradeBuyImpactBuilder put in attribute6?")
    assert texts == ["Let me check the repository.\n\nTradeBuyImpactBuilder puts payload.tradeId in ATTRIBUTE6."]
    assert line["outcome"] == "ok"
    first, second = (r.body for r in proxy.upstream.requests)
    assert [t["function"]["name"] for t in second["tools"]] == [t["function"]["name"] for t in first["tools"]]
    call = second["messages"][-2]["tool_calls"][0]
    result = second["messages"][-1]
    assert call["function"]["name"] == "find_impact_builders" and json.loads(call["function"]["arguments"]) == {
        "query": "TradeBuy"}
    assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
    assert "TradeBuyImpactBuilder accepts TradeBuyPayload" in result["content"]
    tasks = [ch for c in slack.calls for ch in c.params.get("chunks") or [] if ch.get("type") == "task_update"]
    assert [t["status"] for t in tasks] == ["in_progress", "complete"]
    logged = wait_for(lambda: len(proxy.request_log()) >= 2 and proxy.request_log(), 5, "the proxy's request log")
    assert [e["status"] for e in logged] == ["success", "success"]

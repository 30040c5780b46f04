"""The bot as a process, exactly as users and Kubernetes run it: `python ledger_bot.py`."""

from __future__ import annotations

import json
import signal

from conftest import SECRETS, run_subprocess
from fakes import BOT_USER, TEAM, Script, wait_for


def assert_no_secrets(*outputs: str) -> None:
    for out in outputs:
        for name, value in SECRETS.items():
            assert value not in out, f"{name} leaked"
            assert value[10:] not in out, f"part of {name} leaked"


def test_bad_config_exits_2_naming_every_bad_variable_without_values():
    env = {"SLACK_BOT_TOKEN": "xoxp-" + SECRETS["SLACK_BOT_TOKEN"][5:], "SLACK_APP_TOKEN": SECRETS["SLACK_APP_TOKEN"],
           "HEALTH_PORT": "http", "LEDGER_BOT_LLM_TIMEOUT_SECONDS": "-1"}
    proc = run_subprocess([], env)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    for name in ("SLACK_BOT_TOKEN", "LITELLM_DEVELOPER_KEY", "LITELLM_BASE_URL", "HEALTH_PORT",
                 "LEDGER_BOT_LLM_TIMEOUT_SECONDS"):
        assert name in err
    assert "SLACK_APP_TOKEN" not in err  # that one is fine
    assert_no_secrets(out, err)


def test_check_passes_against_healthy_upstreams(env):
    proc = run_subprocess(["--check"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "PASS  slack auth.test" in out and "PASS  llm gateway" in out and "RESULT: PASS" in out
    assert_no_secrets(out, err)


def test_check_fails_and_says_which_upstream(env, slack, gateway):
    slack.fail("auth.test", error="invalid_auth")
    gateway.script(Script(status=500))
    proc = run_subprocess(["--check"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "FAIL  slack auth.test: Slack refused the bot token (invalid_auth)" in out
    assert "FAIL  llm gateway" in out and "gateway_error" in out and "RESULT: FAIL" in out
    assert_no_secrets(out, err)


def test_sigterm_mid_answer_lets_the_answer_land_and_exits_0_with_no_secret_in_debug_logs(
        spawn_bot, slack, socket_mode, gateway):
    bot = spawn_bot(LOG_LEVEL="DEBUG")
    wait_for(lambda: bot.get("/health")[0] == 200, 10, "/health 200")
    wait_for(lambda: bot.get("/ready")[0] == 200, 20, "/ready 200")
    gateway.script(Script(text="Landed after SIGTERM.", first_token_delay=2))
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> question")
    socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                            "ts": msg["ts"], "team": TEAM})
    wait_for(lambda: gateway.requests, 20, "question at the gateway")
    bot.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: bot.get("/ready")[0] in (0, 503), 5, "/ready 503 after SIGTERM")
    code, out, err = bot.terminate(timeout=30)
    assert code == 0
    assert slack.reply_texts("C100", msg["ts"]) == ["Landed after SIGTERM."]
    non_json = [line for line in out.splitlines() if not line.startswith("{")]
    assert non_json == []
    lines = [json.loads(line) for line in out.splitlines()]
    events = [line["event"] for line in lines]
    assert "stop_requested" in events and "stopped" in events
    assert events.index("stopped") > events.index("stop_requested")
    assert any(line["event"] == "question_text" for line in lines)  # DEBUG really was on
    assert_no_secrets(out, err)


def test_health_answers_before_slack_is_reachable_and_ready_says_why(spawn_bot):
    bot = spawn_bot(SLACK_API_URL="http://127.0.0.1:9/api/")  # nothing listens on port 9
    wait_for(lambda: bot.get("/health")[0] == 200, 10, "/health 200")
    status, body = wait_for(lambda: (r := bot.get("/ready")) and "unreachable" in r[1] and r, 20,
                            "/ready saying why")
    assert status == 503 and json.loads(body)["reason"] == "Slack Web API unreachable (URLError); retrying"
    code, out, _ = bot.terminate()
    assert code == 0
    assert '"event": "slack_unreachable"' in out


def test_a_rollout_that_outlasts_the_drain_ends_the_answer_with_a_notice_and_counts_it(
        spawn_bot, slack, socket_mode, gateway):
    """SIGTERM 3 s into a 40 s answer with a 2 s drain: the person is told to ask again, the
    stream is stopped, and the outcome is logged (Kubernetes then has 20 s of grace left)."""
    bot = spawn_bot(LEDGER_BOT_SHUTDOWN_GRACE_SECONDS="2")
    wait_for(lambda: bot.get("/ready")[0] == 200, 20, "/ready 200")
    gateway.script(Script(text="A slow answer. " * 40, chunk_size=15, chunk_delay=1))
    msg = slack.add_message("C100", user="U1", text=f"<@{BOT_USER}> a long question")
    socket_mode.send_event({"type": "app_mention", "channel": "C100", "user": "U1", "text": msg["text"],
                            "ts": msg["ts"], "team": TEAM})
    wait_for(lambda: slack.calls_to("chat.startStream"), 20, "the answer streaming")
    bot.proc.send_signal(signal.SIGTERM)
    code, out, err = bot.terminate(timeout=30)
    assert code == 0
    shown = slack.reply_texts("C100", msg["ts"])
    assert shown[-1].startswith("A slow answer.") and "I'm restarting" in shown[-1]
    assert not any(m.get("streaming") for m in slack.bot_replies("C100", msg["ts"]))
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [x["outcome"] for x in lines if x["event"] == "answer"] == ["interrupted"]
    assert any(x["event"] == "drain_timeout" and x["level"] == "error" for x in lines)
    assert_no_secrets(out, err)

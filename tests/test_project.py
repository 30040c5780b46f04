"""The project's own files agree with the code: README, .env.example, the Slack app manifest."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import msgspec
import pytest
import yaml
from conftest import ROOT

import ledger_bot as lb

ENV_VARS = {f.name.upper() for f in msgspec.structs.fields(lb.Config)}
SOURCE = (ROOT / "ledger_bot.py").read_text(encoding="utf-8")

# Slack Web API methods -> the bot scopes they need (docs.slack.dev/reference/methods/...).
# assistant.threads.setStatus accepts chat:write; conversations.replies needs the history scope
# of the conversation type; file downloads need files:read; a message shortcut needs commands.
SCOPES_FOR_METHOD = {
    "auth.test": set(),
    "apps.connections.open": set(),  # app-level token, connections:write
    "chat.postMessage": {"chat:write"},
    "chat.update": {"chat:write"},
    "chat.postEphemeral": {"chat:write"},
    "chat.startStream": {"chat:write"},
    "chat.appendStream": {"chat:write"},
    "chat.stopStream": {"chat:write"},
    "assistant.threads.setStatus": {"chat:write"},
    "assistant.threads.setSuggestedPrompts": {"assistant:write"},
    "assistant.threads.setTitle": {"assistant:write"},
    "conversations.replies": {"channels:history", "groups:history", "im:history", "mpim:history"},
    "reactions.add": {"reactions:write"},
    "views.open": set(),
    "views.publish": set(),
    "files": {"files:read"},  # SlackApi.download: url_private with the bot token
}
EVENTS_HANDLED = {"app_mention": {"app_mentions:read"}, "message.im": {"im:history"},
                  "assistant_thread_started": {"assistant:write"}, "app_home_opened": set()}
FOLLOW_UP_EVENTS = {"message.channels": {"channels:history"}, "message.groups": {"groups:history"},
                    "message.mpim": {"mpim:history"}}
MANIFESTS = {"slack-app-manifest.yaml": EVENTS_HANDLED,
             "slack-app-manifest.follow-ups.yaml": {**EVENTS_HANDLED, **FOLLOW_UP_EVENTS}}


def test_readme_configuration_table_lists_exactly_the_config_variables():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.M))
    assert table == ENV_VARS


def test_every_setting_is_exercised_by_a_test():
    """A setting nobody tests is a setting nobody knows works: each is set by some test."""
    tests = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")
                     if p.name != "test_project.py")
    untested = sorted(v for v in ENV_VARS if not re.search(rf"\b{v}\b", tests))
    assert untested == []


def test_env_example_lists_every_variable_and_nothing_else():
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    assert named == ENV_VARS
    required = {f.name.upper() for f in msgspec.structs.fields(lb.Config) if f.required}
    assert required == set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example, re.M))


def test_defaults_in_readme_match_the_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for field in msgspec.structs.fields(lb.Config):
        if field.required or not isinstance(field.default, (int, float)) or isinstance(field.default, bool):
            continue
        row = re.search(rf"^\| `{field.name.upper()}` \| `([^`]+)` \|", readme, re.M)
        assert row, field.name
        assert float(row.group(1)) == float(field.default), field.name


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_declares_exactly_the_scopes_and_events_the_code_uses(name):
    manifest = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    called = set(re.findall(r'\.call\(\s*"([\w.]+)"', SOURCE)) | {"apps.connections.open", "files"}
    assert called <= SCOPES_FOR_METHOD.keys(), called - SCOPES_FOR_METHOD.keys()
    assert {"views.publish", "assistant.threads.setTitle", "chat.appendStream"} <= called  # the regex still reads
    events = MANIFESTS[name]
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == set(events)
    needed = set().union(*(SCOPES_FOR_METHOD[m] for m in called), *events.values()) | {"commands"}
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == needed
    assert manifest["settings"]["socket_mode_enabled"] is True
    assert manifest["settings"]["interactivity"]["is_enabled"] is True  # feedback, shortcut, modal
    assert manifest["features"]["app_home"]["home_tab_enabled"] is True
    assert [s["callback_id"] for s in manifest["features"]["shortcuts"]] == [lb.SHORTCUT_CALLBACK]
    assert manifest["features"]["assistant_view"]["assistant_description"]


# Slack's own manifest schema (slackapi/manifest-schema, MIT; see tests/schemas/README.md): what
# "Create New App -> From a manifest" checks a manifest against.
MANIFEST_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "manifest.schema.2.0.0.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_slack_accepts_the_manifest(name):
    manifest = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(MANIFEST_SCHEMA).iter_errors(manifest)]
    assert errors == []


def test_the_schema_check_can_fail():
    manifest = yaml.safe_load((ROOT / "slack-app-manifest.yaml").read_text(encoding="utf-8"))
    manifest["features"]["shortcuts"][0]["name"] = "Ask ledger-bot about this thread"  # 32 > 24
    errors = list(jsonschema.Draft7Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    assert [list(e.absolute_path) for e in errors] == [["features", "shortcuts", 0, "name"]]


def test_the_follow_ups_manifest_is_the_manifest_plus_the_follow_up_events():
    plain = yaml.safe_load((ROOT / "slack-app-manifest.yaml").read_text(encoding="utf-8"))
    follow_ups = yaml.safe_load((ROOT / "slack-app-manifest.follow-ups.yaml").read_text(encoding="utf-8"))
    events = follow_ups["settings"]["event_subscriptions"]["bot_events"]
    assert set(events) - set(plain["settings"]["event_subscriptions"]["bot_events"]) == set(FOLLOW_UP_EVENTS)
    follow_ups["settings"]["event_subscriptions"]["bot_events"] = plain["settings"]["event_subscriptions"]["bot_events"]
    assert follow_ups == plain


def test_the_home_tab_names_the_shortcut_as_the_manifest_does():
    manifest = yaml.safe_load((ROOT / "slack-app-manifest.yaml").read_text(encoding="utf-8"))
    assert [s["name"] for s in manifest["features"]["shortcuts"]] == [lb.SHORTCUT_NAME]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(line for line in readme.splitlines() if line.endswith("-m pytest"))
    assert test_command in ci.splitlines()


def test_help_and_version_work_without_any_configuration():
    out = subprocess.run([sys.executable, str(ROOT / "ledger_bot.py"), "--help"], capture_output=True, text=True,
                         env={}, timeout=30)
    assert out.returncode == 0 and "--check" in out.stdout
    version = subprocess.run([sys.executable, str(ROOT / "ledger_bot.py"), "--version"], capture_output=True,
                             text=True, env={}, timeout=30)
    assert version.stdout.strip() == f"ledger-bot {lb.__version__}"


# ── the module's shape (issue 21) ────────────────────────────────────────────────────────


def test_the_docstrings_map_names_every_section_in_order():
    mapped = re.findall(r"^\s*(\d+)\. ([A-Z][\w /]*?)\s+- ", lb.__doc__ or "", re.M)
    headers = [(n, re.split(r"[:(]", title)[0].strip()) for n, title in re.findall(r"^# (\d+)\. (.+)$", SOURCE, re.M)]
    assert mapped == headers, "the module docstring's map and the section headers disagree"
    assert [int(n) for n, _ in headers] == list(range(1, len(headers) + 1))


def test_no_class_is_over_200_lines():
    import ast

    sizes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(SOURCE))
             if isinstance(node, ast.ClassDef)}
    assert {name: n for name, n in sizes.items() if n > 200} == {}

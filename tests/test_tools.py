"""Answers from the GL Publisher repository itself (issue 22): the index and what it never
holds, the five tools, the tool loop against a gateway as strict as the LiteLLM proxy in front
of Bedrock, the task UI in Slack, the sources linked at the indexed commit, and the terminal
modes. The repository is tests/fixtures/gl-publisher, committed into a fresh git repository
with trap files added (secrets, binaries, build output, symlinks out of the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import types
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT, run_subprocess
from fakes import Script, gateway_error, wait_for
from test_answers import metrics
from test_bot import log_lines, mention, replies

import ledger_bot as lb

FIXTURE = ROOT / "tests" / "fixtures" / "gl-publisher"
REPO_URL = "https://github.com/wealthsimple/oracle-gl-publisher"
BUILDERS = "queue-processor/src/main/kotlin/com/wealthsimple/oracleglpublisher/queueprocessor/glrecordbuilders"
TRADE_BUY = f"{BUILDERS}/trade/TradeBuyImpactBuilder.kt"
# Secret shapes written into the trap files: assembled here so no scanner mistakes this file
# for a leak.
AWS_KEY = "AKIA" + "QWERTYUIOPASDFGH"
SLACK_TOKEN = "xoxb-" + "1234567890-abcdefghij"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCY1EXAMPLEKEY"
STRIPE_KEY = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
                               "HOME": str(repo)}).stdout.strip()


# What must never be indexed, and why (the reason RepoIndex.left_out counts).
TRAPS = {
    ".env": ("secret", "SLACK_BOT_TOKEN=" + SLACK_TOKEN),
    ".env.production": ("secret", "DB_PASSWORD=hunter2hunter2"),
    "deploy/id_rsa": ("secret", "not a key, but named like one"),
    "deploy/tls.pem": ("secret", "certificate"),
    "deploy/signing.key": ("secret", "key"),
    f"{BUILDERS}/AwsClient.kt": ("secret", f'val accessKey = "{AWS_KEY}"'),
    "common/src/main/resources/application-local.yaml": ("secret", 'password: "s3cr3t-password-1234"'),
    "docs/diagram.png": ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "docs/latin1.txt": ("binary", "caf\xe9".encode("latin-1")),
    "queue-processor/target/classes/Generated.kt": (None, "class Generated"),
    "api/build/generated.kt": (None, "class Generated"),
    "ui/node_modules/left-pad/index.js": (None, "module.exports = 1"),
    "docs/huge.md": ("large", "x" * (lb.REPO_FILE_MAX_BYTES + 1)),
    # Secret-shaped whatever the case, in a folder of secrets, or a credential in any spelling.
    ".ENV": ("secret", "KEY=abc"),
    "deploy/PROD.KEY": ("secret", "key"),
    "deploy/Server.PEM": ("secret", "certificate"),
    "secrets/prod.yaml": ("secret", "replicas: 2"),
    "ops/.aws/credentials": ("secret", "[default]"),
    "infra/prod.tfvars": ("secret", 'region = "ca-central-1"'),
    "ops/aws.ini": ("secret", f"aws_secret_access_key = {AWS_SECRET}"),
    "common/src/main/resources/db.properties": ("secret", "spring.datasource.password=hunter2hunter2"),
    "ops/env.sh": ("secret", 'export DB_PASSWORD="correct-horse-battery"'),
    "ops/billing.kt": ("secret", f'val key = "{STRIPE_KEY}"'),
    "ops/signing.asc": ("secret", "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQ\n"),
}
# Code that names credentials without holding one stays searchable.
NOT_SECRETS = {
    "common/src/main/kotlin/TokenClient.kt": "val token = tokenProvider.next(request)\nval password = System.getenv(\"DB_PASSWORD\")\n",
    "common/src/main/resources/application.yaml": "password: ${DB_PASSWORD}\ntoken: ${GL_TOKEN}\n",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The fixture repository committed into git, with TRAPS and symlinks out of the checkout."""
    root = tmp_path_factory.mktemp("checkout") / "oracle-gl-publisher"
    shutil.copytree(FIXTURE, root)
    for path, (_, content) in TRAPS.items():
        file = root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content if isinstance(content, bytes) else content.encode())
    for path, content in NOT_SECRETS.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    (root / "docs" / "passwd").symlink_to("/etc/passwd")
    (root / "etc-link").symlink_to("/etc", target_is_directory=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A", "-f")
    git(root, "commit", "-q", "-m", "fixture")
    return root


@pytest.fixture(scope="module")
def index(repo) -> lb.RepoIndex:
    return lb.RepoIndex.build(repo, REPO_URL)


def run(index, name: str, **args) -> lb.ToolResult:
    return lb.run_tool(index, name, json.dumps(args))


# ── the index: what it holds, and what it never does ─────────────────────────────────────


def test_the_index_holds_the_fixture_at_its_commit_and_leaves_out_every_trap(repo, index):
    assert index.commit == git(repo, "rev-parse", "HEAD")
    assert len(index.paths) >= 200 and TRADE_BUY in index.paths
    assert not any(p.startswith(".git/") for p in index.paths)
    for path in TRAPS:
        assert path not in index.paths, path
    assert "docs/passwd" not in index.paths and not any(p.startswith("etc-link") for p in index.paths)
    expected = {"secret": 18, "binary": 2, "large": 1, "symlink": 1}  # etc-link is never entered
    assert dict(index.left_out) == expected
    assert set(NOT_SECRETS) <= set(index.paths)
    assert lb.check_fts5() == lb.sqlite3.sqlite_version


@pytest.mark.parametrize("path, says", [
    ("../etc/passwd", "outside the repository"),
    ("/etc/passwd", "outside the repository"),
    ("docs/../../x", "outside the repository"),
    ("docs/passwd", "not in the repository's index"),
    ("etc-link/passwd", "not in the repository's index"),
    (".env", "secret-shaped"),
    ("deploy/id_rsa", "secret-shaped"),
    (f"{BUILDERS}/AwsClient.kt", "not in the repository's index"),
    ("docs/diagram.png", "not in the repository's index"),
    ("queue-processor/target/classes/Generated.kt", "not in the repository's index"),
    (".git/config", "not in the repository's index"),
])
def test_read_file_refuses_what_is_outside_secret_or_not_indexed(index, path, says):
    result = run(index, "read_file", path=path)
    assert not result.ok and says in result.text and result.files == ()


def test_no_tool_result_ever_holds_a_trap_file_or_its_content(index):
    texts = [run(index, "search_code", query=q).text for q in ("SLACK_BOT_TOKEN", "accessKey", "DB_PASSWORD", "Generated",
                                                              "left-pad", "password")]
    texts.append(run(index, "search_code", query="passwd", path_glob="*").text)
    for text in texts:
        assert SLACK_TOKEN not in text and AWS_KEY not in text and "hunter2" not in text
        assert "target/" not in text and "node_modules" not in text and "s3cr3t" not in text


def test_the_commit_is_read_from_gits_files_for_every_shape_of_checkout(repo, tmp_path):
    head = git(repo, "rev-parse", "HEAD")
    assert lb.checkout_commit(repo) == head  # a branch, its ref loose
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "pack-refs", "--all")
    assert not (clone / ".git" / "refs" / "heads" / "main").exists()
    assert lb.checkout_commit(clone) == head  # a branch, its ref packed
    git(clone, "checkout", "-q", "--detach")
    assert lb.checkout_commit(clone) == head  # detached
    worktree = tmp_path / "worktrees" / head  # what git-sync makes: a worktree per commit ...
    git(repo, "worktree", "add", "-q", "--detach", str(worktree), head)
    link = tmp_path / "oracle-gl-publisher"  # ... and a symlink to the current one
    link.symlink_to(worktree)
    assert (worktree / ".git").is_file() and lb.checkout_commit(link) == head
    assert lb.checkout_commit(tmp_path) is None  # not a checkout


# ── the tools ────────────────────────────────────────────────────────────────────────────


def test_search_adrs_finds_decisions_with_their_title_and_status_and_never_the_readme(index):
    result = run(index, "search_adrs", query="idempotency key")
    assert result.ok and result.files[0][0] == "docs/adr/0007-idempotency-key-meaning.md"
    assert "ADR-0007: Idempotency Key Meaning (status: Accepted (2023-01-10))" in result.text
    everything = run(index, "search_adrs", query="the")  # no searchable words: every ADR
    assert len(everything.files) == 13 and "docs/adr/README.md" not in dict(everything.files)


def test_search_code_returns_path_line_with_the_lines_around_it_and_honours_the_glob(index):
    result = run(index, "search_code", query="ImpactBuild original.externalSourceId")
    assert result.ok and result.files[0][0] == f"{BUILDERS}/ReversalImpactBuilder.kt"
    assert f"{BUILDERS}/ReversalImpactBuilder.kt:" in result.text
    assert "original.externalSourceId" in result.text  # a partial identifier matched (trigrams)
    only_docs = run(index, "search_code", query="externalSourceId", path_glob="docs/*")
    assert only_docs.files and all(path.startswith("docs/") for path, _ in only_docs.files)
    assert run(index, "search_code", query="zzqqxxnothing").text.startswith("Nothing matches")
    assert not run(index, "search_code", query="a an").ok


def test_read_file_numbers_lines_and_reads_a_range(index):
    result = run(index, "read_file", path=TRADE_BUY, start_line=31, end_line=33)
    assert result.files == ((TRADE_BUY, (31, 33)),)
    lines = result.text.splitlines()
    assert lines[0].startswith(f"{TRADE_BUY} (lines 31-33 of ") and lines[1].lstrip().startswith("31  ")
    assert "class TradeBuyImpactBuilder" in result.text and len(lines) == 4
    assert not run(index, "read_file", path=TRADE_BUY, start_line=5000).ok
    assert run(index, "read_file", path="./" + TRADE_BUY).files == ((TRADE_BUY, None),)


def test_get_schema_info_gives_a_tables_section_or_the_list(index):
    section = run(index, "get_schema_info", table="gl_je_lines")
    assert section.text.startswith("## GL_JE_LINES") and "## GL_CODE_COMBINATIONS" not in section.text
    listing = run(index, "get_schema_info")
    assert "GL_INTERFACE" in listing.text and "GL_PERIOD_STATUSES" in listing.text
    missing = run(index, "get_schema_info", table="GL_NOPE")
    assert not missing.ok and "GL_INTERFACE" in missing.text


def test_find_impact_builders_names_each_class_with_its_accepted_type(index):
    spend = run(index, "find_impact_builders", query="CardSpend")
    assert spend.text.startswith("SpendImpactBuilder accepts CardSpendPayload")
    everything = run(index, "find_impact_builders")
    names = [line.split()[0] for line in everything.text.splitlines() if " accepts " in line]
    assert len(names) >= 25 and names == sorted(names)  # alphabetical, as many as fit the cap
    assert "ImpactBuilder accepts" not in everything.text.splitlines()[0][:14]  # not the interface


def test_a_result_is_capped_and_says_it_was_cut(index):
    result = run(index, "find_impact_builders")
    assert len(result.text) <= lb.TOOL_RESULT_MAX_CHARS
    assert "[cut: " in result.text and "more characters not shown" in result.text


@pytest.mark.parametrize("name, arguments, says", [
    ("search_code", '{"query": 5}', "Expected `str`, got `int`"),
    ("search_code", '{"query": "x", "limit": 3}', "unknown field `limit`"),
    ("read_file", "{}", "missing required field `path`"),
    ("read_file", '{"path": "a", "start_line": 0}', "Expected `int` >= 1"),
    ("read_file", '{"path": "a"', "invalid arguments"),
    ("drop_tables", "{}", "there is no tool 'drop_tables'"),
])
def test_arguments_are_validated_before_anything_runs(index, name, arguments, says):
    result = lb.run_tool(index, name, arguments)
    assert not result.ok and result.text.startswith("Error: ") and says in result.text


def test_a_tool_that_crashes_gives_the_model_an_error_and_logs(index, monkeypatch, caplog):
    def boom(index, args):
        raise RuntimeError("bug")

    monkeypatch.setitem(lb.TOOLS, "search_adrs", lb.Tool(lb.SearchAdrs, boom))
    result = run(index, "search_adrs", query="x")
    assert not result.ok and "failed unexpectedly" in result.text
    assert any(r.message == "tool_crashed" for r in caplog.records)


def test_tool_schemas_are_json_schemas_the_model_is_given_whole():
    assert [t["function"]["name"] for t in lb.TOOL_SCHEMAS] == list(lb.TOOLS)
    for tool in lb.TOOL_SCHEMAS:
        parameters = tool["function"]["parameters"]
        jsonschema.Draft202012Validator.check_schema(parameters)
        assert parameters["type"] == "object" and parameters["additionalProperties"] is False
        assert tool["function"]["description"] and "``" not in tool["function"]["description"]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in lb.TOOL_SCHEMAS}
    assert schema["read_file"]["required"] == ["path"] and schema["search_code"]["required"] == ["query"]
    assert schema["get_schema_info"].get("required", []) == []
    assert schema["read_file"]["properties"]["start_line"] == {"type": "integer", "minimum": 1}


def test_links_point_at_the_indexed_commit_and_lines(index):
    assert index.link(TRADE_BUY, (31, 33)) == f"{REPO_URL}/blob/{index.commit}/{TRADE_BUY}#L31-L33"
    assert index.link("docs/a b.md") == f"{REPO_URL}/blob/{index.commit}/docs/a%20b.md"
    adr = "docs/adr/0001-idempotency.md"
    assert index.link(adr, (3, 5)) == f"{REPO_URL}/blob/{index.commit}/{adr}?plain=1#L3-L5"
    assert lb.RepoIndex([("a.md", "x")], commit=None, url="").link("a.md") == ""


# ── the store: rebuilt off the answer path, broken checkouts keep the old index ──────────


@pytest.mark.parametrize("label", [f"`{TRADE_BUY}` (lines 1-20)", f"[{TRADE_BUY}](https://x.test)",
                                   f"{TRADE_BUY}:12", f"**{TRADE_BUY}**", f"{TRADE_BUY}#L1-L20"])
def test_a_file_the_calls_showed_is_cited_however_the_model_writes_its_label(index, label):
    session = lb.ToolSession(index, lambda step: None)
    session.call(lb.ToolCall(id="c1", name="read_file",
                             arguments=json.dumps({"path": TRADE_BUY, "start_line": 1, "end_line": 20})))
    [source] = session.cited([label, "a/file/it/never/showed.kt"])
    assert source.source == TRADE_BUY and source.url == f"{REPO_URL}/blob/{index.commit}/{TRADE_BUY}#L1-L20"


def test_a_new_commit_is_indexed_in_the_background_and_swapped_whole(repo, tmp_path, tune, caplog):
    caplog.set_level("INFO", logger="ledger_bot")
    tune(REPO_CHECK_SECONDS=0)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    store = lb.RepoStore(clone, REPO_URL)
    store.start()
    assert store.built.wait(30) and store.current() is not None
    first = store.current()
    (clone / "docs" / "adr" / "0014-new-decision.md").write_text("# ADR-0014: Tools in Slack\n\nStatus: Proposed\n")
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "-m", "new ADR")
    store.current()  # notices the commit, builds in the background
    store.wait_building(30)
    second = store.current()
    assert second is not first and second.commit == git(clone, "rev-parse", "HEAD")
    assert "docs/adr/0014-new-decision.md" in second.paths and "docs/adr/0014-new-decision.md" not in first.paths
    assert sum(r.message == "repo_indexed" for r in caplog.records) == 2


def test_a_broken_checkout_keeps_the_old_index_and_logs_one_line(repo, tmp_path, tune, caplog):
    tune(REPO_CHECK_SECONDS=0)
    link = tmp_path / "oracle-gl-publisher"
    link.symlink_to(repo)
    store = lb.RepoStore(link, REPO_URL)
    store.start()
    assert store.built.wait(30)
    good = store.current()
    link.unlink()
    link.symlink_to(tmp_path / "gone")  # a sync that went wrong
    for _ in range(3):
        store.current()
        store.wait_building(30)
    assert store.current() is good
    failed = [r for r in caplog.records if r.message == "repo_index_failed"]
    assert len(failed) == 1 and failed[0].fields["kept_commit"] == good.commit


def test_a_folder_missing_at_start_is_indexed_once_it_appears(tmp_path, tune, caplog):
    """A folder with no commit to change (not yet synced, or not a git checkout) is tried again
    every REPO_RETRY_SECONDS; the failure is said once."""
    tune(REPO_CHECK_SECONDS=0, REPO_RETRY_SECONDS=0)
    root = tmp_path / "checkout"
    store = lb.RepoStore(root, REPO_URL)
    store.start()
    assert store.built.wait(30)
    for _ in range(3):
        assert store.current() is None
        store.wait_building(30)
    root.mkdir()
    (root / "README.md").write_text("# GL Publisher\n")
    wait_for(lambda: store.current() is not None, 30, "the folder indexed")
    assert list(store.current().paths) == ["README.md"]
    assert len([r for r in caplog.records if r.message == "repo_index_failed"]) == 1


def test_odd_files_are_left_out_and_never_stop_the_build(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "README.md").write_text("# GL Publisher\n")
    os.mkfifo(root / "pipe")  # reading it would never end
    (root / os.fsdecode(b"caf\xe9.md")).write_text("a name git allows and SQLite refuses")
    (root / ".git").write_text("gitdir: /var/run/git-sync/.git/worktrees/abc\n")  # git-sync's pointer
    (root / "locked.md").write_text("unreadable")
    read_bytes = Path.read_bytes

    def refuse_locked(self):
        if self.name == "locked.md":  # tests run as root, for whom chmod 000 changes nothing
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    index = lb.RepoIndex.build(root, REPO_URL)
    assert list(index.paths) == ["README.md"]
    assert dict(index.left_out) == {"special": 1, "name": 1, "unreadable": 1}


def test_line_numbers_are_githubs_even_with_form_feeds_and_unicode_separators():
    text = "a\x0cb\u2028c\r\nfun target() {}\n"
    assert lb.source_lines(text) == ["a\x0cb\u2028c", "fun target() {}"] and lb.source_lines("") == []
    index = lb.RepoIndex([("src/Odd.kt", text)], commit="a" * 40, url=REPO_URL)
    hit = lb.run_tool(index, "search_code", json.dumps({"query": "target"}))
    assert "    2  fun target() {}" in hit.text.splitlines(), hit.text
    assert "of 2)" in lb.run_tool(index, "read_file", json.dumps({"path": "src/Odd.kt"})).text


def test_arguments_the_model_cannot_encode_give_a_plain_title():
    assert lb.tool_step_title("read_file", '{"path": "\ud800"}') == "Calling read_file"


def test_tool_results_are_cut_oldest_first_and_the_question_never():
    messages = [{"role": "system", "content": "s" * 100}, {"role": "user", "content": "the question"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "old " * 100},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "b", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "b", "content": "new " * 100}]
    count = len
    total = sum(lb.message_tokens(m, count) for m in messages)
    lb.fit_tool_results(messages, count, total - 10)
    assert messages[3]["content"] == lb.TOOL_RESULT_DROPPED and messages[5]["content"] == "new " * 100
    lb.fit_tool_results(messages, count, 0)  # cannot fit: every result goes, nothing else
    assert messages[5]["content"] == lb.TOOL_RESULT_DROPPED and messages[1]["content"] == "the question"


# ── the fake gateway is as strict as the proxy in front of Bedrock ───────────────────────


def completion(gateway, **body):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(gateway.base_url + "/chat/completions", method="POST",
                                     data=json.dumps({"model": "bedrock-claude-4.5-sonnet", **body}).encode(),
                                     headers={"Authorization": "Bearer sk-litellm-SECRETGATEWAYKEY",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "tooluse_1", "type": "function", "function": {"name": "search_adrs", "arguments": '{"query": "x"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "tooluse_1", "content": "docs/adr/0007..."}
ASKED = {"role": "user", "content": "why?"}


@pytest.mark.parametrize("body, says", [
    ({"messages": [ASKED, CALL, RESULT]}, "The toolConfig field must be defined"),
    ({"messages": [ASKED], "tools": lb.TOOL_SCHEMAS, "tool_choice": "none"}, "doesn't support tool_choice=none"),
    ({"messages": [ASKED, CALL], "tools": lb.TOOL_SCHEMAS}, "Expected toolResult blocks"),
    ({"messages": [ASKED, CALL, {**RESULT, "tool_call_id": "other"}], "tools": lb.TOOL_SCHEMAS},
     "Expected toolResult blocks"),
    ({"messages": [ASKED, CALL, {**RESULT, "content": [{"type": "text", "text": "x"}]}], "tools": lb.TOOL_SCHEMAS},
     "must follow a tool call and be text"),
    ({"messages": [ASKED, {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {
        "name": "search_adrs", "arguments": '{"query": "tr'}}]}, RESULT], "tools": lb.TOOL_SCHEMAS},
     "arguments must be a JSON object"),
])
def test_the_fake_gateway_refuses_what_bedrock_behind_the_proxy_refuses(gateway, body, says):
    status, text = completion(gateway, stream=True, **body)
    assert status == 400 and says in json.loads(text)["error"]["message"]
    assert completion(gateway, stream=True, messages=[ASKED, CALL, RESULT], tools=lb.TOOL_SCHEMAS)[0] == 200


def test_the_fake_gateway_streams_tool_calls_in_the_proxys_shapes(gateway):
    gateway.script(Script(text="", tool_calls=[("search_adrs", {"query": "reversal accrual"})], chunk_size=4))
    status, text = completion(gateway, stream=True, messages=[ASKED], tools=lb.TOOL_SCHEMAS)
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    start = deltas[0]["tool_calls"][0]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] == ""
    assert start["function"] == {"arguments": "", "name": "search_adrs"} and start["index"] == 0
    assert start["id"].startswith("tooluse_")
    fragments = [d["tool_calls"][0] for d in deltas[1:] if d.get("tool_calls")]
    assert all(set(f) == {"function", "type", "index"} for f in fragments)
    assert json.loads("".join(f["function"]["arguments"] for f in fragments)) == {"query": "reversal accrual"}
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]


# ── in Slack ─────────────────────────────────────────────────────────────────────────────


def tool_then_answer(calls, answer):
    """A model that makes ``calls`` (a list per round) and then writes ``answer``."""
    def respond(body):
        rounds = sum(1 for m in body["messages"] if m.get("tool_calls"))
        if rounds < len(calls):
            return Script(text="Let me check the repository." if not rounds else "", tool_calls=calls[rounds])
        return Script(text=answer, prompt_tokens=1_000, completion_tokens=50)

    return respond


@pytest.fixture
def repo_env(repo):
    return {"LEDGER_BOT_REPO": str(repo), "LEDGER_BOT_REPO_URL": REPO_URL}


def test_a_question_that_needs_the_code_is_answered_through_a_tool_round_with_the_task_and_the_link(
        start_bot, slack, socket_mode, gateway, repo_env, index, capsys):
    bot = start_bot(**repo_env)
    answer = f"TradeBuyImpactBuilder puts payload.tradeId in ATTRIBUTE6.\nSources: {TRADE_BUY}"
    gateway.default = tool_then_answer([[("find_impact_builders", {"query": "TradeBuy"})]], answer)
    msg, _ = mention(slack, socket_mode, "what does TradeBuyImpactBuilder put in attribute6?")
    shown = replies(slack, "C100", msg["ts"])
    assert shown == ["Let me check the repository.\n\nTradeBuyImpactBuilder puts payload.tradeId in ATTRIBUTE6."]
    # Two requests, the same tools on both, never tool_choice or parallel_tool_calls.
    first, second = (r.body for r in gateway.requests)
    assert first["tools"] == second["tools"] == lb.TOOL_SCHEMAS
    assert not {"tool_choice", "parallel_tool_calls"} & (first.keys() | second.keys())
    assert lb.TOOLS_PROMPT in first["messages"][0]["content"][0]["text"]
    asked, result = second["messages"][-2:]
    assert asked["tool_calls"][0]["function"] == {"name": "find_impact_builders", "arguments": '{"query": "TradeBuy"}'}
    assert result["tool_call_id"] == asked["tool_calls"][0]["id"] and isinstance(result["content"], str)
    assert result["content"].startswith("TradeBuyImpactBuilder accepts TradeBuyPayload")
    # The task, shown while it ran, in the stream's chunks (never markdown_text beside them).
    stream_calls = [c for c in slack.calls if c.method.startswith("chat.") and "Stream" in c.method]
    assert all("markdown_text" not in c.params for c in stream_calls)
    tasks = [ch for c in stream_calls for ch in c.params.get("chunks") or [] if ch["type"] == "task_update"]
    assert [t["status"] for t in tasks] == ["in_progress", "complete"]
    assert tasks[0]["title"] == "Finding Impact Builders for “TradeBuy”"
    link = f"{REPO_URL}/blob/{index.commit}/{TRADE_BUY}"
    found = run(index, "find_impact_builders", query="TradeBuy").files
    assert tasks[1]["output"] == f"{len(found)} files"
    assert tasks[1]["sources"][0] == {"type": "url", "url": link, "text": TRADE_BUY}
    assert slack.bot_replies("C100", msg["ts"])[0]["tasks"]["tool-1"]["status"] == "complete"
    # The file joins the Sources, linked at the indexed commit.
    sources = slack.calls_to("chat.stopStream")[-1].params["blocks"][0]["elements"][0]["text"]
    assert f"<{link}|" in sources
    # Both rounds counted: tokens, the tool metrics, the indexed commit.
    seen = metrics(bot)
    assert seen[("ledger_bot_tool_calls_total", (("result", "ok"), ("tool", "find_impact_builders")))] == 1
    assert seen[("ledger_bot_repo_info", (("commit", index.commit),))] == 1
    assert seen[("ledger_bot_repo_files", ())] == len(index.paths)
    assert seen[("ledger_bot_llm_tokens_total", (("kind", "prompt"),))] == 100 + 1_000
    line = next(x for x in log_lines(capsys.readouterr().out) if x["event"] == "answer")
    assert line["outcome"] == "ok"


def test_without_a_repository_nothing_changes(start_bot, slack, socket_mode, gateway):
    bot = start_bot()
    gateway.script(Script(text="From the knowledge."))
    msg, _ = mention(slack, socket_mode)
    assert replies(slack, "C100", msg["ts"]) == ["From the knowledge."]
    body = gateway.requests[0].body
    assert "tools" not in body and lb.TOOLS_PROMPT not in json.dumps(body)
    assert all("chunks" not in c.params for c in slack.calls if "Stream" in c.method)
    assert "ledger_bot_tool_calls_total{" not in bot.get("/metrics")[1]


def test_after_the_last_round_the_model_must_answer_and_a_model_that_will_not_is_told_so(
        start_bot, slack, socket_mode, gateway, repo_env):
    start_bot(LEDGER_BOT_TOOL_ROUNDS="2", **repo_env)
    gateway.default = lambda body: Script(text="", tool_calls=[("search_adrs", {"query": "reversal"})])
    msg, _ = mention(slack, socket_mode, "tell me everything about reversals")
    assert replies(slack, "C100", msg["ts"]) == [lb.TOOL_ROUNDS_SPENT]
    bodies = [r.body for r in gateway.requests]
    assert len(bodies) == 3  # two rounds of calls, then the one in which it must answer
    assert bodies[2]["messages"][-1]["content"].endswith(lb.LAST_ROUND_NOTE)
    assert all(b["tools"] == lb.TOOL_SCHEMAS and "tool_choice" not in b for b in bodies)


def test_an_opening_line_before_the_calls_is_not_taken_for_the_answer(start_bot, slack, socket_mode, gateway,
                                                                      repo_env):
    start_bot(LEDGER_BOT_TOOL_ROUNDS="1", **repo_env)
    gateway.script(Script(text="Let me check the repository.", tool_calls=[("search_adrs", {"query": "reversal"})]))
    gateway.default = lambda body: Script(text="", tool_calls=[("search_adrs", {"query": "reversal"})])
    msg, _ = mention(slack, socket_mode, "tell me everything about reversals")
    assert replies(slack, "C100", msg["ts"]) == ["Let me check the repository.\n\n" + lb.TOOL_ROUNDS_SPENT]


def test_a_failing_tool_tells_the_model_and_never_fails_the_answer(start_bot, slack, socket_mode, gateway, repo_env):
    bot = start_bot(**repo_env)
    gateway.default = tool_then_answer([[("read_file", {"path": "../../etc/passwd"})]], "I could not read that.")
    msg, _ = mention(slack, socket_mode, "show me /etc/passwd")
    assert replies(slack, "C100", msg["ts"])[0].endswith("I could not read that.")
    result = gateway.requests[1].body["messages"][-1]
    assert result["content"] == "Error: ../../etc/passwd is outside the repository."
    seen = metrics(bot)
    assert seen[("ledger_bot_tool_calls_total", (("result", "error"), ("tool", "read_file")))] == 1
    tasks = [ch for c in slack.calls for ch in c.params.get("chunks") or [] if ch.get("type") == "task_update"]
    assert tasks[-1]["status"] == "error"


def test_stop_during_a_tool_round_stops_the_answer_and_asks_the_model_no_more(
        start_bot, slack, socket_mode, gateway, repo_env, capsys):
    start_bot(**repo_env)
    gateway.default = tool_then_answer([[("search_adrs", {"query": "x"})]] * 3, "never shown")
    original = slack._m_chat_startStream

    def stop_at_once(p):  # the person presses Stop as soon as the stream appears
        answer = original(p)
        slack.press_stop(answer["ts"])
        return answer

    slack._m_chat_startStream = stop_at_once
    msg, _ = mention(slack, socket_mode, "reversals?")
    line = wait_for(lambda: [x for x in log_lines(capsys.readouterr().out) if x["event"] == "answer"], 15,
                    "the answer line")[0]
    assert line["outcome"] == "stopped_by_user"
    assert len(gateway.requests) == 1 and "never shown" not in json.dumps(slack.bot_replies("C100", msg["ts"]))


def test_shutdown_drains_an_answer_between_its_rounds(start_bot, slack, socket_mode, gateway, repo_env):
    bot = start_bot(**repo_env)
    release = threading.Event()
    respond = tool_then_answer([[("get_schema_info", {"table": "GL_INTERFACE"})]], "GL_INTERFACE holds them.")
    gateway.default = lambda body: (Script(text="GL_INTERFACE holds them.", release=release)
                                    if any(m.get("role") == "tool" for m in body["messages"]) else respond(body))
    msg, _ = mention(slack, socket_mode, "which table?")
    wait_for(lambda: len(gateway.requests) == 2, 15, "the second round to be asked")
    bot.stop_event.set()  # SIGTERM's drain: /ready goes 503, the answer in flight finishes
    wait_for(lambda: bot.get("/ready")[0] == 503, 5, "/ready 503")
    release.set()
    assert replies(slack, "C100", msg["ts"])[-1].endswith("GL_INTERFACE holds them.")
    bot.thread.join(30)
    assert bot.result["exit"] == 0


def test_no_task_is_left_running_when_the_stream_gives_way_to_posts(start_bot, slack, socket_mode, gateway,
                                                                     repo_env):
    """The append that would complete the task fails: the reply goes on as posts, which cannot
    show tasks, so the stream is ended with the task closed, never spinning forever."""
    start_bot(**repo_env)
    gateway.default = tool_then_answer([[("search_adrs", {"query": "reversal"})]], "Answer.")
    append = slack._m_chat_appendStream
    failed = threading.Event()

    def fail_the_completion(p):
        tasks = [c for c in p.get("chunks") or [] if c.get("type") == "task_update"]
        if any(t["status"] == "complete" for t in tasks) and not failed.is_set():
            failed.set()
            return {"ok": False, "error": "internal_error"}
        return append(p)

    slack._m_chat_appendStream = fail_the_completion
    msg, _ = mention(slack, socket_mode, "reversals?")
    wait_for(lambda: "".join(replies(slack, "C100", msg["ts"])).endswith("Answer."), 15, "the whole answer")
    assert failed.is_set()
    tasks = [t for m in slack.bot_replies("C100", msg["ts"]) for t in (m.get("tasks") or {}).values()]
    assert tasks and all(t["status"] != "in_progress" for t in tasks), tasks
    assert tasks[0]["output"] == lb.TASK_NOT_SHOWN


def test_a_task_running_across_a_rollover_is_closed_above_and_shown_running_below():
    calls: list[tuple[str, dict]] = []

    class Api:
        def call(self, method: str, wait: float, **params) -> dict:
            calls.append((method, params))
            return {"ok": True, "ts": f"1.{len(calls)}"}

    q = types.SimpleNamespace(channel="C1", thread_ts="1.0", user="U1", team="T1")
    delivery = lb.StreamDelivery(Api(), q, "lb-test", lambda text: None, chunks=True)
    box = lb.Outbox(text="Looking.", tasks=[lb.task_chunk("tool-1", "Searching ADRs", "in_progress")])
    delivery.send(box, None, 0)
    box.text = "word " * (lb.MARKDOWN_LIMIT // 5 + 100)  # more than one message holds
    delivery.send(box, None, 0)
    assert [m for m, _ in calls] == ["chat.startStream", "chat.stopStream", "chat.startStream"]

    def tasks(params: dict) -> list[tuple[str, str, str]]:
        return [(c["id"], c["status"], c.get("output", "")) for c in params["chunks"] if c["type"] == "task_update"]

    assert tasks(calls[1][1]) == [("tool-1", "complete", lb.TASK_CONTINUED)]
    assert tasks(calls[2][1]) == [("tool-1", "in_progress", "")]
    assert list(delivery.running) == ["tool-1"] and not box.tasks


def test_a_reply_that_is_posted_shows_each_call_on_the_status_line(start_bot, slack, socket_mode, gateway, repo_env):
    start_bot(LEDGER_BOT_STREAMING="false", **repo_env)
    gateway.default = tool_then_answer([[("search_code", {"query": "poll interval", "path_glob": "*.yaml"})]],
                                       "Every 5 seconds.")
    msg, _ = mention(slack, socket_mode, "how often do grouped activities poll?")
    assert replies(slack, "C100", msg["ts"])[0].endswith("Every 5 seconds.")
    statuses = [c.params for c in slack.calls_to("assistant.threads.setStatus")]
    assert any(s["loading_messages"] == ["Searching the code for “poll interval” in “*.…"]
               or s["loading_messages"][0].startswith("Searching the code for") for s in statuses)
    assert all(len(m) <= 50 for s in statuses for m in s["loading_messages"])
    assert not any(c.params.get("chunks") for c in slack.calls)


# ── the terminal ─────────────────────────────────────────────────────────────────────────


def test_ask_prints_each_tool_step_and_the_linked_sources(gateway, repo, index):
    answer = f"payload.tradeId.\nSources: {TRADE_BUY}"
    gateway.default = tool_then_answer([[("find_impact_builders", {"query": "TradeBuy"})]], answer)
    env = {"LITELLM_DEVELOPER_KEY": "sk-litellm-SECRETGATEWAYKEY", "LITELLM_BASE_URL": gateway.base_url,
           "LEDGER_BOT_REPO": str(repo), "LEDGER_BOT_REPO_URL": REPO_URL}
    proc = run_subprocess(["--ask", "what does TradeBuyImpactBuilder put in attribute6?"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    found = len(run(index, "find_impact_builders", query="TradeBuy").files)
    assert f"[Finding Impact Builders for “TradeBuy” … {found} files]" in out
    assert f"Sources: {TRADE_BUY} <{REPO_URL}/blob/{index.commit}/{TRADE_BUY}>" in out


def test_check_reports_the_repository(env, repo, index, gateway, slack, capsys):
    assert lb.main(["--check"], environ={**env, "LEDGER_BOT_REPO": str(repo)}) == 0
    out = capsys.readouterr().out
    assert f"PASS  repository: {len(index.paths)} files indexed at commit {index.commit}" in out
    assert lb.main(["--check"], environ={**env, "LEDGER_BOT_REPO": str(repo / "missing")}) == 1
    assert "FAIL  repository:" in capsys.readouterr().out


def test_the_repository_eval_meets_its_floors_offline(capsys):
    code = lb.main(["--eval", str(ROOT / "tests" / "eval" / "repo.yaml")], environ={})
    out = capsys.readouterr().out
    assert code == 0, out
    for tool in lb.TOOLS:
        assert any(line.startswith(tool) and "questions)" in line for line in out.splitlines()), tool


def test_the_repository_eval_online_needs_a_tool_call_and_an_expected_file_cited(gateway, tmp_path):
    spec = {"repo": str(FIXTURE), "k": 5, "questions": [{
        "id": "tradebuy", "question": "what does TradeBuyImpactBuilder put in attribute6?",
        "tool": "find_impact_builders", "tool_args": {"query": "TradeBuy"},
        "expect_files": [TRADE_BUY], "must_contain": ["tradeId"]}]}
    path = tmp_path / "repo.json"
    path.write_text(json.dumps(spec))
    env = {"LITELLM_DEVELOPER_KEY": "sk-litellm-SECRETGATEWAYKEY", "LITELLM_BASE_URL": gateway.base_url}
    gateway.default = tool_then_answer([[("find_impact_builders", {"query": "TradeBuy"})]],
                                       f"payload.tradeId\nSources: {TRADE_BUY}")
    report = tmp_path / "report.json"
    lb.main(["--eval", str(path), "--online", "--report", str(report)], environ=env)
    row = json.loads(report.read_text())["questions"][0]
    assert row["passed"] and row["tool_calls"] == 1 and row["cited_expected_file"]
    gateway.default = lambda body: Script(text="payload.tradeId, from memory.")  # no tool, no file
    lb.main(["--eval", str(path), "--online", "--report", str(report)], environ=env)
    row = json.loads(report.read_text())["questions"][0]
    assert not row["passed"] and row["tool_calls"] == 0 and row["cited_expected_file"] is False


def test_a_gateway_error_in_a_later_round_is_an_outcome_like_any_other(start_bot, slack, socket_mode, gateway,
                                                                      repo_env):
    start_bot(**repo_env)
    gateway.script(Script(text="", tool_calls=[("search_adrs", {"query": "x"})]),
                   Script(status=500, error_body=gateway_error("upstream failed", "internal_server_error", 500)))
    msg, _ = mention(slack, socket_mode, "reversals?")
    shown = replies(slack, "C100", msg["ts"])
    assert lb.OUTCOMES["gateway_error"].notice.split("{")[0][:30] in shown[-1]

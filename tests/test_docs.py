"""The docs by reader: a newcomer's first screen of README.md, the design notes and benchmark history in
docs/design.md, and on-call's symptom index and outcomes table in runbook.md, held to the code and to each other.

Fast and offline: every test reads files (and imports ledger_bot for its constants and OUTCOMES).
"""

from __future__ import annotations

import logging
import re

import pytest
from conftest import ROOT
from test_delivery import README_RUN_COMMAND
from test_ops import alert_rules, github_anchor, runbook_anchors
from test_project import ENV_VARS

import ledger_bot as lb

README = ROOT / "README.md"
RUNBOOK = ROOT / "runbook.md"
DESIGN = ROOT / "docs" / "design.md"
DOCS = {"README.md": README, "runbook.md": RUNBOOK, "docs/design.md": DESIGN}
FIRST_SCREEN_MAX_LINES = 80
PERFORMANCE_ROWS_MAX = 12
# The bot's own variables, as a document names them (`LEDGER_BOT_*` in prose names no variable).
ENV_NAME = re.compile(r"\bLEDGER_BOT_[A-Z0-9_]*[A-Z0-9]\b")


def read(path) -> str:
    return path.read_text(encoding="utf-8")


def sections(markdown: str, level: int) -> list[tuple[str, str]]:
    """(heading, body) of every heading of exactly ``level`` outside code fences, in order."""
    found: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"^(#{1,6})\s+(.+?)\s*$", line)
        if match and len(match.group(1)) <= level:
            found.append((match.group(2), []) if len(match.group(1)) == level else ("", []))
        elif found:
            found[-1][1].append(line)
    return [(heading, "\n".join(body)) for heading, body in found if heading]


def section(markdown: str, heading: str, level: int) -> str:
    bodies = [body for h, body in sections(markdown, level) if h == heading]
    assert len(bodies) == 1, f"expected one {'#' * level} {heading}, found {len(bodies)}"
    return bodies[0]


def tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (the separator row dropped)."""
    found: list[list[list[str]]] = []
    previous_was_row = False
    for line in markdown.splitlines():
        is_row = line.startswith("|") and line.rstrip().endswith("|")
        if is_row:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not previous_was_row:
                found.append([])
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                found[-1].append(cells)
        previous_was_row = is_row
    return found


def links(markdown: str) -> set[str]:
    return set(re.findall(r"\]\(([^)\s]+)\)", markdown))


def first_screen() -> str:
    """README up to its second `##` heading: the title, the description and the getting-started section."""
    text = read(README)
    starts = [m.start() for m in re.finditer(r"^## ", text, re.M)]
    assert len(starts) >= 2, "README needs a getting-started section followed by reference sections"
    return text[: starts[1]]


def ci_test_command() -> str:
    lines = [line for line in read(ROOT / ".ci" / "run").splitlines() if line.endswith("-m pytest")]
    assert len(lines) == 1, ".ci/run should run exactly one test command"
    return lines[0]


# ---------------------------------------------------------------------------------------- README: the first screen


def test_the_first_screen_fits_and_gets_a_newcomer_to_a_running_bot():
    screen = first_screen()
    assert len(screen.splitlines()) <= FIRST_SCREEN_MAX_LINES
    for needed in ("slack-app-manifest.yaml", "Create New App", "From a manifest",
                   "slack-app-manifest.follow-ups.yaml", "xoxb-", "xapp-", "connections:write",
                   "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "LITELLM_DEVELOPER_KEY", "LITELLM_BASE_URL", ".env.example"):
        assert needed in screen, f"README's first screen does not mention {needed}"
    assert README_RUN_COMMAND in screen.splitlines(), "the run command, on a line of its own"
    assert ci_test_command() in screen.splitlines(), "the test command exactly as .ci/run runs it"


def test_the_first_screen_puts_the_steps_in_order():
    screen = first_screen()
    order = ["From a manifest", "xapp-", "xoxb-", ".env.example", README_RUN_COMMAND, ci_test_command()]
    positions = [screen.index(item) for item in order]
    assert positions == sorted(positions), "manifest, tokens, .env, run, test: in that order"


# ---------------------------------------------------------------------------------------- README and docs/design.md


def test_readme_links_the_design_notes_and_they_hold_the_history():
    assert DESIGN.is_file()
    assert "docs/design.md" in {link.split("#")[0] for link in links(read(README))}
    design = read(DESIGN)
    headings = [h for h, _ in sections(design, 2)]
    assert headings == ["Design", "Performance history", "Targets missed, and the floor"]
    history = section(design, "Performance history", 2)
    assert any(rows[0][:4] == ["measure", "target", "before", "after"] for rows in tables(history)), (
        "the full results table, with its before and after columns")
    assert "What made the difference" in history


def test_readme_keeps_only_the_current_performance_numbers():
    readme = read(README)
    headings = {h for level in (2, 3) for h, _ in sections(readme, level)}
    assert not headings & {"Results", "What made the difference", "Targets missed, and the floor", "Screenshots"}
    current = [rows for rows in tables(section(readme, "Performance", 2)) if rows[0][0] == "measure"]
    assert len(current) == 1 and "before" not in current[0][0]
    rows = current[0][1:]
    assert 0 < len(rows) <= PERFORMANCE_ROWS_MAX
    # Every number the README quotes as current is in the design notes' results ("after" column and ranges).
    history = "\n".join("|".join(row) for rows in tables(section(read(DESIGN), "Performance history", 2))
                        for row in rows)
    for row in rows:
        for number in re.findall(r"\d[\d,.]*\d|\d", row[2]):
            assert number in history, f"README's {row[0]!r}: {number} is not in docs/design.md's results"


def test_docs_name_only_environment_variables_the_bot_reads():
    for name in ("README.md", "docs/design.md"):
        named = set(ENV_NAME.findall(read(DOCS[name])))
        assert named, name
        assert named - ENV_VARS == set(), f"{name} names variables that are not Config fields"


def test_the_env_name_check_can_fail():
    assert set(ENV_NAME.findall("set `LEDGER_BOT_HISTORY_MAX_MESSAGES`")) - ENV_VARS == {
        "LEDGER_BOT_HISTORY_MAX_MESSAGES"}


def test_readme_fixed_limits_name_constants_with_their_values():
    body = section(read(README), "Fixed limits (constants in ledger_bot.py)", 3)
    (table,) = tables(body)
    assert table[0] == ["what it bounds", "constant", "value"]
    named = set()
    for bounds, constant, value in table[1:]:
        name = constant.strip("`")
        assert hasattr(lb, name), f"ledger_bot.py has no constant {name}"
        assert bounds and name not in ENV_VARS, f"{name}: a constant, not a variable"
        named.add(name)
        actual = getattr(lb, name)
        if isinstance(actual, bool) or not isinstance(actual, (int, float, str)):
            continue
        if isinstance(actual, str):
            assert value.strip("`") == actual, name
        else:
            assert float(value.replace(",", "")) == float(actual), f"{name}: README says {value}, code {actual}"
    assert named >= {"HISTORY_MAX_MESSAGES", "HISTORY_MAX_CHARS", "KNOWLEDGE_SHARE", "KNOWLEDGE_RELOAD_SECONDS",
                     "STREAM_FLUSH_CHARS", "STREAM_FLUSH_SECONDS", "IMAGE_MAX_COUNT", "IMAGE_MAX_BYTES",
                     "USER_RATE_WINDOW_SECONDS", "LLM_RETRIES", "RETRY_AFTER_MAX_SECONDS", "SLACK_RATE_TIERS",
                     "ANSWER_MAX_TOKENS", "FALLBACK_MODEL"}
    tiers = next(row[2] for row in table if row[1] == "`SLACK_RATE_TIERS`")
    for tier in (lb.TIER_2, lb.TIER_3, lb.TIER_4, lb.SLACK_RATE_TIERS["chat.postMessage"]):
        assert str(tier) in tiers


@pytest.mark.parametrize("name", sorted(DOCS))
def test_links_between_the_docs_resolve(name):
    path = DOCS[name]
    for link in links(read(path)):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        target_path = (path.parent / target).resolve() if target else path
        assert target_path.exists(), f"{name} links to {target}, which does not exist"
        if anchor and target_path.suffix == ".md":
            assert anchor in runbook_anchors(read(target_path)), f"{name}: {link} has no such heading"


# ---------------------------------------------------------------------------------------- runbook: the symptom index


def symptom_index() -> str:
    return section(read(RUNBOOK), "Symptom index", 2)


def test_the_runbook_opens_with_the_symptom_index():
    assert next(h for h, _ in sections(read(RUNBOOK), 2)) == "Symptom index"
    index = symptom_index().lower()
    for symptom in ("nobody gets an answer", "slow", "wrong", "documents don't cover", "posts errors",
                    "keeps restarting"):
        assert symptom in index, f"the symptom index has no entry for {symptom!r}"


def test_every_symptom_link_resolves_to_a_runbook_heading():
    anchors = runbook_anchors(read(RUNBOOK))
    targets = links(symptom_index())
    assert targets
    for link in targets:
        assert link.startswith("#"), f"the index links within the runbook, not to {link}"
        assert link[1:] in anchors, f"the symptom index links to {link}, which is no runbook heading"


def test_every_alert_has_a_row_in_the_symptom_index_with_its_severities():
    severities: dict[str, set[str]] = {}
    for rule in alert_rules():
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    rows = {}
    for table in tables(symptom_index()):
        for row in table[1:]:
            match = re.fullmatch(r"\[(\w+)\]\(#([\w-]+)\)", row[0])
            if match:
                assert match.group(2) == github_anchor(match.group(1))
                rows[match.group(1)] = {s.strip() for s in row[1].split(",")}
    assert set(rows) == set(severities), (
        f"missing {sorted(set(severities) - set(rows))}, unknown {sorted(set(rows) - set(severities))}")
    for alert, levels in severities.items():
        assert rows[alert] == levels, f"{alert}: the index says {sorted(rows[alert])}, the rules {sorted(levels)}"


def test_nobody_answering_has_a_triage_section_that_links_onward():
    runbook = read(RUNBOOK)
    triage = section(runbook, "Nobody gets an answer", 3)
    for cause in ("/ready", "event_accepted", "`answer`", "slack_connection_dead", "slack_auth_failed",
                  "LEDGER_BOT_ALLOWED_CHANNELS", "`busy`", "fleet_budget_exhausted", "gateway_budget_exhausted"):
        assert cause in triage, f"the triage for 'nobody gets an answer' does not cover {cause}"
    onward = {link[1:] for link in links(triage)}
    assert {"ledgerbotslackdisconnected", "ledgerbotnotanswering", "ledgerbotcrashlooping",
            "rate-limits-and-budgets"} <= onward
    assert onward <= runbook_anchors(runbook)


def test_limits_per_replica_are_explained_once_and_linked():
    runbook = read(RUNBOOK)
    limits = section(runbook, "Rate limits and budgets", 3)
    assert "**Limits are per replica.**" in limits and "LEDGER_BOT_SLACK_RATE_SHARE" in limits
    for name, path in DOCS.items():
        assert read(path).count("Limits are per replica") == (1 if name == "runbook.md" else 0), name
    for name in ("README.md", "docs/design.md"):
        assert any(link.endswith("runbook.md#rate-limits-and-budgets") for link in links(read(DOCS[name]))), name


# ---------------------------------------------------------------------------------------- outcomes: one table


def outcome_tables() -> list[tuple[str, list[list[str]]]]:
    """Tables whose rows name most outcomes in their first column."""
    found = []
    for name, path in DOCS.items():
        for table in tables(read(path)):
            named = {row[0].strip("`") for row in table[1:]}
            if len(named & set(lb.OUTCOMES)) > len(lb.OUTCOMES) // 2:
                found.append((name, table))
    return found


def test_the_outcomes_table_exists_once_in_the_runbook_and_matches_outcomes():
    found = outcome_tables()
    assert [name for name, _ in found] == ["runbook.md"], "one outcomes table, in the runbook"
    [(_, table)] = found
    header = [cell.lower() for cell in table[0]]
    assert header[:3] == ["outcome", "the person sees", "log level"]
    rows = {row[0].strip("`"): row for row in table[1:]}
    assert list(rows) == list(lb.OUTCOMES), "every outcome once, in the order of OUTCOMES"
    for kind, outcome in lb.OUTCOMES.items():
        sees, level = rows[kind][1], rows[kind][2]
        assert level == logging.getLevelName(outcome.level), f"{kind}: runbook says {level}"
        assert sees, f"{kind}: what does the person see?"
    assert "Answer outcomes" in [h for h, body in sections(read(RUNBOOK), 3) if "| Outcome |" in body]


def test_readme_links_to_the_outcomes_table():
    assert any(link.endswith("runbook.md#answer-outcomes") for link in links(read(README)))

"""SLOs, burn rates, buckets, outcomes: the alert rules, the bot and the runbook agree (issue 12).

- Histogram buckets: the bot exports exactly the contract's LATENCY_BUCKETS; every `le` the rules and the promtool
  tests use is one of them (as prometheus_client formats it), so no SLO threshold is ever interpolated.
- SLOs are good/total ratios, alerted with the SRE workbook's multi-window multi-burn-rate pairs.
- Outcomes: the rules name only outcomes the contract has; a person's budget never pages, the fleet's and the
  gateway's do; configuration errors and outages are separate alerts; `interrupted` pages.
- Runbook: every outcome and every log line on-call meets is explained.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_ops import (
    DASHBOARD,
    RULES,
    RULES_TESTS,
    alert_rules,
    bot_registry,
    ledger_bot,
    load_rules,
    runbook_anchors,
    runbook_text,
)

# The contract (notes/contract.md, section Metrics): every histogram uses these bounds.
CONTRACT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 120, 300)
HISTOGRAMS = ("ledger_bot_ack_latency_seconds", "ledger_bot_first_feedback_seconds",
              "ledger_bot_first_token_seconds", "ledger_bot_answer_duration_seconds")
# The contract's answer outcomes, with what on-call does about each (the runbook must explain every one).
CONTRACT_OUTCOMES = {
    "ok", "stopped_by_user", "interrupted", "timeout", "rate_limited", "gateway_error", "gateway_auth_error",
    "gateway_config_error", "gateway_budget_exhausted", "content_policy", "context_too_long", "slack_error",
    "internal_error", "busy", "user_rate_limited", "user_budget_exhausted", "fleet_budget_exhausted", "not_allowed",
    "slack_config_error", "not_in_channel",
}
NEVER_PAGE = {"user_rate_limited", "user_budget_exhausted", "not_allowed", "not_in_channel"}
LOG_EVENTS = ("slack_auth_failed", "slack_connection_dead", "slack_reconnect_failed", "slack_connected",
              "drain_timeout")
# Google SRE workbook, "Alerting on SLOs", recommended parameters for a 30-day SLO.
PAGE_PAIRS = {(14.4, "1h", "5m"), (6.0, "6h", "30m")}
TICKET_PAIRS = {(3.0, "1d", "2h"), (1.0, "3d", "6h")}


def _format_bound(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


def exported_buckets() -> dict[str, tuple[str, ...]]:
    """{histogram: its `le` label values} as the bot's /metrics would show them."""
    buckets: dict[str, list[str]] = {name: [] for name in HISTOGRAMS}
    for family in bot_registry().collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.name[: -len("_bucket")] in buckets:
                buckets[sample.name[: -len("_bucket")]].append(sample.labels["le"])
    return {name: tuple(values) for name, values in buckets.items()}


def _selected_outcomes(expr: str) -> tuple[set[str], set[str]]:
    """(outcomes selected with = or =~, outcomes excluded with != or !~) by the answer counter's selectors."""
    positive, negative = set(), set()
    for matchers in re.findall(r"ledger_bot_answers_total\{([^}]*)\}", expr):
        for op, value in re.findall(r'outcome\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            (negative if op.startswith("!") else positive).update(value.split("|"))
    return positive, negative


def _les(text: str) -> set[str]:
    return set(re.findall(r'\ble\s*=\s*"([^"]+)"', text))


# ---------------------------------------------------------------------------------------- buckets


def test_the_bot_exports_the_contract_buckets_on_every_histogram():
    expected = tuple(_format_bound(b) for b in CONTRACT_BUCKETS) + ("+Inf",)
    for name, bounds in exported_buckets().items():
        assert bounds == expected, f"{name} exports {bounds}, the contract says {expected}"
    assert tuple(ledger_bot().LATENCY_BUCKETS) == CONTRACT_BUCKETS


def test_rules_and_promtool_tests_use_only_buckets_the_bot_exports():
    exported = {le for bounds in exported_buckets().values() for le in bounds}
    assert exported, "the bot exports no histogram buckets"
    used = _les(RULES.read_text())
    assert used, "the latency SLO must read a bucket"
    assert used <= exported, f"rules use buckets the bot does not export: {sorted(used - exported)}"
    for path in RULES_TESTS:
        in_tests = _les(path.read_text())
        assert in_tests <= exported, f"{path.name} feeds buckets the bot does not export: {sorted(in_tests - exported)}"


def test_latency_slo_threshold_is_a_bucket_bound_and_never_an_interpolated_quantile():
    rules_text = RULES.read_text()
    assert "histogram_quantile" not in rules_text, "alert on bucket ratios, not interpolated quantiles"
    (threshold,) = _les(rules_text)
    assert float(threshold) in CONTRACT_BUCKETS
    runbook = runbook_text()
    assert f'le="{threshold}"' in runbook, "the runbook's SLO table must show the same bucket"
    dashboard = DASHBOARD.read_text()
    assert f'le=\\"{threshold}\\"' in dashboard, "the dashboard must show the SLO ratio on the same bucket"


# ---------------------------------------------------------------------------------------- SLO burn rates


def _burn_pairs(expr: str) -> set[tuple[float, str, str]]:
    pairs = set()
    pattern = (r"ledger_bot:(\w+):ratio_(?:rate|avg)(\w+)\{[^}]*\}\s*>\s*\(([\d.]+)\s*\*\s*([\d.]+)\)\s*and\s*"
               r"ledger_bot:\1:ratio_(?:rate|avg)(\w+)\{[^}]*\}\s*>\s*\(\3\s*\*\s*\4\)")
    for _, long_window, factor, _, short_window in re.findall(pattern, expr):
        pairs.add((float(factor), long_window, short_window))
    return pairs


@pytest.mark.parametrize("alert", ["LedgerBotAvailabilityBudgetBurn", "LedgerBotAnswerSuccessBudgetBurn",
                                   "LedgerBotAnswerLatencyBudgetBurn"])
def test_slo_alerts_are_multi_window_multi_burn_rate(alert):
    rules = [r for r in alert_rules() if r["alert"] == alert]
    assert rules, f"no {alert}"
    pairs_by_severity: dict[str, set] = {}
    budgets = set()
    for rule in rules:
        pairs_by_severity.setdefault(rule["labels"]["severity"], set()).update(_burn_pairs(rule["expr"]))
        budgets.update(re.findall(r"\(\s*[\d.]+\s*\*\s*([\d.]+)\)", rule["expr"]))
    assert len(budgets) == 1, f"{alert}: one error budget, got {budgets}"
    every = set().union(*pairs_by_severity.values())
    assert every == PAGE_PAIRS | TICKET_PAIRS, f"{alert}: burn-rate windows {sorted(every)}"
    if "critical" in pairs_by_severity:  # pages on the fast pairs, tickets on the slow ones
        assert pairs_by_severity["critical"] == PAGE_PAIRS
        assert pairs_by_severity["warning"] == TICKET_PAIRS


def test_slo_ratios_are_recorded_as_bad_over_total_for_every_window_the_alerts_use():
    records = {r["record"]: r["expr"] for g in load_rules()["groups"] for r in g["rules"] if "record" in r}
    windows = {w for pair in PAGE_PAIRS | TICKET_PAIRS for w in pair[1:]}
    for series in ("answer_errors:ratio_rate", "answer_slow:ratio_rate", "slack_unavailable:ratio_avg"):
        for window in windows:
            name = f"ledger_bot:{series}{window}"
            assert name in records, f"missing recording rule {name}"
            assert f"[{window}]" in records[name], f"{name} must use a {window} window"
    for window in windows:
        expr = records[f"ledger_bot:answer_errors:ratio_rate{window}"]
        bad, total = expr.split("\n/\n") if "\n/\n" in expr else expr.split("/")
        bad_pos, bad_neg = _selected_outcomes(bad)
        _, total_neg = _selected_outcomes(total)
        # bad = total minus the good outcomes; total excludes only what never counts.
        assert bad_neg - total_neg == {"ok", "stopped_by_user"}, expr
        assert total_neg >= NEVER_PAGE, expr


# ---------------------------------------------------------------------------------------- outcomes and paging


def test_rules_name_only_contract_outcomes():
    for rule in (r for g in load_rules()["groups"] for r in g["rules"]):
        positive, negative = _selected_outcomes(rule["expr"])
        unknown = (positive | negative) - CONTRACT_OUTCOMES
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown outcomes {sorted(unknown)}"


def test_the_bot_has_exactly_the_contract_outcomes_and_exports_each_at_zero():
    assert set(ledger_bot().OUTCOMES) == CONTRACT_OUTCOMES
    series = {sample.labels["outcome"]: sample.value for family in bot_registry().collect()
              for sample in family.samples if sample.name == "ledger_bot_answers_total"}
    assert set(series) == CONTRACT_OUTCOMES, "every outcome series must exist from the start"
    assert set(series.values()) == {0.0}


def test_a_persons_limits_never_page_the_fleet_and_gateway_budgets_do():
    for rule in alert_rules():
        positive, _ = _selected_outcomes(rule["expr"])
        assert not positive & NEVER_PAGE, f"{rule['alert']} alerts on {sorted(positive & NEVER_PAGE)}"
    paging = {o for r in alert_rules() if r["labels"]["severity"] == "critical"
              for o in _selected_outcomes(r["expr"])[0]}
    assert {"fleet_budget_exhausted", "gateway_budget_exhausted", "interrupted"} <= paging


def test_configuration_and_outage_are_separate_alerts():
    by_name = {}
    for rule in alert_rules():
        by_name.setdefault(rule["alert"], set()).update(_selected_outcomes(rule["expr"])[0])
    assert by_name["LedgerBotGatewayConfigError"] == {"gateway_auth_error", "gateway_config_error"}
    assert by_name["LedgerBotGatewayOutage"] == {"gateway_error", "timeout"}
    config = [r for r in alert_rules() if r["alert"] == "LedgerBotGatewayConfigError"]
    assert {r["labels"]["severity"] for r in config} == {"critical"}, "a wrong key fails every answer: page"


def test_no_rule_dashboard_or_runbook_uses_the_old_budget_outcome():
    old = re.compile(r'(?<![a-z_])budget_exhausted\b')
    for name, text in (("rules", RULES.read_text()), ("dashboard", DASHBOARD.read_text()),
                       ("runbook", runbook_text())):
        assert not old.search(text), f"{name} still names the removed outcome budget_exhausted"


def test_dashboard_success_ratio_uses_the_slo_definition():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any("ledger_bot:answer_errors:ratio_rate" in e or "stopped_by_user" in e for e in exprs)


# ---------------------------------------------------------------------------------------- runbook


def test_runbook_explains_every_outcome_and_what_on_call_does():
    text = runbook_text()
    table = text.split("### Answer outcomes", 1)
    assert len(table) == 2, "runbook.md needs an 'Answer outcomes' section"
    section = table[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\|\s*`([a-z_]+)`\s*\|", section, flags=re.M)}
    assert rows == CONTRACT_OUTCOMES, f"missing {sorted(CONTRACT_OUTCOMES - rows)}, unknown {sorted(rows - CONTRACT_OUTCOMES)}"


def test_runbook_leads_from_each_log_line_to_its_meaning():
    text = runbook_text()
    for event in LOG_EVENTS:
        assert f"`{event}`" in text, f"the runbook never explains the `{event}` log line"


def test_runbook_token_revoked_path_ends_in_exit_1_and_crashloop():
    text = runbook_text()
    section = text.split("### LedgerBotCrashLooping", 1)[1].split("\n### ", 1)[0]
    assert "slack_auth_failed" in section and "exit code 1" in section.lower() and "CrashLoopBackOff" in section
    assert '.event == "slack_auth_failed"' in text, "show the jq filter that finds the line"


def test_runbook_rollback_finds_the_last_good_sha_and_warns_about_staging_reverts():
    text = runbook_text()
    section = text.split("### Deploy, roll back and promote", 1)[1].split("\n### ", 1)[0]
    assert "last good" in section.lower()
    assert "overwritten by the next merge" in section
    assert "@sha256:" in section


@pytest.mark.parametrize("heading", ["LedgerBotOOMKilled", "LedgerBotMemoryNearLimit", "LedgerBotNotAnswering",
                                     "LedgerBotNoEvents", "LedgerBotAnswersInterrupted"])
def test_runbook_sections_give_mitigations(heading):
    assert heading.lower() in runbook_anchors(runbook_text())
    section = runbook_text().split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    for part in ("**Meaning.**", "**Diagnosis.**", "**Mitigation.**"):
        assert part in section, f"{heading}: no {part}"


def test_promtool_tests_and_rules_agree_on_the_namespace_placeholder():
    for path in RULES_TESTS:
        doc = yaml.safe_load(path.read_text())
        namespaces = set(re.findall(r'namespace="([^"]+)"', path.read_text()))
        assert namespaces == {"ledger-bot"}, f"{path.name}: {namespaces}"
        assert doc["rule_files"] == [RULES.name]

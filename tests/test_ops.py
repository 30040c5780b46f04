"""Operations artefacts stay true to the code: alerts, dashboard, runbook.

- Every metric the alert rules and the Grafana dashboard query is one ledger_bot.py exports (read from
  prometheus_client's default registry after importing the module), a series recorded by the rules themselves, or
  an allow-listed kube-state-metrics / cAdvisor / git-sync sidecar series.
- SLO, burn-rate, bucket, budget and outcome checks live in test_ops_slo.py.
- Every alert links to a runbook.md section that exists (GitHub's heading anchors), with severity and team labels,
  and is unit-tested firing and not firing in the promtool test file.
- runbook.md names only metrics, environment variables, CLI flags and HTTP paths that ledger_bot.py has.
- The dashboard JSON is a Grafana dashboard whose every panel queries a real metric.
- promtool (Debian package `prometheus`) checks and unit-tests the rules and parses every dashboard query.
- The Helm templates embed the rules file and the dashboard verbatim.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "workloads" / "ledger-bot"
RULES = CHART / "alerts" / "ledger-bot.rules.yaml"
RULES_TEST = CHART / "alerts" / "ledger-bot.rules.test.yaml"
# Long-horizon cases, evaluated every 5 minutes instead of every minute to keep the suite fast.
RULES_SLOW_TEST = CHART / "alerts" / "ledger-bot.rules.slow.test.yaml"
RULES_TESTS = (RULES_TEST, RULES_SLOW_TEST)
DASHBOARD = CHART / "dashboards" / "ledger-bot.json"
RULE_TEMPLATE = CHART / "templates" / "prometheusrule.yaml"
DASHBOARD_TEMPLATE = CHART / "templates" / "dashboard-configmap.yaml"
RUNBOOK = ROOT / "runbook.md"
RUNBOOK_URL = "https://github.com/wealthsimple/ledger-bot/blob/main/runbook.md"

# Series the alerts read from kube-state-metrics and the kubelet's cAdvisor rather than from the bot.
KUBE_STATE_METRICS = {
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
    "kube_deployment_metadata_generation",
    "kube_pod_container_status_restarts_total",
    "kube_pod_container_status_last_terminated_reason",
    "kube_pod_container_resource_limits",
    "kube_pod_status_ready",
    "container_memory_working_set_bytes",
}
# Series the repository alerts read from each pod's git-sync sidecar (its --http-metrics port), not from the bot:
# what git-sync v4 exports (kubernetes/git-sync main.go; tests/test_delivery_repo.py checks the rules use no other).
GIT_SYNC_METRICS = {
    "git_sync_count_total",
}
# The namespace matcher every selector in the rules file uses; the PrometheusRule template replaces it.
NAMESPACE_MATCHER = 'namespace="ledger-bot"'
# Environment variables the bot sets for litellm itself (not Config fields).
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_OFFLINE_MODE"}
HTTP_PATHS = ("/health", "/ready", "/metrics")


# ---------------------------------------------------------------------------------------- helpers


@functools.cache
def ledger_bot():
    """The bot module, imported the way the image runs it (litellm's cost map from the package)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.path.insert(0, str(ROOT))
    import ledger_bot as module

    return module


def bot_registry():
    """The registry the bot's /metrics serves: a fresh Metrics(new_registry(), OUTCOMES) when the module builds one
    per bot, else prometheus_client's default registry (collectors registered at import)."""
    import prometheus_client

    module = ledger_bot()
    if hasattr(module, "Metrics") and hasattr(module, "new_registry"):
        return module.Metrics(module.new_registry(), tuple(module.OUTCOMES)).registry
    return prometheus_client.REGISTRY


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Every series name ledger_bot.py can expose on /metrics (including default process_* collectors).

    Built from metric families, not only current samples: a labelled counter has no sample until its
    first increment, but its name is fixed by its family name and type.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = set()
    for family in bot_registry().collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, labels or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range / subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in _PROMQL_KEYWORDS:
            names.add(name)
    return names


def load_rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def alert_rules() -> list[dict]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for group in load_rules()["groups"] for rule in group["rules"] if "record" in rule}


def metric_selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers or "") for every series selector in a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: m.group(0).replace("{", "(").replace("}", ")"), expr)
    names = promql_metric_names(expr)
    found = []
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", text):
        if match.group(1) in names:
            found.append((match.group(1), match.group(2) or ""))
    return found


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors(markdown: str) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match and not in_fence:
            base = github_anchor(match.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors


def runbook_text() -> str:
    return RUNBOOK.read_text()


def render_files_get(template: str, path: str, content: str) -> str:
    """Stand-in for Helm's `{{- .Files.Get "<path>" | nindent N }}` (no helm binary here); drops other actions.

    The file's content is inserted last, untouched, as Helm does: it is never rendered as a template.
    """
    pattern = re.compile(r'\s*\{\{-\s*\.Files\.Get\s+"' + re.escape(path) + r'"\s*\|\s*nindent\s+(\d+)\s*\}\}')
    match = pattern.search(template)
    assert match and len(pattern.findall(template)) == 1, (
        f'expected exactly one {{{{- .Files.Get "{path}" | nindent N }}}} in the template'
    )
    rendered = template[: match.start()] + "\0FILE\0" + template[match.end():]
    rendered = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", rendered, flags=re.S)
    rendered = re.sub(r"^\s*\{\{-?[^}]*\}\}\s*$", "", rendered, flags=re.M)  # control lines (if/with/end)
    rendered = re.sub(r"\{\{-?[^}]*\}\}", "x", rendered)  # inline values
    pad = " " * int(match.group(1))
    indented = "\n" + "\n".join(pad + line if line else line for line in content.splitlines())
    return rendered.replace("\0FILE\0", indented)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = ("promtool not installed: apt-get install -y --no-install-recommends prometheus "
                   "(.ci/run installs it)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------- the PromQL name parser


def test_promql_metric_names_finds_selectors_and_ignores_functions_labels_and_durations():
    expr = (
        'histogram_quantile(0.95, sum by (namespace, le) (rate(a_bucket{namespace="ns", le!~"x|y"}[30m]))) > 45\n'
        "and on (namespace) sum by (namespace) (increase(b_count[1d] offset 5m)) >= 5\n"
        'or absent(c{job="z"}) or vector(0) or d:recorded / e[$__rate_interval]'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_count", "c", "d:recorded", "e"}


# ---------------------------------------------------------------------------------------- (a) names are real


def test_alert_rules_query_only_metrics_the_bot_exports_or_kube_state_metrics():
    exported = exported_metric_names() | recorded_names()
    unknown = {}
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            names = promql_metric_names(rule["expr"])
            assert names, f"{rule.get('alert') or rule.get('record')}: no metric found in its expression"
            missing = names - exported - KUBE_STATE_METRICS - GIT_SYNC_METRICS
            if missing:
                unknown[rule.get("alert") or rule.get("record")] = sorted(missing)
    assert not unknown, f"rules query metrics ledger_bot.py does not export: {unknown}"


def test_bot_exports_every_metric_the_contract_names():
    exported = exported_metric_names()
    contract = {
        "ledger_bot_events_total", "ledger_bot_answers_total", "ledger_bot_llm_tokens_total",
        "ledger_bot_llm_cost_usd_total", "ledger_bot_socket_connected", "ledger_bot_socket_reconnects_total",
        "ledger_bot_worker_queue_depth", "ledger_bot_workers_busy", "ledger_bot_feedback_total",
        "ledger_bot_build_info", "process_resident_memory_bytes", "process_cpu_seconds_total",
    } | {
        f"ledger_bot_{name}_{suffix}"
        for name in ("ack_latency_seconds", "first_feedback_seconds", "first_token_seconds", "answer_duration_seconds")
        for suffix in ("bucket", "sum", "count")
    }
    assert contract <= exported, f"missing: {sorted(contract - exported)}"


def test_every_selector_names_the_namespace_the_template_replaces_and_rules_aggregate_over_pods():
    """Every series selector (the bot's, recorded, kube-state-metrics, cAdvisor) carries exactly
    namespace="ledger-bot", which templates/prometheusrule.yaml swaps for the release's namespace: a selector
    without it would read other namespaces' series, one with another spelling would stay hard-coded."""
    recorded = recorded_names()
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            expr = rule["expr"]
            selectors = metric_selectors(expr)
            assert selectors, name
            for metric, matchers in selectors:
                assert NAMESPACE_MATCHER in matchers, f"{name}: {metric} must select {NAMESPACE_MATCHER}"
            assert len(re.findall(r"namespace\s*[=!~]+", expr)) == expr.count(NAMESPACE_MATCHER), (
                f"{name}: every namespace matcher must be written exactly {NAMESPACE_MATCHER}"
            )
            # Two replicas: a per-pod alert would fire twice or miss a fleet-wide problem.
            if any(metric not in recorded for metric, _ in selectors):
                assert re.search(r"\b(sum|max|min) by \(", expr), f"{name}: aggregate with sum/max by (...)"


# ---------------------------------------------------------------------------------------- (b) alerts and runbook


def test_every_alert_has_severity_team_summary_and_a_runbook_section_that_exists():
    anchors = runbook_anchors(runbook_text())
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) >= 8
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["labels"]["team"] == "bor-write", name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL + "#"), f"{name}: runbook_url must be {RUNBOOK_URL}#<section>"
        anchor = url.split("#", 1)[1]
        assert anchor in anchors, f"{name}: runbook.md has no heading with anchor #{anchor}"
        assert anchor == github_anchor(name), f"{name}: its runbook section should be headed by the alert name"


def test_github_anchor_matches_how_github_slugs_headings():
    assert github_anchor("LedgerBotSlackDisconnected") == "ledgerbotslackdisconnected"
    assert github_anchor("Deploy, roll back & promote") == "deploy-roll-back--promote"
    assert github_anchor("Why 2 replicas (and what that costs)") == "why-2-replicas-and-what-that-costs"
    assert github_anchor("`kubectl` basics") == "kubectl-basics"
    assert runbook_anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_every_alert_is_unit_tested_firing_and_not_firing():
    groups = []
    for path in RULES_TESTS:
        tests = yaml.safe_load(path.read_text())
        assert tests["rule_files"] == [RULES.name], path.name
        groups += tests["tests"]
    firing, quiet = set(), set()
    for group in groups:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    # Alerts with a critical and a warning rule are tested firing at each severity.
    severities = {(r["alert"], r["labels"]["severity"]) for r in alert_rules()}
    fired = {(case["alertname"], e["exp_labels"]["severity"])
             for group in groups for case in group.get("alert_rule_test", []) for e in case.get("exp_alerts") or []}
    assert severities - fired == set(), "alert severities never tested firing"
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"
    assert (firing | quiet) - alerts == set(), "tests name alerts that do not exist"
    for group in groups:
        for case in group.get("alert_rule_test", []):
            for expected in case.get("exp_alerts") or []:
                assert expected["exp_annotations"]["runbook_url"].startswith(RUNBOOK_URL + "#")


# ---------------------------------------------------------------------------------------- (c) runbook vs code


def test_runbook_names_only_metrics_the_bot_exports():
    exported = exported_metric_names()
    named = set(re.findall(r"\bledger_bot_[a-z0-9_]+", runbook_text()))
    assert named, "the runbook should name the metrics it relies on"
    assert named - exported == set(), "runbook names metrics ledger_bot.py does not export"


def test_runbook_names_only_environment_variables_the_bot_reads():
    import msgspec

    config_env = {field.name.upper() for field in msgspec.structs.fields(ledger_bot().Config)}
    named = set(re.findall(r"\b(?:SLACK|LITELLM|LEDGER_BOT|HEALTH|LOG)_[A-Z0-9_]*[A-Z0-9]\b", runbook_text()))
    assert named - config_env - LITELLM_ENV == set(), "runbook names variables that are not Config fields"
    knobs = {"LEDGER_BOT_USER_RATE_LIMIT", "LEDGER_BOT_DAILY_BUDGET_USD",
             "LEDGER_BOT_USER_DAILY_BUDGET_USD", "LEDGER_BOT_SHUTDOWN_GRACE_SECONDS"}
    assert knobs <= named, f"runbook should document the knobs {sorted(knobs - named)}"


def test_runbook_uses_only_flags_ledger_bot_py_accepts():
    result = subprocess.run(
        [sys.executable, "ledger_bot.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert result.returncode == 0, result.stderr
    accepted = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))
    used = set()
    for match in re.finditer(r"ledger_bot\.py((?:\s+--[a-z][a-z0-9-]*)+)", runbook_text()):
        used.update(match.group(1).split())
    assert "--check" in used, "the runbook should show `python ledger_bot.py --check`"
    assert used - accepted == set(), f"ledger_bot.py --help lists only {sorted(accepted)}"


def test_runbook_http_paths_are_served_by_the_bot():
    source = (ROOT / "ledger_bot.py").read_text()
    named = set(re.findall(r"(?:localhost|127\.0\.0\.1):\d+(/[a-z_-]+)", runbook_text()))
    named |= set(re.findall(r"`(/[a-z_-]+)`", runbook_text()))
    assert set(HTTP_PATHS) <= named, "the runbook should explain /health, /ready and /metrics"
    for path in named:
        assert f'"{path}"' in source, f"ledger_bot.py does not serve {path}"


def test_runbook_links_to_its_own_sections_resolve():
    text = runbook_text()
    anchors = runbook_anchors(text)
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "the runbook should cross-link its sections"
    assert links - anchors == set(), "runbook links to sections that do not exist"


def test_runbook_kubectl_commands_use_the_documented_namespace():
    for line in runbook_text().splitlines():
        if re.match(r"\s*(\$ )?kubectl ", line) and "kubectl config" not in line:
            assert re.search(r"(-n|--namespace) ledger-bot\b", line), f"kubectl without -n ledger-bot: {line}"


# ---------------------------------------------------------------------------------------- (d) dashboard


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_dashboard_panel_queries_a_metric_the_bot_exports():
    exported = exported_metric_names()
    dashboard = load_dashboard()
    panels = [p for p in dashboard_panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        exprs = [target["expr"] for target in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"panel {panel['title']!r}: no metric in {expr!r}"
            assert names <= exported, f"panel {panel['title']!r} queries unknown {sorted(names - exported)}"
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            metric = re.match(r"label_values\((\w+),", query["query"]).group(1)
            assert metric in exported, f"variable {variable['name']} queries {metric}"


def test_dashboard_covers_what_on_call_needs():
    text = " ".join(t["expr"] for p in dashboard_panels(load_dashboard()) for t in p.get("targets", []))
    for metric in ("ledger_bot_events_total", "ledger_bot_answers_total", "ledger_bot_ack_latency_seconds_bucket",
                   "ledger_bot_first_feedback_seconds_bucket", "ledger_bot_first_token_seconds_bucket",
                   "ledger_bot_answer_duration_seconds_bucket", "ledger_bot_llm_tokens_total",
                   "ledger_bot_llm_cost_usd_total", "ledger_bot_socket_connected",
                   "ledger_bot_socket_reconnects_total", "ledger_bot_worker_queue_depth", "ledger_bot_workers_busy"):
        assert metric in text, f"no dashboard panel shows {metric}"


# ---------------------------------------------------------------------------------------- Helm templates


def render_rule_template(namespace: str) -> dict:
    """Stand-in for Helm on templates/prometheusrule.yaml: .Files.Get, then sprig's
    `replace "namespace=\"ledger-bot\"" (printf "namespace=%q" .Release.Namespace)`, then nindent."""
    template = RULE_TEMPLATE.read_text()
    action = ('{{- .Files.Get "alerts/ledger-bot.rules.yaml" | replace "namespace=\\"ledger-bot\\"" '
              '(printf "namespace=%q" .Release.Namespace) | nindent 2 }}')
    assert template.count(action) == 1, "the template must embed the rules file with the namespace replace"
    content = RULES.read_text().replace(NAMESPACE_MATCHER, f'namespace="{namespace}"')
    template = template.replace(action, '{{- .Files.Get "alerts/ledger-bot.rules.yaml" | nindent 2 }}')
    rendered = render_files_get(template, "alerts/ledger-bot.rules.yaml", content)
    rendered = rendered.replace("namespace: x", f"namespace: {namespace}", 1)
    return yaml.safe_load(rendered)


def test_prometheusrule_template_embeds_the_rules_with_the_release_namespace(tmp_path):
    rendered = render_rule_template("bor-write-ledger-bot")
    assert rendered["apiVersion"] == "monitoring.coreos.com/v1" and rendered["kind"] == "PrometheusRule"
    assert rendered["metadata"]["namespace"] == "bor-write-ledger-bot"
    exprs = [r["expr"] for g in rendered["spec"]["groups"] for r in g["rules"]]
    assert all('namespace="bor-write-ledger-bot"' in e for e in exprs)
    assert not any('namespace="ledger-bot"' in e for e in exprs)
    # Everything but the namespace is the file verbatim ({{ $labels }} etc. untouched), and still valid rules.
    back = json.loads(json.dumps(rendered["spec"]).replace('namespace=\\"bor-write-ledger-bot\\"', 'namespace=\\"ledger-bot\\"'))
    assert back == load_rules()
    (tmp_path / "rendered.rules.yaml").write_text(yaml.safe_dump(rendered["spec"]))
    result = run_promtool("check", "rules", "rendered.rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_template_embeds_the_dashboard_for_the_grafana_sidecar():
    template = DASHBOARD_TEMPLATE.read_text()
    rendered = yaml.safe_load(render_files_get(template, "dashboards/ledger-bot.json", DASHBOARD.read_text()))
    assert rendered["kind"] == "ConfigMap"
    assert rendered["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(rendered["data"]["ledger-bot.json"]) == load_dashboard()


# ---------------------------------------------------------------------------------------- (e) promtool


def test_promtool_check_rules():
    result = run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tests_file", RULES_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(tests_file):
    result = run_promtool("test", "rules", tests_file.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def promtool_check_expressions(exprs: dict[str, str], directory: Path) -> None:
    """promtool parses each expression (as a recording rule named by its key)."""
    rules = [{"record": name, "expr": expr} for name, expr in exprs.items()]
    (directory / "queries.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = run_promtool("check", "rules", "queries.rules.yaml", cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    exprs = {
        f"dashboard:panel{panel['id']}:{target['refId']}":
            target["expr"].replace("$namespace", "ledger-bot").replace("$__rate_interval", "5m")
        for panel in dashboard_panels(load_dashboard())
        for target in panel.get("targets", [])
    }
    promtool_check_expressions(exprs, tmp_path)


def test_promtool_parses_every_query_in_the_runbook(tmp_path):
    text = runbook_text()
    queries = re.findall(r"```promql\n(.*?)```", text, flags=re.S)
    queries += [span.replace("\\|", "|") for span in re.findall(r"`([^`\n]*ledger_bot_\w+[^`\n]*)`", text)]
    assert len(queries) >= 5, "the runbook should show the PromQL behind its SLOs and diagnoses"
    promtool_check_expressions({f"runbook:query{i}": q.strip() for i, q in enumerate(queries)}, tmp_path)

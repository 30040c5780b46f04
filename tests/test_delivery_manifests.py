"""Kubernetes manifests: what this chart renders itself, and what the values ask ws-service to render.

No helm binary or cluster here, and no PyPI wheel bundles kubeconform; the Kubernetes JSON schemas come
from the `kubernetes-validate` wheel (pyproject's `lint` extra), used in strict mode (unknown fields
fail) against KUBERNETES_VERSION.

- templates/networkpolicy.yaml is rendered by a stand-in for the few Helm constructs it uses (the
  stand-in fails on any other), validated, and its rules compared with the issue's contract: ingress
  only TCP 8080 from the metrics scraper, egress only DNS (53) and HTTPS (443), nothing to the
  instance metadata service.
- The ws-service chart is not available, so the values are checked the other way round: a Deployment
  and a PodDisruptionBudget are built from values.<env>.yaml the way we expect ws-service to map them
  (probes, resources, security contexts, topologySpreadConstraints, grace period, PDB policy) and
  validated. What this cannot prove: that ws-service passes each key through. workloads/README.md
  says how to check that with `just render` before the first deploy.
"""

from __future__ import annotations

import re

import pytest
import yaml
from test_delivery import ENVIRONMENTS, IMAGE_REPOSITORY, REPO, WORKLOAD, _load_yaml, _values

# Oldest Kubernetes minor we expect the EKS clusters to run (standard support); the schema of this version
# has every field we use (unhealthyPodEvictionPolicy: 1.26+, matchLabelKeys: 1.27+).
KUBERNETES_VERSION = "1.30.0"
NETWORK_POLICY_TEMPLATE = WORKLOAD / "templates" / "networkpolicy.yaml"
RELEASE_NAMESPACE = "bor-write-ledger-bot"  # deliberately not "ledger-bot": nothing may hard-code it
IMDS = {"169.254.169.254/32", "fd00:ec2::254/128"}


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: install requirements-dev.lock (pyproject's `lint` extra)")
    return kubernetes_validate


def _assert_valid(manifest: dict) -> None:
    kv = _kubernetes_validate()
    try:
        kv.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as error:  # message names the path and the offending field
        pytest.fail(f"{manifest['kind']} is not a valid Kubernetes {KUBERNETES_VERSION} object: {error}")


def _top_values(env: str) -> dict:
    return _load_yaml(WORKLOAD / f"values.{env}.yaml")


def _lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        node = (node or {}).get(part)
    return node


def render_network_policy(template: str, values: dict, namespace: str = RELEASE_NAMESPACE) -> str:
    """Stand-in for `helm template` on templates/networkpolicy.yaml. It knows exactly the constructs that
    template uses (a comment block, `$cfg := .Values.networkPolicy | default dict`, one if/end on
    $cfg.enabled, .Release.Namespace/.Service, `toYaml $cfg.<path> | nindent N`) and fails on anything else."""
    cfg = values.get("networkPolicy") or {}
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}\n?", "", template, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "{{- $cfg := .Values.networkPolicy | default dict }}":
            continue
        if stripped == '{{- if ne (toString $cfg.enabled) "false" }}':
            if str(cfg.get("enabled")).lower() == "false":
                return ""
            continue
        if stripped == "{{- end }}":
            continue
        match = re.fullmatch(r"\{\{-\s*toYaml \$cfg\.([\w.]+) \| nindent (\d+) \}\}", stripped)
        if match:
            value = _lookup(cfg, match.group(1))
            assert value, f"networkPolicy.{match.group(1)} is empty: the policy would select everything"
            pad = " " * int(match.group(2))
            block = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n")
            # nindent: a newline, then the block indented; the {{- trims the line's own indentation.
            lines[-1] = lines[-1] + "\n" + "\n".join(pad + b for b in block.splitlines())
            continue
        line = line.replace("{{ .Release.Namespace }}", namespace).replace("{{ .Release.Service }}", "Helm")
        assert "{{" not in line, f"the stand-in renderer does not know: {line.strip()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _network_policy(env: str) -> dict:
    rendered = render_network_policy(NETWORK_POLICY_TEMPLATE.read_text(encoding="utf-8"), _top_values(env))
    return yaml.safe_load(rendered)


# ---------------------------------------------------------------------------------------------
# the stand-in renderer
# ---------------------------------------------------------------------------------------------


def test_stand_in_renderer_refuses_constructs_it_does_not_know():
    with pytest.raises(AssertionError, match="does not know"):
        render_network_policy("a: {{ .Values.other }}\n", {"networkPolicy": {}})
    disabled = '{{- $cfg := .Values.networkPolicy | default dict }}\n{{- if ne (toString $cfg.enabled) "false" }}\nx: 1\n{{- end }}\n'
    assert render_network_policy(disabled, {"networkPolicy": {"enabled": False}}) == ""
    assert yaml.safe_load(render_network_policy(disabled, {})) == {"x": 1}


# ---------------------------------------------------------------------------------------------
# NetworkPolicy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_is_a_valid_kubernetes_object_in_the_release_namespace(env):
    policy = _network_policy(env)
    assert policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["namespace"] == RELEASE_NAMESPACE
    _assert_valid(policy)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_selects_the_bot_pods_and_restricts_both_directions(env):
    spec = _network_policy(env)["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": _values(env)["name"]}}
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_admits_only_the_scraper_on_the_metrics_port(env):
    spec = _network_policy(env)["spec"]
    port = _values(env)["ports"][0]["containerPort"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    (peer,) = rule["from"]
    # Both selectors in ONE peer: pods labelled like the scraper AND in the scraper's namespace.
    assert set(peer) == {"namespaceSelector", "podSelector"}
    for selector in peer.values():
        assert selector.get("matchLabels"), "an empty selector would admit everything"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_lets_out_only_dns_and_https_never_the_metadata_service(env):
    egress = _network_policy(env)["spec"]["egress"]
    ports = {(p["protocol"], p["port"]) for rule in egress for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}
    for rule in egress:
        assert rule.get("ports"), "a rule without ports opens every port"
        if {p["port"] for p in rule["ports"]} == {443}:
            blocks = [peer["ipBlock"] for peer in rule["to"]]
            assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0"}
            assert {cidr for b in blocks for cidr in b.get("except", [])} == IMDS


def test_network_policy_can_be_switched_off():
    template = NETWORK_POLICY_TEMPLATE.read_text(encoding="utf-8")
    assert render_network_policy(template, {"networkPolicy": {"enabled": False}}) == ""


# ---------------------------------------------------------------------------------------------
# the values, as the Deployment and PodDisruptionBudget we expect ws-service to render
# ---------------------------------------------------------------------------------------------


def expected_deployment(values: dict) -> dict:
    labels = {"app.kubernetes.io/name": values["name"]}
    container = {
        "name": values["name"],
        "image": f"{values['image']['repository']}:{values['image']['tag']}",
        "ports": values["ports"],
        "env": [{"name": k, "value": str(v)} for k, v in values["env"].items()],
        "resources": values["resources"],
        "livenessProbe": values["livenessProbe"],
        "readinessProbe": values["readinessProbe"],
        "startupProbe": values["startupProbe"],
        "securityContext": values["securityContext"],
        "volumeMounts": values["volumeMounts"],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": values["name"], "namespace": RELEASE_NAMESPACE, "labels": labels},
        "spec": {
            "replicas": values["replicas"],
            "strategy": values["strategy"],
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": values["serviceAccount"]["automountServiceAccountToken"],
                    "terminationGracePeriodSeconds": values["terminationGracePeriodSeconds"],
                    "topologySpreadConstraints": values["topologySpreadConstraints"],
                    "securityContext": values["podSecurityContext"],
                    "volumes": values["volumes"],
                    "containers": [container],
                },
            },
        },
    }


def expected_pdb(values: dict) -> dict:
    pdb = {k: v for k, v in values["podDisruptionBudget"].items() if k != "enabled"}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": values["name"], "namespace": RELEASE_NAMESPACE},
        "spec": {**pdb, "selector": {"matchLabels": {"app.kubernetes.io/name": values["name"]}}},
    }


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_values_make_a_valid_deployment(env):
    values = _values(env)
    deployment = expected_deployment(values)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith(IMAGE_REPOSITORY + ":")
    _assert_valid(deployment)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_values_make_a_valid_pod_disruption_budget(env):
    _assert_valid(expected_pdb(_values(env)))


def test_schema_check_rejects_what_kubernetes_would_reject():
    """The validator is not a no-op: a misspelt field and wrong types fail. (Enum values such as
    AlwaysAllow are not in the published schemas: the tests above compare those literally.)"""
    values = _values("staging")
    kv = _kubernetes_validate()
    broken = expected_pdb(values)
    broken["spec"]["unhealthyPodEvictionPolicyy"] = "AlwaysAllow"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = expected_deployment(values)
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "270"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = _network_policy("staging")
    broken["spec"]["ingress"][0]["ports"][0]["port"] = [8080]
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_template_is_checked_somewhere():
    """A new template needs a check: rendered and validated here, or embedded-file checks in test_ops.py."""
    checked = {"networkpolicy.yaml", "prometheusrule.yaml", "dashboard-configmap.yaml"}
    present = {p.name for p in (WORKLOAD / "templates").iterdir()}
    assert present == checked, f"unchecked templates: {sorted(present - checked)}"
    assert (REPO / "tests" / "test_ops.py").read_text().count("templates") >= 1

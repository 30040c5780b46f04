"""Kubernetes manifests: what this chart renders itself, and what the values ask ws-service to render.

No helm binary or cluster here, and no PyPI wheel bundles kubeconform; the Kubernetes JSON schemas come
from the `kubernetes-validate` wheel (pyproject's `lint` extra), used in strict mode (unknown fields
fail) against KUBERNETES_VERSION.

- templates/networkpolicy.yaml and templates/git-sync-secret.yaml are rendered by a stand-in for the few
  Helm constructs they use (the stand-in fails on any other), validated, and compared with the contract:
  ingress only TCP 8080 (and git-sync's metrics port) from the metrics scraper; egress only DNS (53),
  HTTPS (443, nothing to the instance metadata service) and SSH (22) to GitHub's git ranges only; the
  git-sync Secret carries exactly the deploy key and GitHub's host key. The sidecar's own contract
  (image, flags, mounts) is in test_delivery_repo.py.
- The ws-service chart is not available, so the values are checked the other way round: a Deployment
  and a PodDisruptionBudget are built from values.<env>.yaml the way we expect ws-service to map them
  (probes, resources, security contexts, topologySpreadConstraints, grace period, PDB policy, the
  git-sync sidecar from `extraContainers`) and validated. What this cannot prove: that ws-service passes each key through. workloads/README.md
  says how to check that with `just render` before the first deploy.
"""

from __future__ import annotations

import base64
import copy
import json
import re

import pytest
import yaml
from test_delivery import ENVIRONMENTS, IMAGE_REPOSITORY, REPO, WORKLOAD, _load_yaml, _values

# Oldest Kubernetes minor we expect the EKS clusters to run (standard support); the schema of this version
# has every field we use (unhealthyPodEvictionPolicy: 1.26+, matchLabelKeys: 1.27+).
KUBERNETES_VERSION = "1.30.0"
NETWORK_POLICY_TEMPLATE = WORKLOAD / "templates" / "networkpolicy.yaml"
GIT_SYNC_SECRET_TEMPLATE = WORKLOAD / "templates" / "git-sync-secret.yaml"
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


def _go_string(literal: str) -> str:
    """A Go template string constant ("..." with Go escapes), as Python str."""
    return json.loads(literal)


def _pipeline(value, stages: list[str]):
    """The sprig functions the templates use in an inline pipeline, in Helm's semantics (the piped value is
    the last argument): trimSuffix "s", printf "fmt", b64enc, quote. Anything else fails."""
    for stage in stages:
        stage = stage.strip()
        if match := re.fullmatch(r'trimSuffix ("(?:[^"\\]|\\.)*")', stage):
            suffix = _go_string(match.group(1))
            assert isinstance(value, str), f"trimSuffix on {type(value).__name__}"
            value = value[: -len(suffix)] if suffix and value.endswith(suffix) else value
        elif match := re.fullmatch(r'printf ("(?:[^"\\]|\\.)*")', stage):
            fmt = _go_string(match.group(1))
            assert fmt.count("%") == 1 and "%s" in fmt, f"the stand-in knows printf with one %s only: {stage}"
            value = fmt.replace("%s", str(value))
        elif stage == "b64enc":
            assert isinstance(value, str), f"b64enc on {type(value).__name__}: Helm would fail"
            value = base64.b64encode(value.encode()).decode()
        elif stage == "quote":
            value = json.dumps(str(value))
        else:
            raise AssertionError(f"the stand-in renderer does not know the function: {stage}")
    return value


def render_template(template: str, values: dict, root: str, namespace: str = RELEASE_NAMESPACE) -> str:
    """Stand-in for `helm template` on one of this chart's templates. It knows exactly the constructs they use
    and fails on anything else: a comment block, `$cfg := .Values.<root> | default dict`, if/end on
    `ne (toString $cfg.enabled) "false"` or on `$cfg.<path>` (nested), `toYaml $cfg.<path> | nindent N`,
    inline `{{ $cfg.<path> }}` with an optional pipeline (see _pipeline), .Release.Namespace/.Service.
    Control lines are whole lines with `{{-`, so Helm's output is exactly "that line removed"."""
    cfg = values.get(root) or {}
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}\n?", "", template, flags=re.S)
    lines: list[str] = []
    active: list[bool] = []  # one entry per open if
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == f"{{{{- $cfg := .Values.{root} | default dict }}}}":
            continue
        if stripped == '{{- if ne (toString $cfg.enabled) "false" }}':
            active.append(str(cfg.get("enabled")).lower() != "false")
            continue
        if match := re.fullmatch(r"\{\{-\s*if \$cfg\.([\w.]+) \}\}", stripped):
            active.append(bool(_lookup(cfg, match.group(1))))
            continue
        if stripped == "{{- end }}":
            assert active, "{{- end }} without an if"
            active.pop()
            continue
        if not all(active):
            continue
        match = re.fullmatch(r"\{\{-\s*toYaml \$cfg\.([\w.]+) \| nindent (\d+) \}\}", stripped)
        if match:
            value = _lookup(cfg, match.group(1))
            assert value, f"{root}.{match.group(1)} is empty: the rendered selector or peer list would be empty"
            pad = " " * int(match.group(2))
            block = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n")
            # nindent: a newline, then the block indented; the {{- trims the line's own indentation.
            lines[-1] = lines[-1] + "\n" + "\n".join(pad + b for b in block.splitlines())
            continue
        line = line.replace("{{ .Release.Namespace }}", namespace).replace("{{ .Release.Service }}", "Helm")

        def inline(match: re.Match) -> str:
            path, *stages = match.group(1).split("|")
            value = _lookup(cfg, path.strip())
            assert value is not None, f"{root}.{path.strip()} is not set: Helm would render <no value> or fail"
            value = _pipeline(value, stages)
            assert isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{path}: not a scalar"
            return str(value)

        line = re.sub(r"\{\{ \$cfg\.([\w.]+(?: \|[^}]+)?) \}\}", inline, line)
        assert "{{" not in line, f"the stand-in renderer does not know: {line.strip()}"
        lines.append(line)
    assert not active, "an if without {{- end }}"
    return "\n".join(lines) + "\n" if lines else ""


def render_network_policy(template: str, values: dict, namespace: str = RELEASE_NAMESPACE) -> str:
    return render_template(template, values, "networkPolicy", namespace)


def merged_values(env: str) -> dict:
    """What Helm hands this chart: values.<env>.yaml deep-merged with the (decrypted) secrets.<env>.yaml.
    Here the SOPS ciphertext stands in for the decrypted value: only its shape matters to the templates."""

    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    secrets = {k: v for k, v in _load_yaml(WORKLOAD / f"secrets.{env}.yaml").items() if k != "sops"}
    return merge(_top_values(env), secrets)


def git_sync_secret(env: str, values: dict | None = None) -> dict | None:
    rendered = render_template(
        GIT_SYNC_SECRET_TEMPLATE.read_text(encoding="utf-8"), merged_values(env) if values is None else values, "gitSync"
    )
    return yaml.safe_load(rendered) if rendered else None


def _network_policy(env: str) -> dict:
    rendered = render_network_policy(NETWORK_POLICY_TEMPLATE.read_text(encoding="utf-8"), _top_values(env))
    return yaml.safe_load(rendered)


# ---------------------------------------------------------------------------------------------
# the stand-in renderer
# ---------------------------------------------------------------------------------------------


def test_stand_in_renderer_refuses_constructs_it_does_not_know():
    with pytest.raises(AssertionError, match="does not know"):
        render_network_policy("a: {{ .Values.other }}\n", {"networkPolicy": {}})
    with pytest.raises(AssertionError, match="does not know the function"):
        render_network_policy("a: {{ $cfg.x | upper }}\n", {"networkPolicy": {"x": "y"}})
    with pytest.raises(AssertionError, match="is not set"):
        render_network_policy("a: {{ $cfg.missing }}\n", {"networkPolicy": {}})
    with pytest.raises(AssertionError, match="without"):
        render_network_policy("{{- if $cfg.x }}\na: 1\n", {"networkPolicy": {"x": 1}})
    disabled = '{{- $cfg := .Values.networkPolicy | default dict }}\n{{- if ne (toString $cfg.enabled) "false" }}\nx: 1\n{{- end }}\n'
    assert render_network_policy(disabled, {"networkPolicy": {"enabled": False}}) == ""
    assert yaml.safe_load(render_network_policy(disabled, {})) == {"x": 1}
    nested = "a: 1\n{{- if $cfg.b }}\nb: {{ $cfg.b.c }}\n{{- end }}\n"
    assert yaml.safe_load(render_network_policy(nested, {"networkPolicy": {"b": {"c": 8081}}})) == {"a": 1, "b": 8081}
    assert yaml.safe_load(render_network_policy(nested, {"networkPolicy": {}})) == {"a": 1}
    piped = 'k: {{ $cfg.s | trimSuffix "\\n" | printf "%s\\n" | b64enc | quote }}\n'
    for value in ("key", "key\n"):
        rendered = yaml.safe_load(render_network_policy(piped, {"networkPolicy": {"s": value}}))
        assert base64.b64decode(rendered["k"]).decode() == "key\n"


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
def test_network_policy_admits_only_the_scraper_on_the_metrics_ports(env):
    spec = _network_policy(env)["spec"]
    port = _values(env)["ports"][0]["containerPort"]
    # The git-sync sidecar's /metrics port, as its container declares it (test_delivery_repo.py checks that it
    # is the port git-sync binds).
    sidecar_ports = [p["containerPort"] for c in _values(env).get("extraContainers", []) for p in c.get("ports", [])]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": p} for p in [port, *sidecar_ports]]
    (peer,) = rule["from"]
    # Both selectors in ONE peer: pods labelled like the scraper AND in the scraper's namespace.
    assert set(peer) == {"namespaceSelector", "podSelector"}
    for selector in peer.values():
        assert selector.get("matchLabels"), "an empty selector would admit everything"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_lets_out_only_dns_https_and_ssh_to_github_never_the_metadata_service(env):
    egress = _network_policy(env)["spec"]["egress"]
    ports = {(p["protocol"], p["port"]) for rule in egress for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 22)}
    for rule in egress:
        assert rule.get("ports"), "a rule without ports opens every port"
        rule_ports = {p["port"] for p in rule["ports"]}
        if rule_ports == {443}:
            blocks = [peer["ipBlock"] for peer in rule["to"]]
            assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0"}
            assert {cidr for b in blocks for cidr in b.get("except", [])} == IMDS
        elif 22 in rule_ports:
            # SSH only on its own rule, only to the listed GitHub ranges (test_delivery_repo.py checks the list).
            assert rule_ports == {22}
            blocks = [peer["ipBlock"] for peer in rule["to"]]
            assert [b["cidr"] for b in blocks] == [
                peer["ipBlock"]["cidr"] for peer in _top_values(env)["networkPolicy"]["gitSync"]["gitServers"]
            ]
            assert not {"0.0.0.0/0", "::/0"} & {b["cidr"] for b in blocks}, "SSH must not be open to everywhere"


def test_network_policy_can_be_switched_off():
    template = NETWORK_POLICY_TEMPLATE.read_text(encoding="utf-8")
    assert render_network_policy(template, {"networkPolicy": {"enabled": False}}) == ""


def test_network_policy_without_the_sidecar_is_the_original_dns_https_policy():
    """Removing networkPolicy.gitSync (the repository tools turned off) removes both sidecar rules."""
    values = copy.deepcopy(_top_values("staging"))
    del values["networkPolicy"]["gitSync"]
    policy = yaml.safe_load(render_network_policy(NETWORK_POLICY_TEMPLATE.read_text(encoding="utf-8"), values))
    _assert_valid(policy)
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


# ---------------------------------------------------------------------------------------------
# the git-sync Secret (deploy key and GitHub's host key)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_git_sync_secret_is_a_valid_secret_with_exactly_the_key_and_known_hosts(env):
    secret = git_sync_secret(env)
    assert secret is not None, "gitSync.enabled: the Secret must render"
    _assert_valid(secret)
    assert secret["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert set(secret["data"]) == {"ssh", "known_hosts"}
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    values = merged_values(env)["gitSync"]
    # One final newline (ssh rejects a private key without), nothing else changed.
    assert decoded["ssh"] == values["secrets"]["ssh"].rstrip("\n") + "\n"
    assert decoded["known_hosts"] == values["knownHosts"].rstrip("\n") + "\n"
    # The volume the sidecar mounts is this Secret.
    (volume,) = [v for v in _values(env)["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_git_sync_secret_is_not_rendered_when_disabled_and_fails_without_the_key():
    values = merged_values("staging")
    values["gitSync"]["enabled"] = False
    assert git_sync_secret("staging", values) is None
    values = merged_values("staging")
    del values["gitSync"]["secrets"]
    with pytest.raises(AssertionError, match="not set"):
        git_sync_secret("staging", values)


# ---------------------------------------------------------------------------------------------
# the values, as the Deployment and PodDisruptionBudget we expect ws-service to render
# ---------------------------------------------------------------------------------------------


def expected_deployment(values: dict) -> dict:
    """The Deployment we expect ws-service to render. ASSUMED mapping (workloads/README.md): `extraContainers`
    verbatim after the bot's container, `volumes` as the pod's volumes, `volumeMounts` on the bot's container."""
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
                    "containers": [container, *values.get("extraContainers", [])],
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
    broken = expected_deployment(values)
    broken["spec"]["template"]["spec"]["containers"][1]["volumeMounts"][0]["readonly"] = True  # readOnly
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = git_sync_secret("staging")
    broken["stringdata"] = broken.pop("data")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_template_is_checked_somewhere():
    """A new template needs a check: rendered and validated here, or embedded-file checks in test_ops.py."""
    checked = {"networkpolicy.yaml", "git-sync-secret.yaml", "prometheusrule.yaml", "dashboard-configmap.yaml"}
    present = {p.name for p in (WORKLOAD / "templates").iterdir()}
    assert present == checked, f"unchecked templates: {sorted(present - checked)}"
    assert (REPO / "tests" / "test_ops.py").read_text().count("templates") >= 1

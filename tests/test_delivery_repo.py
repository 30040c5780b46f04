"""The GL Publisher repository sidecar (issue 22): git-sync keeps a checkout the bot's read-only tools read.

What values.<env>.yaml must say, checked against git-sync v4's own source (flags, user, metrics) and GitHub's
published keys, since no cluster or chart is reachable from here:

- the sidecar (`extraContainers`, an ASSUMED ws-service key: workloads/README.md) runs
  registry.k8s.io/git-sync/git-sync v4, pinned by digest, with only v4 flags, depth 1, a sane period, SSH with
  host-key checking against github.com's published Ed25519 key, and metrics on the port the NetworkPolicy and
  the alerts expect;
- the checkout is an emptyDir the sidecar alone writes and the bot mounts read-only at git-sync's --root, and
  LEDGER_BOT_REPO is --root/--link;
- the deploy key is SOPS ciphertext, rendered into a Secret only the sidecar mounts (mode 0400);
- the sidecar runs non-root (the image's own user, which ssh needs), read-only, with small resources and no
  probes (a GitHub outage must never make the bot unready);
- the NetworkPolicy's SSH rule reaches GitHub's git ranges only;
- the alerts read only metrics git-sync exports, and the pieces of the feature are all on or all off.

Kubernetes schema validation of the whole Deployment (sidecar included) and the rendering of both templates are
in test_delivery_manifests.py.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import posixpath
import re

import pytest
import yaml
from test_delivery import (
    ENVIRONMENTS,
    REPO,
    SOPS_VALUE,
    WORKLOAD,
    _secret_names,
    _secrets_file,
    _values,
)
from test_delivery_manifests import (
    NETWORK_POLICY_TEMPLATE,
    _top_values,
    git_sync_secret,
    merged_values,
    render_network_policy,
)

IMAGE = re.compile(r"registry\.k8s\.io/git-sync/git-sync:v4\.\d+\.\d+@sha256:[0-9a-f]{64}")
# git-sync v4.5.0's flags (main.go, pflag names), without the deprecated v3 ones (--branch, --rev, --dest,
# --wait, --timeout, --ssh, --change-permissions, --sync-hook-command, --max-sync-failures, --password) and
# without --help/--man/--version. Source: github.com/kubernetes/git-sync, tag v4.5.0.
GIT_SYNC_V4_FLAGS = frozenset({
    "add-user", "askpass-url", "cookie-file", "credential", "depth", "error-file", "exechook-backoff",
    "exechook-command", "exechook-timeout", "git", "git-config", "git-gc", "github-app-application-id",
    "github-app-client-id", "github-app-installation-id", "github-app-private-key-file", "github-base-url",
    "group-write", "http-bind", "http-metrics", "http-pprof", "link", "max-failures", "one-time", "password-file",
    "period", "ref", "repo", "root", "sparse-checkout-file", "ssh-key-file", "ssh-known-hosts",
    "ssh-known-hosts-file", "stale-worktree-timeout", "submodules", "sync-on-signal", "sync-timeout",
    "touch-file", "username", "verbose", "webhook-backoff", "webhook-method", "webhook-success-status",
    "webhook-timeout", "webhook-url",
})  # fmt: skip
# The image's user (Dockerfile.in: USER 65533:65533, with an /etc/passwd entry: ssh needs the uid there, and
# --add-user would need a writable /etc/passwd, which a read-only root filesystem forbids).
GIT_SYNC_UID = 65533
# What git-sync v4 exports on --http-metrics (main.go): series names, and git_sync_count_total's `status` values.
GIT_SYNC_METRICS = frozenset({
    "git_sync_count_total", "git_fetch_count_total", "git_sync_askpass_calls", "git_sync_refresh_github_app_token_count",
    "git_sync_duration_seconds", "git_sync_duration_seconds_sum", "git_sync_duration_seconds_count",
})  # fmt: skip
GIT_SYNC_STATUSES = frozenset({"success", "error", "noop"})
# github.com's Ed25519 host key fingerprint as docs.github.com publishes it ("GitHub's SSH key fingerprints").
GITHUB_ED25519_FINGERPRINT = "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"
# github.com itself (ssh git@github.com) answers from this range; it must be in the SSH rule.
GITHUB_COM_RANGE = ipaddress.ip_network("140.82.112.0/20")
RULES = WORKLOAD / "alerts" / "ledger-bot.rules.yaml"
WORKLOADS_README = REPO / "workloads" / "README.md"


def _sidecar(env: str) -> dict:
    containers = _values(env).get("extraContainers") or []
    (sidecar,) = [c for c in containers if c["name"] == "git-sync"]
    return sidecar


def _flags(env: str) -> dict[str, str]:
    """The sidecar's args as {flag: value}; every arg must be --name=value, each flag at most once."""
    flags: dict[str, str] = {}
    for arg in _sidecar(env)["args"]:
        match = re.fullmatch(r"--([a-z][a-z0-9-]*)=(.+)", arg)
        assert match, f"{arg!r}: write flags as --name=value (a bare boolean or a split value is easy to misread)"
        assert match.group(1) not in flags, f"--{match.group(1)} given twice"
        flags[match.group(1)] = match.group(2)
    return flags


def _duration_seconds(text: str) -> float:
    """A Go/Prometheus duration such as 60s, 1m30s, 3h."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _mounts(container: dict, volume: str) -> list[dict]:
    return [m for m in container.get("volumeMounts", []) if m["name"] == volume]


def _volume(env: str, name: str) -> dict:
    (volume,) = [v for v in _values(env)["volumes"] if v["name"] == name]
    return volume


def _repo_volume(env: str) -> str:
    """The volume the sidecar mounts at --root: the checkout."""
    (mount,) = [m for m in _sidecar(env)["volumeMounts"] if m["mountPath"] == _flags(env)["root"]]
    return mount["name"]


def _secret_volume(env: str) -> dict:
    (volume,) = [v for v in _values(env)["volumes"] if "secret" in v]
    return volume


def _bot_container(env: str) -> dict:
    """The bot's container as ws-service renders it: its volumeMounts are the values' `volumeMounts`."""
    return {"name": _values(env)["name"], "volumeMounts": _values(env)["volumeMounts"]}


# ---------------------------------------------------------------------------------------------
# image and flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_is_git_sync_v4_pinned_by_digest(env):
    image = _sidecar(env)["image"]
    assert IMAGE.fullmatch(image), f"{image!r}: registry.k8s.io/git-sync/git-sync:v4.x.y@sha256:<digest>"
    assert {_sidecar(e)["image"] for e in ENVIRONMENTS} == {image}, "both environments run the same image"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_uses_only_git_sync_v4_flags(env):
    flags = _flags(env)
    unknown = set(flags) - GIT_SYNC_V4_FLAGS
    assert not unknown, f"not git-sync v4 flags (v3 names such as --branch/--wait are deprecated): {sorted(unknown)}"
    assert {"repo", "root", "link", "ref"} <= set(flags)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_syncs_one_commit_of_the_branch_over_ssh_and_keeps_retrying(env):
    flags = _flags(env)
    assert re.fullmatch(r"git@github\.com:wealthsimple/oracle-gl-publisher(\.git)?", flags["repo"]), flags["repo"]
    assert flags["depth"] == "1", "one commit: the tools read the tree, not the history"
    assert flags["submodules"] == "off", "the deploy key reaches this repository only"
    assert 30 <= _duration_seconds(flags["period"]) <= 300, "every 30 s to 5 min"
    # By default one failed sync exits git-sync (a GitHub blip would restart the container and count as a crash).
    assert flags["max-failures"] == "-1"
    # The repository URL the bot links to is the one synced.
    repo_url = _values(env)["env"]["LEDGER_BOT_REPO_URL"]
    assert repo_url == "https://github.com/" + flags["repo"].split(":", 1)[1].removesuffix(".git")


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_ssh_checks_githubs_published_host_key(env):
    flags = _flags(env)
    assert flags["ssh-known-hosts"] == "true", "never StrictHostKeyChecking=no"
    (line,) = [entry for entry in merged_values(env)["gitSync"]["knownHosts"].splitlines() if entry.strip()]
    hosts, key_type, key = line.split()
    assert hosts == "github.com" and key_type == "ssh-ed25519"
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(key)).digest()).decode().rstrip("=")
    assert f"SHA256:{digest}" == GITHUB_ED25519_FINGERPRINT, "not the key GitHub publishes for github.com"


# ---------------------------------------------------------------------------------------------
# the checkout: written by the sidecar, read-only in the bot
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_bot_reads_the_checkout_through_git_syncs_link(env):
    flags = _flags(env)
    assert posixpath.isabs(flags["root"]) and "/" not in flags["link"], "--link relative to --root"
    assert _values(env)["env"]["LEDGER_BOT_REPO"] == posixpath.join(flags["root"], flags["link"])
    volume = _volume(env, _repo_volume(env))
    assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"].get("sizeLimit"), "a bounded emptyDir"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_only_the_sidecar_writes_the_checkout(env):
    name, root = _repo_volume(env), _flags(env)["root"]
    (bot_mount,) = _mounts(_bot_container(env), name)
    # Same path as --root: git-sync's symlink and the worktree's .git file are relative to it.
    assert bot_mount == {"name": name, "mountPath": root, "readOnly": True}
    (sidecar_mount,) = _mounts(_sidecar(env), name)
    assert sidecar_mount.get("readOnly") is not True
    others = [c for c in _values(env).get("extraContainers", []) if c["name"] != "git-sync"]
    assert all(m.get("readOnly") is True for c in others for m in _mounts(c, name))


# ---------------------------------------------------------------------------------------------
# the deploy key: SOPS, in a Secret only the sidecar mounts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_deploy_key_is_sops_ciphertext_outside_the_bots_environment(env):
    document = _secrets_file(env)
    assert set(document["gitSync"]["secrets"]) == {"ssh"}
    assert SOPS_VALUE.match(document["gitSync"]["secrets"]["ssh"])
    # ws-service's `secrets:` become the bot container's environment: the key must not be among them.
    assert set(document["ws-service"]["secrets"]) == _secret_names()


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_deploy_key_is_mounted_only_into_the_sidecar_readable_by_it_alone(env):
    volume = _secret_volume(env)
    secret = git_sync_secret(env)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] & 0o077 == 0, "ssh refuses a private key group or others can read"
    flags = _flags(env)
    key_dir = posixpath.dirname(flags["ssh-key-file"])
    assert posixpath.dirname(flags["ssh-known-hosts-file"]) == key_dir
    assert {posixpath.basename(flags["ssh-key-file"]), posixpath.basename(flags["ssh-known-hosts-file"])} == set(
        secret["data"]
    )
    (mount,) = _mounts(_sidecar(env), volume["name"])
    assert mount == {"name": volume["name"], "mountPath": key_dir, "readOnly": True}
    assert not _mounts(_bot_container(env), volume["name"]), "the bot's container must never see the key"
    # The key reaches the sidecar as a file: never through the environment.
    assert "env" not in _sidecar(env) and "envFrom" not in _sidecar(env)
    # fsGroup makes the root-owned 0400 file readable by the sidecar's group (kubelet adds group read).
    assert _values(env)["podSecurityContext"]["fsGroup"] == _sidecar(env)["securityContext"]["runAsGroup"]


# ---------------------------------------------------------------------------------------------
# runs locked down, small, and never gates the bot
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_is_locked_down(env):
    context = _sidecar(env)["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == GIT_SYNC_UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # HOME=/tmp in the image: git-sync writes git's global config there.
    (home,) = [m for m in _sidecar(env)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in _volume(env, home["name"])


def _quantity(text: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_resources_are_small_and_bounded(env):
    resources = _sidecar(env)["resources"]
    assert _quantity(resources["requests"]["cpu"]) <= 0.1
    assert _quantity(resources["requests"]["memory"]) <= 128 * 2**20
    limit = _quantity(resources["limits"]["memory"])
    assert _quantity(resources["requests"]["memory"]) <= limit <= 512 * 2**20


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_has_no_probes(env):
    """git-sync's "/" fails until the first sync: as a readiness probe it would keep the pod (and the bot) unready
    while GitHub is unreachable, as a liveness probe it would restart the pod. LedgerBotRepoStale watches instead."""
    probes = {"readinessProbe", "livenessProbe", "startupProbe"} & set(_sidecar(env))
    assert not probes, f"sidecar probes gate the bot on GitHub: {sorted(probes)}"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_sidecar_metrics_port_is_the_one_bound_admitted_and_distinct_from_the_bot(env):
    flags = _flags(env)
    assert flags["http-metrics"] == "true"
    port = int(flags["http-bind"].rsplit(":", 1)[1])
    assert flags["http-bind"] == f":{port}", "listen on all addresses, so Prometheus can scrape it"
    (declared,) = _sidecar(env)["ports"]
    assert declared["containerPort"] == port and len(declared["name"]) <= 15
    assert _top_values(env)["networkPolicy"]["gitSync"]["metricsPort"] == port
    assert port != _values(env)["ports"][0]["containerPort"]


# ---------------------------------------------------------------------------------------------
# NetworkPolicy: SSH to GitHub's git servers only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_ssh_egress_reaches_only_githubs_git_ranges(env):
    policy = yaml.safe_load(render_network_policy(NETWORK_POLICY_TEMPLATE.read_text(encoding="utf-8"), _top_values(env)))
    ssh_rules = [r for r in policy["spec"]["egress"] if any(p["port"] == 22 for p in r.get("ports", []))]
    (rule,) = ssh_rules
    assert rule["ports"] == [{"protocol": "TCP", "port": 22}]
    networks = []
    for peer in rule["to"]:
        assert set(peer) == {"ipBlock"} and set(peer["ipBlock"]) == {"cidr"}, peer
        networks.append(ipaddress.ip_network(peer["ipBlock"]["cidr"]))  # strict: host bits must be zero
    assert all(n.prefixlen >= (16 if n.version == 4 else 24) for n in networks), "no broad range for SSH"
    assert len(set(networks)) == len(networks)
    assert any(GITHUB_COM_RANGE.subnet_of(n) for n in networks if n.version == 4), "github.com's own range"
    assert {n.version for n in networks} == {4, 6}, "the pod may reach GitHub over IPv6 too"


# ---------------------------------------------------------------------------------------------
# alerts: git-sync's real metrics
# ---------------------------------------------------------------------------------------------


def _rules() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {r.get("alert") or r["record"]: r["expr"] for g in groups for r in g["rules"]}


def test_alerts_read_only_metrics_and_statuses_git_sync_exports():
    used = {name for expr in _rules().values() for name in re.findall(r"\bgit_[a-z_]+\b", expr)}
    assert used, "LedgerBotRepoStale should read git-sync's own metrics"
    assert used <= GIT_SYNC_METRICS, f"git-sync v4 does not export {sorted(used - GIT_SYNC_METRICS)}"
    statuses = set()
    for expr in _rules().values():
        for matcher in re.findall(r'status=~?"([^"]+)"', expr):
            statuses |= set(matcher.split("|"))
    assert statuses <= GIT_SYNC_STATUSES, statuses


def test_stale_alert_counts_no_op_fetches_as_fresh_and_outlasts_many_periods():
    expr = _rules()["LedgerBotRepoStale"]
    (fresh,) = re.findall(r'git_sync_count_total\{[^}]*status=~"([^"]+)"[^}]*\}\[(\w+)\]', expr)
    assert set(fresh[0].split("|")) == {"success", "noop"}, "a fetch that found nothing new is still fresh"
    window = _duration_seconds(fresh[1])
    for env in ENVIRONMENTS:
        assert window >= 60 * _duration_seconds(_flags(env)["period"]), "a few failed fetches must not alert"


# ---------------------------------------------------------------------------------------------
# the feature's switches agree
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_pieces_of_the_sidecar_are_all_on_or_all_off(env):
    """Sidecar, its volumes, the bot's read-only mount, the Secret, the SOPS key and the NetworkPolicy rules go
    together. LEDGER_BOT_REPO needs the sidecar; the sidecar without LEDGER_BOT_REPO is the quick way to turn the
    tools off (workloads/README.md)."""
    values, top = _values(env), _top_values(env)
    pieces = {
        "extraContainers git-sync": any(c["name"] == "git-sync" for c in values.get("extraContainers", [])),
        "secret volume": any("secret" in v for v in values["volumes"]),
        "gitSync.enabled": bool((top.get("gitSync") or {}).get("enabled")),
        "secrets gitSync": "gitSync" in _secrets_file(env),
        "networkPolicy.gitSync": bool(top["networkPolicy"].get("gitSync")),
    }
    assert len(set(pieces.values())) == 1, f"{env}: half-configured sidecar: {pieces}"
    if values["env"].get("LEDGER_BOT_REPO"):
        assert all(pieces.values()), "LEDGER_BOT_REPO without the sidecar: nothing would ever fill the checkout"
        assert _mounts(_bot_container(env), _repo_volume(env))


def test_sidecar_inputs_are_documented_as_known_or_assumed():
    readme = WORKLOADS_README.read_text(encoding="utf-8")
    section = readme.split("## Repository sidecar", 1)
    assert len(section) == 2, "workloads/README.md needs a 'Repository sidecar' section"
    rows = {}
    for line in section[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].lower()
    used = {"extraContainers", "volumes", "volumeMounts", "podSecurityContext.fsGroup", "gitSync",
            "gitSync.secrets.ssh", "networkPolicy.gitSync", "git-sync metrics scrape"}  # fmt: skip
    assert used <= set(rows), f"undocumented: {sorted(used - set(rows))}"
    for name, status in rows.items():
        assert status in {"known", "assumed"}, f"{name}: status must be known or assumed, not {status!r}"
    image_tag = _sidecar("staging")["image"].split("@")[0].rsplit(":", 1)[1]
    assert image_tag in section[1], "the README should name the pinned git-sync version"

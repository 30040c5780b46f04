"""Delivery checks: what ships (image, pipeline, workloads) is linted and agrees with the bot.

Sections:
  lint          hadolint, actionlint (+shellcheck), zizmor, check-jsonschema, yamllint; all
                installed by requirements-dev.lock (pyproject's `lint` extra). A missing
                linter fails its test: a check that silently skips is a check that never runs.
  config        every setting the bot requires is provided in each environment, and the
                values name only settings the bot has.
  secrets       the SOPS files carry exactly the bot's secrets, encrypted.
  rollout       replicas, probes, grace period and resources match the contract.
                (Kubernetes schema checks, the NetworkPolicy and the pipeline's deploy rules are in
                test_delivery_manifests.py and test_delivery_pipeline.py.)
  probes        the probe paths/port in the values are the ones the running bot serves.
  image         Dockerfile and workflows agree with the README and with each other.
  lock install  the Dockerfile's dependency step, run for real into a fresh venv (~25 s,
                needs PyPI). Deselect with: pytest -m "not slow".
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
WORKLOAD = REPO / "workloads" / "ledger-bot"
ENVIRONMENTS = ("staging", "production")

IMAGE_REPOSITORY = "526316940316.dkr.ecr.us-east-1.amazonaws.com/wealthsimple/ledger-bot"
# The README's two commands, exactly as the contract states them.
README_RUN_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q --require-hashes -r requirements.lock"
    " && .venv/bin/python ledger_bot.py"
)
README_TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q --require-hashes -r requirements-dev.lock"
    " -r requirements-proxy.lock && .venv/bin/ruff check . && .venv/bin/mypy && .venv/bin/python -m pytest"
)
# litellm settings the image bakes in; the only env vars values may name besides Config fields.
LITELLM_OFFLINE_VARS = {"LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_OFFLINE_MODE"}
# After the drain deadline the bot ends every open reply and queued question with a notice (~10 s),
# then exits; the contract asks terminationGracePeriodSeconds >= drain_seconds + 20.
GRACE_MARGIN_SECONDS = 20
# /health answers within a second of start; the startup probe must still allow a cold node.
STARTUP_ALLOWANCE_SECONDS = (30, 120)
# What a deployed image reference looks like: the commit SHA, pinned to the digest ECR stored for it.
IMAGE_TAG = re.compile(r"^[0-9a-f]{40}@sha256:[0-9a-f]{64}$")
DUMMY_SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-000000000000-0000000000000-" + "a" * 24,
    "SLACK_APP_TOKEN": "xapp-1-A00000000-0000000000000-" + "0" * 64,
    "LITELLM_DEVELOPER_KEY": "test-key-not-real",
}
SOPS_VALUE = re.compile(
    r"^ENC\[AES256_GCM,data:[A-Za-z0-9+/=]+,iv:[A-Za-z0-9+/=]+,tag:[A-Za-z0-9+/=]+,type:str\]$"
)
# Shapes of real credentials: none may appear anywhere under workloads/ (Slack tokens, API keys, and a private
# key such as the git-sync sidecar's deploy key).
PLAINTEXT_SECRET = re.compile(
    r"xox[abp]-[0-9A-Za-z-]{10,}|xapp-[0-9A-Za-z-]{10,}|\bsk-[0-9A-Za-z_-]{16,}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _values(env: str) -> dict:
    return _load_yaml(WORKLOAD / f"values.{env}.yaml")["ws-service"]


def _secrets_file(env: str) -> dict:
    return _load_yaml(WORKLOAD / f"secrets.{env}.yaml")


def _workflow(name: str) -> dict:
    return _load_yaml(WORKFLOWS / name)


def _tool(name: str) -> str:
    """Path of a linter from the lint extra: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: install requirements-dev.lock (pyproject's `lint` extra)"
        )
    return found


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    # The venv's bin first on PATH, so actionlint finds the bundled shellcheck.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [_tool(args[0]), *args[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def _assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{shlex.join(result.args)}\n{result.stdout}\n{result.stderr}"


def _config_fields() -> dict:
    """The bot's settings as {ENV_VAR_NAME: msgspec FieldInfo}."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ledger_bot = importlib.import_module("ledger_bot")
    return {field.name.upper(): field for field in msgspec.structs.fields(ledger_bot.Config)}


def _ledger_bot():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("ledger_bot")


def _secret_names() -> set[str]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return set(importlib.import_module("ledger_bot").SECRET_ENV_VARS)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


def _dockerfile_env() -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form)."""
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env = {}
    for keyword, args in instructions[last_from:]:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _key_paths(node, prefix=()) -> set[tuple]:
    if isinstance(node, dict):
        paths = set()
        for key, value in node.items():
            paths |= {(*prefix, key)} | _key_paths(value, (*prefix, key))
        return paths
    return set()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _public_uses(workflow: dict) -> list[str]:
    uses = []
    for job in workflow["jobs"].values():
        if "uses" in job:
            uses.append(job["uses"])
        uses += [step["uses"] for step in job.get("steps", []) if "uses" in step]
    return [u for u in uses if not u.startswith(("./", "wealthsimple/"))]


# ---------------------------------------------------------------------------------------------
# lint
# ---------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    _assert_clean(_run_tool("hadolint", "Dockerfile"))


def test_workflows_pass_actionlint_with_shellcheck():
    _tool("shellcheck")  # without it actionlint silently skips every run: script
    _assert_clean(_run_tool("actionlint"))


def test_workflows_pass_zizmor_offline_pedantic():
    _assert_clean(_run_tool("zizmor", "--offline", "--persona=pedantic", ".github/workflows"))


def test_workflows_match_the_github_workflow_schema():
    files = sorted(str(p.relative_to(REPO)) for p in WORKFLOWS.glob("*.yml"))
    assert files, "no workflows found"
    _assert_clean(_run_tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *files))


def test_repository_yaml_passes_yamllint():
    _assert_clean(_run_tool("yamllint", "--strict", "."))


# ---------------------------------------------------------------------------------------------
# config: values + secrets <-> ledger_bot.Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_required_setting_is_provided(env):
    fields = _config_fields()
    provided = set(_values(env)["env"]) | set(_secrets_file(env)["ws-service"]["secrets"])
    provided |= set(_dockerfile_env())
    missing = sorted(name for name, field in fields.items() if field.required and name not in provided)
    assert not missing, f"{env}: required settings with no value: {missing}"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_values_name_only_settings_the_bot_has(env):
    fields = _config_fields()
    unknown = sorted(set(_values(env)["env"]) - set(fields) - LITELLM_OFFLINE_VARS)
    assert not unknown, f"{env}: values set env vars the bot does not read: {unknown}"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_secrets_never_appear_in_plain_values(env):
    leaked = sorted(_secret_names() & set(_values(env)["env"]))
    assert not leaked, f"{env}: secrets belong in secrets.{env}.yaml (SOPS), not values: {leaked}"


def test_environments_use_the_same_keys():
    staging, production = (_key_paths(_values(env)) for env in ENVIRONMENTS)
    assert staging ^ production == set(), "keys differ between staging and production values"
    assert set(_values("staging")["env"]) == set(_values("production")["env"])


# ---------------------------------------------------------------------------------------------
# secrets: SOPS files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_secrets_file_is_sops_encrypted_with_exactly_the_bot_secrets(env):
    document = _secrets_file(env)
    secrets = document["ws-service"]["secrets"]
    assert set(secrets) == _secret_names()
    for name, value in secrets.items():
        assert isinstance(value, str) and SOPS_VALUE.match(value), f"{env}: {name} is not SOPS ciphertext"

    sops = document["sops"]
    assert sops["kms"], "no KMS key: nobody could decrypt this file"
    for key in sops["kms"]:
        assert re.match(r"^arn:aws:kms:[a-z0-9-]+:\d{12}:(key|alias)/\S+$", key["arn"]), key["arn"]
        assert key["enc"] and key["created_at"]
    assert SOPS_VALUE.match(sops["mac"])
    assert sops["encrypted_regex"] == "^secrets$"
    assert sops["lastmodified"] and sops["version"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_secrets_file_holds_nothing_sops_would_leave_in_plaintext(env):
    """sops encrypts only values under a key matching encrypted_regex (at any depth: ws-service.secrets for the
    bot, gitSync.secrets for the sidecar's deploy key). Every other value in the file would be committed as
    plaintext, so there must be none: every leaf outside `sops:` sits under such a key and is ciphertext."""
    document = _secrets_file(env)
    pattern = re.compile(document["sops"]["encrypted_regex"])

    def leaves(node, path=()):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, (*path, key))
        else:
            yield path, node

    found = [(path, value) for path, value in leaves({k: v for k, v in document.items() if k != "sops"})]
    assert found, "no secrets at all"
    for path, value in found:
        assert any(pattern.search(str(key)) for key in path), f"{env}: {'.'.join(path)} would stay plaintext"
        assert isinstance(value, str) and SOPS_VALUE.match(value), f"{env}: {'.'.join(path)} is not SOPS ciphertext"


def test_plaintext_patterns_catch_what_they_should():
    for sample in ("xoxb-0000000000-0000000000000", "sk-" + "a1" * 10, "-----BEGIN OPENSSH PRIVATE KEY-----"):
        assert PLAINTEXT_SECRET.search(sample), sample
    assert not PLAINTEXT_SECRET.search(_secrets_file("staging")["gitSync"]["secrets"]["ssh"])


def test_no_plaintext_credentials_under_workloads():
    offenders = [
        str(path.relative_to(REPO))
        for path in WORKLOAD.rglob("*")
        if path.is_file() and PLAINTEXT_SECRET.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not offenders, f"credential-shaped plaintext in: {offenders}"


def test_sops_creation_rules_cover_each_secrets_file():
    rules = _load_yaml(REPO / ".sops.yaml")["creation_rules"]
    for env in ENVIRONMENTS:
        path = f"workloads/ledger-bot/secrets.{env}.yaml"
        matching = [rule for rule in rules if re.search(rule["path_regex"], path)]
        assert len(matching) == 1, f"{path}: {len(matching)} creation rules match"
        rule = matching[0]
        assert rule["encrypted_regex"] == _secrets_file(env)["sops"]["encrypted_regex"]
        rule_arns = {arn.strip() for arn in rule["kms"].split(",")}
        assert rule_arns == {key["arn"] for key in _secrets_file(env)["sops"]["kms"]}


# ---------------------------------------------------------------------------------------------
# rollout: replicas, grace period, probes, resources
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_rollout_keeps_a_replica_serving(env):
    values = _values(env)
    assert values["replicas"] == 2
    assert values["strategy"]["type"] == "RollingUpdate"
    assert values["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    # Unready pods (Slack outage, revoked token, crash loop) must not block node drains.
    assert values["podDisruptionBudget"] == {
        "enabled": True, "minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_replicas_spread_over_nodes_and_zones(env):
    values = _values(env)
    constraints = {c["topologyKey"]: c for c in values["topologySpreadConstraints"]}
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    # Two replicas on one node would make the PDB meaningless: hard rule per node, best effort per zone.
    assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in constraints.values():
        assert constraint["maxSkew"] == 1
        # The bot's own pods, and per ReplicaSet so a rollout's surge pod is never blocked.
        assert constraint["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": values["name"]}}
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_grace_period_outlasts_the_drain_and_the_notices(env):
    """The bot's own load_config() computes drain_seconds from the values' env (contract: derived from
    LEDGER_BOT_ANSWER_MAX_SECONDS when LEDGER_BOT_SHUTDOWN_GRACE_SECONDS is unset); Kubernetes must wait
    at least drain_seconds + 20 before SIGKILL, or long answers are cut off with no notice."""
    values = _values(env)
    environ = {**{k: str(v) for k, v in values["env"].items()}, **DUMMY_SECRETS}
    drain = _ledger_bot().load_config(environ).drain_seconds
    answer_max = _ledger_bot().load_config(environ).ledger_bot_answer_max_seconds
    assert drain >= answer_max, "the drain must outlast one whole answer"
    assert values["terminationGracePeriodSeconds"] >= drain + GRACE_MARGIN_SECONDS, (
        f"{env}: terminationGracePeriodSeconds {values['terminationGracePeriodSeconds']} < drain {drain} + 20"
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_probes_start_on_health_and_serve_on_ready(env):
    """Startup and liveness on /health (the process works), readiness on /ready (Slack connected): a pod
    started during a Slack outage or with a revoked token stays up and unready instead of restarting."""
    values = _values(env)
    assert values["startupProbe"]["httpGet"]["path"] == "/health"
    assert values["livenessProbe"]["httpGet"]["path"] == "/health"
    assert values["readinessProbe"]["httpGet"]["path"] == "/ready"
    probe = values["startupProbe"]
    low, high = STARTUP_ALLOWANCE_SECONDS
    assert low <= probe["periodSeconds"] * probe["failureThreshold"] <= high


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_resources_and_port_match_the_bot(env):
    values = _values(env)
    assert values["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    (port,) = values["ports"]
    assert int(values["env"]["HEALTH_PORT"]) == port["containerPort"]
    exposed = [args for keyword, args in _dockerfile_instructions() if keyword == "EXPOSE"]
    assert exposed == [str(port["containerPort"])]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert values[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_pod_is_locked_down(env):
    values = _values(env)
    assert values["serviceAccount"]["automountServiceAccountToken"] is False
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    container = values["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    tmp_volumes = {m["name"] for m in values["volumeMounts"] if m["mountPath"] == "/tmp"}
    assert tmp_volumes and all(
        "emptyDir" in v for v in values["volumes"] if v["name"] in tmp_volumes
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_bot_accepts_the_values_and_serves_the_probe_paths(env, tmp_path):
    """Start the real bot with the environment's settings (plus dummy secrets, and Slack and the
    gateway pointed at closed local ports): a bad setting would exit 2 here. Liveness answers
    200, readiness 503 (Slack is not connected) with a JSON body, and SIGTERM ends it with 0."""
    values = _values(env)
    liveness = values["livenessProbe"]["httpGet"]["path"]
    readiness = values["readinessProbe"]["httpGet"]["path"]
    assert values["startupProbe"]["httpGet"]["path"] in (liveness, readiness)

    health_port, closed_port = _free_port(), _free_port()
    env_vars = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "LITELLM_", "LEDGER_BOT_"))}
    env_vars.update({name: str(value) for name, value in values["env"].items()})
    env_vars.update(DUMMY_SECRETS)
    env_vars.update(
        LITELLM_BASE_URL=f"http://127.0.0.1:{closed_port}/api/v2",
        SLACK_API_URL=f"http://127.0.0.1:{closed_port}/api/",
        HEALTH_PORT=str(health_port),
    )
    log_path = tmp_path / "bot.log"
    with log_path.open("wb") as log:
        bot = subprocess.Popen(
            [sys.executable, "ledger_bot.py"], cwd=REPO, env=env_vars,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{health_port}"
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline:
            assert bot.poll() is None, f"bot exited early ({bot.returncode}):\n{log_path.read_text()}"
            try:
                status, _ = _get(base + liveness)
            except OSError:  # not listening yet
                status = None
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200, f"{liveness} never answered 200:\n{log_path.read_text()}"

        status, body = _get(base + readiness)
        assert status == 503, f"{readiness} answered {status} with Slack unreachable"
        json.loads(body)  # a JSON body, for humans and tools reading the probe

        bot.send_signal(signal.SIGTERM)
        assert bot.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# image and pipeline agree with the README and each other
# ---------------------------------------------------------------------------------------------


def test_dockerfile_cmd_is_the_readme_run_command():
    cmds = [args for keyword, args in _dockerfile_instructions() if keyword == "CMD"]
    assert len(cmds) == 1 and json.loads(cmds[0]) == ["python", "ledger_bot.py"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert README_RUN_COMMAND in readme
    assert README_RUN_COMMAND.endswith("python ledger_bot.py")


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert README_TEST_COMMAND in readme
    runs = [step.get("run") for step in _workflow("default.yml")["jobs"]["test"]["steps"]]
    assert README_TEST_COMMAND in runs


def test_image_repository_agrees_between_workflows_and_values():
    registry, _, repository = IMAGE_REPOSITORY.partition("/")
    build_steps = _workflow("default.yml")["jobs"]["publish"]["steps"]
    (company_build,) = [s for s in build_steps if s.get("uses", "").startswith("wealthsimple/github-workflows@")]
    assert company_build["with"]["image_name"] == repository.rsplit("/", 1)[1]
    for env in ENVIRONMENTS:
        image = _values(env)["image"]
        assert image["repository"] == IMAGE_REPOSITORY
        assert image["tag"] == "REPLACED_BY_DEPLOY" or IMAGE_TAG.fullmatch(image["tag"])
    promote = (WORKFLOWS / "promote.yml").read_text(encoding="utf-8")
    assert f'ECR_REGISTRY_ID: "{registry.split(".")[0]}"' in promote
    assert f"ECR_REPOSITORY: {repository}" in promote


def test_dockerfile_builds_the_image_the_contract_describes():
    instructions = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("PYTHON_IMAGE=python:3.12-slim")
    # Pinned by digest: a rebuild of the same commit uses the same base bytes (Renovate moves it).
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.12-slim@sha256:[0-9a-f]{64}", instructions[0][1])
    assert keywords.count("FROM") >= 2, "multi-stage: the final stage gets only the venv"
    assert all(args.split()[0] == "${PYTHON_IMAGE}" for keyword, args in instructions if keyword == "FROM")
    assert "HEALTHCHECK" not in keywords
    env = _dockerfile_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True" and env["LITELLM_OFFLINE_MODE"] == "true"
    assert env["LEDGER_BOT_GIT_SHA"] == "${GIT_SHA}"
    assert any(keyword == "ARG" and args.startswith("GIT_SHA") for keyword, args in instructions)
    (user,) = [args for keyword, args in instructions if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user"
    values_uid = {_values(e)["podSecurityContext"]["runAsUser"] for e in ENVIRONMENTS}
    assert values_uid == {int(uid)}
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any(args.startswith("knowledge/ ") for args in copies)
    # Dependencies from the lock, before the code (layer caching).
    install = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and "pip install" in a)
    code = next(i for i, (k, a) in enumerate(instructions) if k == "COPY" and "ledger_bot.py" in a)
    assert install < code
    assert "--require-hashes" in instructions[install][1] and "requirements.lock" in instructions[install][1]
    # --no-deps trusts the lock; pip check proves it is consistent (e.g. after a bot bumped one package).
    assert instructions[install][1].endswith("&& /opt/venv/bin/pip check")


def test_dockerignore_admits_only_what_the_image_copies():
    lines = [
        line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"requirements.lock", "ledger_bot.py", "knowledge"}


@pytest.mark.parametrize("name", ["default.yml", "promote.yml"])
def test_workflow_hygiene(name):
    workflow = _workflow(name)
    assert workflow["permissions"] == {}, "top-level permissions: {} (grants are per job)"
    for job_name, job in workflow["jobs"].items():
        assert "permissions" in job, f"{job_name}: no per-job permissions"
        if "uses" not in job:  # a reusable-workflow call's timeout lives in the callee
            assert "timeout-minutes" in job, f"{job_name}: no timeout"
        for step in job.get("steps", []):
            assert "${{" not in step.get("run", ""), f"{job_name}: ${{{{ }}}} in a run: script; pass it via env:"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False
    text = (WORKFLOWS / name).read_text(encoding="utf-8")
    for uses in _public_uses(workflow):
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", uses), f"not pinned by SHA: {uses}"
        assert re.search(re.escape(uses) + r" # v\d+(\.\d+)*\b", text), f"no version comment: {uses}"


def test_main_runs_are_never_cancelled():
    concurrency = _workflow("default.yml")["concurrency"]
    assert "github.sha" in concurrency["group"], "each main commit needs its own group"
    assert concurrency["cancel-in-progress"] == "${{ github.ref != 'refs/heads/main' }}"
    deploy = _workflow("default.yml")["jobs"]["deploy"]["concurrency"]
    assert deploy["cancel-in-progress"] is False
    assert _workflow("promote.yml")["concurrency"]["cancel-in-progress"] is False


# ---------------------------------------------------------------------------------------------
# lock install: the Dockerfile's dependency step, for real
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_image_dependency_step_installs_from_the_lock_slow(tmp_path):
    """Run the Dockerfile's own `pip install` flags against requirements.lock in a fresh venv,
    then import the runtime dependencies (what the image build would do, minus Docker)."""
    (run,) = [args for keyword, args in _dockerfile_instructions() if keyword == "RUN" and "pip install" in args]
    flags = shlex.split(run.split("pip install", 1)[1].split("&&", 1)[0])
    flags = [str(REPO / "requirements.lock") if f.endswith("requirements.lock") else f for f in flags]
    assert "--require-hashes" in flags

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}
    install = subprocess.run([python, "-m", "pip", "install", "-q", *flags],
                             env=env, capture_output=True, text=True, timeout=540)
    assert install.returncode == 0, install.stdout + install.stderr
    imports = subprocess.run([python, "-c", "import slack_sdk, litellm, msgspec, prometheus_client"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert imports.returncode == 0, imports.stderr
    check = subprocess.run([python, "-m", "pip", "check"], env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

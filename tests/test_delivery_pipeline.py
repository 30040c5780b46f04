"""The pipeline's deploy rules, read from the workflows (actionlint, zizmor, the workflow schema and yamllint
run in test_delivery.py; these check what the linters cannot know):

- the image is built on every push and pushed to ECR only from main;
- staging is deployed only while the commit is still main's head, and never from a stale re-run;
- staging and production are deployed by digest (<sha>@sha256:<digest>), and promotion checks that digest;
- the two calls of the company deploy workflow pass the same inputs and secrets, and every input is
  documented in workloads/README.md as known or assumed;
- Renovate keeps actions, both lock files, the base image digest and the git-sync image moving (its config validated
  against Renovate's schema, and its patterns shown to match the real files);
- CODEOWNERS covers .github/ and workloads/.
"""

from __future__ import annotations

import json
import re

import pytest
from test_delivery import REPO, WORKFLOWS, _assert_clean, _run_tool, _workflow

COMPANY_DEPLOY = "wealthsimple/github-workflows/.github/workflows/deploy.yml@v1"
RENOVATE = REPO / ".github" / "renovate.json"
CODEOWNERS = REPO / ".github" / "CODEOWNERS"
WORKLOADS_README = REPO / "workloads" / "README.md"


def _jobs(name: str) -> dict:
    return _workflow(name)["jobs"]


def _step_texts(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("uses", "")) for step in job.get("steps", []))


def _deploy_calls() -> dict[str, dict]:
    calls = {}
    for name in ("default.yml", "promote.yml"):
        for job_name, job in _jobs(name).items():
            if job.get("uses") == COMPANY_DEPLOY:
                calls[f"{name}:{job_name}"] = job
    return calls


# ---------------------------------------------------------------------------------------------
# build on every push, push only on main
# ---------------------------------------------------------------------------------------------


def test_the_image_is_built_on_every_push_without_credentials():
    workflow = _workflow("default.yml")
    assert workflow[True]["push"]["branches"] == ["**"]  # PyYAML reads the key `on` as True
    image = workflow["jobs"]["image"]
    assert "if" not in image, "the branch build must run on every push"
    assert image["permissions"] == {"contents": "read"}, "no OIDC, no registry: nothing can be pushed"
    runs = _step_texts(image)
    assert re.search(r"docker build .*--build-arg GIT_SHA=", runs)
    assert "docker push" not in runs and "ecr" not in runs.lower()
    # Run as Kubernetes runs it: read-only root, uid 10001.
    assert re.search(r"docker run .*--read-only .*--user 10001", runs)


def test_only_main_pushes_to_ecr():
    jobs = _jobs("default.yml")
    pushers = [name for name, job in jobs.items() if "id-token" in job.get("permissions", {})
               and "steps" in job]
    assert pushers == ["publish"]
    assert jobs["publish"]["if"] == "github.ref == 'refs/heads/main'"
    assert set(jobs["publish"]["needs"]) == {"test", "image"}


# ---------------------------------------------------------------------------------------------
# staging: only main's head, never a stale re-run
# ---------------------------------------------------------------------------------------------


def test_staging_deploys_only_the_current_head_of_main():
    jobs = _jobs("default.yml")
    head = jobs["head"]
    script = _step_texts(head)
    assert "git/ref/heads/main" in script and '"$GITHUB_SHA"' in script
    assert 'is-head=true' in script and 'is-head=false' in script
    deploy = jobs["deploy"]
    assert "head" in deploy["needs"]
    condition = " ".join(deploy["if"].split())
    assert "github.ref == 'refs/heads/main'" in condition
    assert "needs.head.outputs.is-head == 'true'" in condition
    # A re-run of only the deploy job reuses the old answer: it must come from this very attempt.
    assert "needs.head.outputs.attempt == format('{0}', github.run_attempt)" in condition
    assert head["outputs"]["attempt"] == "${{ steps.head.outputs.attempt }}"
    assert "GITHUB_RUN_ATTEMPT" in script


def test_staging_deploys_are_serialised_and_never_cancelled():
    deploy = _jobs("default.yml")["deploy"]
    assert deploy["concurrency"] == {"group": "ledger-bot-deploy-staging", "cancel-in-progress": False}


# ---------------------------------------------------------------------------------------------
# by digest
# ---------------------------------------------------------------------------------------------


def test_staging_is_deployed_by_the_digest_main_pushed():
    jobs = _jobs("default.yml")
    publish = jobs["publish"]
    assert publish["outputs"]["digest"] == "${{ steps.digest.outputs.digest }}"
    (step,) = [s for s in publish["steps"] if s.get("id") == "digest"]
    assert "describe-images" in step["run"] and "imageTag=$GITHUB_SHA" in step["run"]
    assert "^sha256:[0-9a-f]{64}$" in step["run"], "an empty or odd digest must fail the job"
    assert jobs["deploy"]["with"]["image_tag"] == "${{ github.sha }}@${{ needs.publish.outputs.digest }}"


def test_promotion_takes_the_exact_digest_staging_ran_and_checks_it_in_ecr():
    promote = _workflow("promote.yml")
    steps = promote["jobs"]["verify"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "^[0-9a-f]{40}@sha256:[0-9a-f]{64}$" in runs, "input must be <sha>@sha256:<digest>"
    assert 'merge-base --is-ancestor "$commit" origin/main' in runs
    assert "describe-images" in runs and '"$stored" != "$digest"' in runs
    assert "imageTagMutability" in runs and "IMMUTABLE" in runs
    assert promote["jobs"]["deploy"]["with"]["image_tag"] == "${{ inputs.image_tag }}"
    assert promote["jobs"]["verify"]["environment"] == "production"


# ---------------------------------------------------------------------------------------------
# the company deploy workflow: consistent calls, documented inputs
# ---------------------------------------------------------------------------------------------


def test_both_deploy_calls_pass_the_same_inputs_and_secrets():
    calls = _deploy_calls()
    assert sorted(calls) == ["default.yml:deploy", "promote.yml:deploy"]
    staging, production = calls["default.yml:deploy"], calls["promote.yml:deploy"]
    assert set(staging["with"]) == set(production["with"]) == {"deploy_kubernetes", "environment", "image_tag"}
    assert staging["with"]["environment"] == "staging" and production["with"]["environment"] == "production"
    assert staging["with"]["deploy_kubernetes"] is True and production["with"]["deploy_kubernetes"] is True
    assert staging["secrets"] == production["secrets"] == "inherit"
    assert staging["permissions"] == production["permissions"]


def test_every_input_of_the_company_workflow_is_documented_as_known_or_assumed():
    readme = WORKLOADS_README.read_text(encoding="utf-8")
    section = readme.split("## Company deploy workflow", 1)
    assert len(section) == 2, "workloads/README.md needs a 'Company deploy workflow' section"
    rows = {}
    for line in section[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].lower()
    used = set()
    for call in _deploy_calls().values():
        used |= set(call["with"]) | {"secrets"}
    assert used <= set(rows), f"undocumented inputs: {sorted(used - set(rows))}"
    for name, status in rows.items():
        assert status in {"known", "assumed"}, f"{name}: status must be known or assumed, not {status!r}"


# ---------------------------------------------------------------------------------------------
# Renovate, CODEOWNERS
# ---------------------------------------------------------------------------------------------


def test_renovate_config_matches_renovates_schema():
    _assert_clean(_run_tool("check-jsonschema", "--builtin-schema", "vendor.renovate", str(RENOVATE)))


def _renovate_patterns(config: dict, manager: str) -> list[re.Pattern]:
    patterns = config[manager]["managerFilePatterns"]
    return [re.compile(p.strip("/")) for p in patterns]


def test_renovate_covers_actions_lock_files_and_the_base_image_digest():
    config = json.loads(RENOVATE.read_text(encoding="utf-8"))
    assert set(config["enabledManagers"]) >= {"github-actions", "pip_requirements", "custom.regex"}
    for workflow in WORKFLOWS.glob("*.yml"):
        path = str(workflow.relative_to(REPO))
        assert any(p.search(path) for p in _renovate_patterns(config, "github-actions")), path
    for lock in ("requirements.lock", "requirements-dev.lock"):
        assert (REPO / lock).exists()
        assert any(p.search(lock) for p in _renovate_patterns(config, "pip_requirements")), lock
    docker, git_sync = config["customManagers"]
    assert docker["datasourceTemplate"] == git_sync["datasourceTemplate"] == "docker"
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    # Renovate's regex syntax (?<name>...) is Python's (?P<name>...).
    (pattern,) = [re.compile(s.replace("(?<", "(?P<")) for s in docker["matchStrings"]]
    match = pattern.search(dockerfile)
    assert match, "Renovate's regex does not find the base image in the Dockerfile"
    assert match["depName"] == "python" and match["currentValue"] == "3.12-slim"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", match["currentDigest"])
    # The git-sync sidecar's image, in every values file that runs it.
    (pattern,) = [re.compile(s.replace("(?<", "(?P<")) for s in git_sync["matchStrings"]]
    files = [re.compile(p.strip("/")) for p in git_sync["managerFilePatterns"]]
    for values in sorted((REPO / "workloads" / "ledger-bot").glob("values.*.yaml")):
        assert any(f.search(str(values.relative_to(REPO))) for f in files), values.name
        match = pattern.search(values.read_text(encoding="utf-8"))
        assert match and match["currentValue"].startswith("v4."), values.name
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", match["currentDigest"])


def test_codeowners_cover_the_pipeline_and_the_workload():
    owners = {}
    for line in CODEOWNERS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            path, *teams = line.split()
            owners[path] = teams
    for path in ("/.github/", "/workloads/"):
        assert owners.get(path), f"CODEOWNERS has no owner for {path}"
        assert all(re.fullmatch(r"@[\w-]+/[\w-]+", team) for team in owners[path]), owners[path]


@pytest.mark.parametrize("name", ["default.yml", "promote.yml"])
def test_company_deploy_call_keeps_the_zizmor_exception_narrow(name):
    """`secrets: inherit` is the one zizmor finding we accept, on that line only, for the company workflow."""
    text = (WORKFLOWS / name).read_text(encoding="utf-8")
    ignores = re.findall(r"^(.*)# zizmor: ignore\[([\w-]+)\]", text, flags=re.M)
    assert ignores == [("    secrets: inherit ", "secrets-inherit")]

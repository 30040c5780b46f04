#!/usr/bin/env bash
# Regenerates requirements-proxy.lock from requirements-proxy.in (needs uv: pip install uv).
# The proxy lock installs on top of requirements-dev.lock, so it is compiled with the dev lock's
# versions as constraints and leaves out every package the dev lock already pins (one pin per
# package across the two files: pip refuses the same package twice under --require-hashes).
#   usage: tests/proxy/lock.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -oE '^[A-Za-z0-9._-]+==[^ ]+' requirements-dev.lock > "$constraints"
no_emit=()
while IFS== read -r name _; do no_emit+=(--no-emit-package "$name"); done < "$constraints"
uv pip compile --universal --generate-hashes --python-version 3.11 --no-header --quiet \
    -c "$constraints" "${no_emit[@]}" requirements-proxy.in -o requirements-proxy.lock

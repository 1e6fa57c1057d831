#!/usr/bin/env bash
# Install TenSafe into .venv and run the main job: the local stack (`tensafe up`) and
# the demo against it, then stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
# uv, not pip, installs the ~100 packages: it downloads, unpacks and compiles to
# bytecode in parallel where pip does one thing at a time (bench/install.py compares
# the two). Compiled now, not at first import: with PYTHONDONTWRITEBYTECODE set every
# process of `tensafe up` would compile torch again. pip finds this machine's local
# wheels (the CPU torch build) through its configuration ($PIP_FIND_LINKS or pip.conf's
# find-links); uv is given the same folder.
python -m pip install -q --disable-pip-version-check uv==0.13.8 2>&1 | { grep -v "is ignored: it is neither" || true; }
find_links="${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}"
uv pip install -q --compile-bytecode ${find_links:+--find-links "$find_links"} ".[all]"
(cd clients/node && npm ci --no-audit --no-fund --loglevel=error)

data_dir="${TENSAFE_DEMO_DATA_DIR:-.tensafe}"
tensafe up --data-dir "$data_dir" &
up_pid=$!
trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  [ -f "$data_dir/connection.json" ] && break
  kill -0 $up_pid 2>/dev/null || { echo "tensafe up failed" >&2; exit 1; }
  sleep 0.2
done
export TENSAFE_CONNECTION_FILE="$data_dir/connection.json"

echo "== health, from Python =="
tensafe status
echo "== health, from the Node client =="
node clients/node/bin/health.mjs

echo "== the demo: DP fine-tuning -> signed, encrypted TGSP -> HE-LoRA on encrypted activations =="
# Uses the built-in pretrained tiny-llama that `tensafe up` installed, creates a tenant
# and trains as its trainer (not the admin) through the SDK at a stated ε, publishes with
# save_adapter, verifies the package with `tensafe registry verify`, prints base and
# adapted answers side by side, then the HE-LoRA answer, the DP certificate, and draws
# $data_dir/demo/run.png. Exit code 1 if the adapter changed nothing or HE-LoRA differs.
tensafe demo --json "$data_dir/demo-summary.json"

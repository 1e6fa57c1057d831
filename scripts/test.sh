#!/usr/bin/env bash
# Install TenSafe with its dev tools into .venv (a real, non-editable install) and run
# every check: generated code fresh, buf lint, ruff, mypy --strict, then pytest.
# Needs: python3.11, node + npm, PostgreSQL at 127.0.0.1:5432 (tests create and drop
# their own database). NATS servers are started by the tests themselves; SoftHSM2 (the
# PKCS#11 token the KEK-provider tests use, each test with its own token folder) is
# installed here when missing (Debian package softhsm2; CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v softhsm2-util >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "SoftHSM2 is missing: run 'apt-get install softhsm2' as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends softhsm2 >/dev/null
fi
# Chromium and its WebDriver from Debian drive tests/console's browser tests (no browser
# is downloaded at install).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "Chromium is missing: run 'apt-get install chromium chromium-driver' as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
(cd clients/node && npm ci --no-audit --no-fund --loglevel=error)

python scripts/gen_protos.py --check
python scripts/gen_node.py --check
python scripts/gen_tinker_wire.py --check
(cd protos && buf lint)
ruff check .
python scripts/typecheck.py

# Tests import the installed wheel, not the source folders.
python -m pytest -ra "$@"

# The fuzz suite once more against a stack on PostgreSQL (NUL and other control
# characters must get INVALID_ARGUMENT there too, never INTERNAL), at fewer examples.
if [ "$#" -eq 0 ]; then
  TENSAFE_FUZZ_DATABASE=postgresql TENSAFE_FUZZ_EXAMPLES=3 \
    python -m pytest -ra -q -p no:cacheprovider tests/fuzz/test_fuzz_rpcs.py
  # The Node client's own tests (node:test; `npm ci` above built it): against a
  # `tensafe up` they start from this venv, and as a dependency of another package.
  (cd clients/node && npm test)
fi

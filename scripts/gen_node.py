"""Regenerate the Node stubs for protos/ into clients/node/gen with ``buf generate``.

``protos/buf.gen.yaml`` runs ``protoc-gen-es`` (pinned in clients/node/package.json, so
``npm ci`` in clients/node must have run); its output is JavaScript with ``.d.ts``
types, committed like the Python code so a user of the Node client needs no toolchain.

Usage:
    python scripts/gen_node.py          # rewrite clients/node/gen
    python scripts/gen_node.py --check  # exit 1 if clients/node/gen is stale
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
NODE = ROOT / "clients" / "node"
OUT = NODE / "gen"


def _generate(into_root: Path) -> Path:
    """Run buf in a copy of protos/ under ``into_root``; return the generated folder.

    buf.gen.yaml reads ``.`` and ``../clients/node/proto`` and writes to
    ``../clients/node/gen`` relative to protos/, so generating in ``into_root/protos``
    puts the output at ``into_root/clients/node/gen``.
    """
    plugin_dir = NODE / "node_modules" / ".bin"
    if not (plugin_dir / "protoc-gen-es").exists():
        sys.exit("protoc-gen-es is missing: run `npm ci` in clients/node first")
    buf = shutil.which("buf")
    if buf is None:
        sys.exit("buf is missing: install the dev extra (buf-bin)")
    shutil.copytree(PROTOS, into_root / "protos")
    # buf.gen.yaml's second input: grpc.health.v1, kept beside the Node client.
    shutil.copytree(NODE / "proto", into_root / "clients" / "node" / "proto")
    env = {**os.environ, "PATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([buf, "generate"], cwd=into_root / "protos", env=env, check=True)
    return into_root / "clients" / "node" / "gen"


def _differences(generated: Path, committed: Path, prefix: str = "") -> list[str]:
    """Paths (relative to clients/node/gen) that are missing, extra or different."""
    compared = filecmp.dircmp(generated, committed)
    names = compared.left_only + compared.right_only + compared.diff_files
    found = [f"{prefix}{name}" for name in sorted(names)]
    for sub in compared.common_dirs:
        found += _differences(generated / sub, committed / sub, f"{prefix}{sub}/")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the output is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        generated = _generate(Path(scratch))
        if args.check:
            if not OUT.exists():
                print(f"{OUT} is missing: run python scripts/gen_node.py", file=sys.stderr)
                return 1
            stale = _differences(generated, OUT)
            if stale:
                print("stale Node stubs (run python scripts/gen_node.py):", file=sys.stderr)
                for path in stale:
                    print(f"  clients/node/gen/{path}", file=sys.stderr)
                return 1
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(generated, OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

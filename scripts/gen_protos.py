"""Regenerate the Python code for protos/ into libs/proto (package ``tensafe.proto``).

protoc names generated modules after the proto packages (``tensafe.auth.v1``), which
would collide with the service packages of the same name; so the code is generated
into a scratch folder and moved under ``tensafe.proto`` with its imports rewritten
(``tensafe.auth.v1`` -> ``tensafe.proto.auth.v1``). The descriptors keep their proto
names, so reflection and other languages see the real contract.

Usage:
    python scripts/gen_protos.py          # rewrite libs/proto
    python scripts/gen_protos.py --check  # exit 1 if libs/proto is stale
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "proto"
_IMPORT = re.compile(r"\b(from|import) tensafe\.(\w+)\.v1\b")
_DOTTED = re.compile(r"\btensafe\.(common|auth|trainer|he|registry)\.v1\.(\w+_pb2)\b")
HEADER = '"""Generated from protos/ by scripts/gen_protos.py. Do not edit."""\n'


def _generate(into: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    raw = into / "raw"
    raw.mkdir()
    # The mypy plugins are console scripts installed beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={raw}",
        f"--mypy_out={raw}",
        f"--grpc_python_out={raw}",
        f"--mypy_grpc_out={raw}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = into / "proto"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(HEADER)
    (pkg / "py.typed").write_text("")
    for src in sorted((raw / "tensafe").rglob("*")):
        rel = src.relative_to(raw / "tensafe")
        dst = pkg / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            (dst / "__init__.py").write_text(HEADER)
            continue
        text = src.read_text()
        text = _IMPORT.sub(lambda m: f"{m.group(1)} tensafe.proto.{m.group(2)}.v1", text)
        text = _DOTTED.sub(lambda m: f"tensafe.proto.{m.group(1)}.v1.{m.group(2)}", text)
        dst.write_text(text)


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if libs/proto is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        _generate(Path(tmp))
        fresh = Path(tmp) / "proto"
        if check:
            if not OUT.exists() or not _same_tree(fresh, OUT):
                print("libs/proto is stale: run python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("libs/proto is up to date")
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(fresh, OUT, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"generated {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

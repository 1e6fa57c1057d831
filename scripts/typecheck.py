"""Run ``mypy --strict`` on libs/, services/ and clients/python under their import names.

The import packages live in folders that do not spell their names (``libs/common`` is
``tensafe.common``), so mypy is given a link tree ``.typecheck/tensafe/<name>`` that
mirrors the mapping in pyproject.toml. Generated code (``tensafe.proto``) is read
through its ``.pyi`` stubs but not itself reported on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".typecheck"


def main() -> int:
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    (TREE / "tensafe").mkdir(parents=True)
    packages = []
    for package, folder in mapping.items():
        name = package.split(".", 1)[1]
        (TREE / "tensafe" / name).symlink_to(ROOT / folder, target_is_directory=True)
        if package != "tensafe.proto":
            packages += ["-p", package]
    env = {**os.environ, "MYPYPATH": str(TREE)}
    cmd = [sys.executable, "-m", "mypy", *packages, *sys.argv[1:]]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())

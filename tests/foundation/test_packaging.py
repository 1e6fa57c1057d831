"""The wheel ships every package (the seeds' PKG-01) and nothing imports across the
boundaries DESIGN.md §2 draws."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _mapping() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return mapping


def _source_packages() -> set[str]:
    found = set()
    for package, folder in _mapping().items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    return found


@pytest.mark.slow
def test_wheel_contains_every_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tensafe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert _source_packages() <= shipped
    assert "tensafe/proto/auth/v1/auth_service_pb2.pyi" in names
    assert not any(n.startswith("tests/") for n in names)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


SERVICES = ("auth", "trainer", "he_runtime", "registry")


def test_import_boundaries() -> None:
    mapping = _mapping()
    for package, folder in mapping.items():
        name = package.split(".")[1]
        for path in (ROOT / folder).rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] != "tensafe" or len(parts) < 2:
                    continue
                target = parts[1]
                if name in ("common", "tgsp", "helora", "proto"):
                    assert target in ("common", "tgsp", "helora", "proto"), (path, module)
                elif name in SERVICES:
                    assert target == name or target not in (*SERVICES, "client", "tinker"), (
                        path,
                        module,
                    )
                else:  # clients
                    assert target not in SERVICES, (path, module)

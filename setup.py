"""Package discovery for the ``tensafe`` namespace.

pyproject.toml maps each ``tensafe.<name>`` import package to its folder
(``libs/common`` -> ``tensafe.common``, ``services/auth`` -> ``tensafe.auth``, ...).
setuptools cannot discover sub-packages under such a mapping by itself, so this file
walks every mapped folder and lists each directory that holds an ``__init__.py``.
Without it a sub-package would silently be left out of the wheel (the seeds' PKG-01).
"""

from __future__ import annotations

import os
import tomllib

from setuptools import setup

with open("pyproject.toml", "rb") as f:
    PACKAGE_DIR: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def _packages() -> list[str]:
    found: list[str] = []
    for package, folder in PACKAGE_DIR.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            if "__init__.py" in files:
                rel = os.path.relpath(root, folder)
                found.append(package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}")
    return sorted(found)


setup(packages=_packages(), package_dir=PACKAGE_DIR)

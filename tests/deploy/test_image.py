"""The container image recipe (deploy/docker/Dockerfile), checked by parsing it: there is
no container engine here, so the test holds the recipe to what the image must be — a
wheel built with `pip wheel` and installed without `-e`, the pinned CPU torch (or the CUDA
build with `--build-arg TORCH_VARIANT=cu128`), a
non-root user, one entry point per process — and runs the migration script it ships.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
MIGRATE = ROOT / "deploy" / "docker" / "migrate.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "a continued line runs off the end"
    pairs = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for keyword, rest in instructions():
        if keyword == "FROM":
            name = rest.split()[-1] if " AS " in rest.upper() else rest
            found[name] = []
        elif name:
            found[name].append((keyword, rest))
    return found


def pip_commands(stage: list[tuple[str, str]]) -> list[list[str]]:
    commands = []
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for part in rest.split("&&"):
            if not re.search(r"\bpip\b", part):
                continue
            words = shlex.split(part)
            while words and words[0].startswith("--mount"):
                words = words[1:]
            if words[:1] == ["pip"] or words[:3] == ["python", "-m", "pip"]:
                commands.append(words[words.index("pip") + 1 :] if "pip" in words else words)
    return commands


def test_the_package_is_built_as_a_wheel_and_installed_from_it() -> None:
    built = stages()
    assert set(built) == {"wheels", "runtime"}
    wheel_commands = [c for c in pip_commands(built["wheels"]) if c[0] == "wheel"]
    assert any(any(arg.startswith(".[") for arg in c) for c in wheel_commands), (
        "the project itself must be built with `pip wheel`"
    )
    installs = [c for c in pip_commands(built["runtime"]) if c[0] == "install"]
    assert len(installs) == 1
    (install,) = installs
    assert "--no-index" in install, "the runtime installs only the wheels built above"
    version = PYPROJECT["project"]["version"]
    assert f"tensafe[trainer,he,tinker-api,console]=={version}" in install
    assert not [
        c
        for c in built["runtime"]
        if c[0] == "COPY" and c[1].split()[0] in {"libs", "services", "clients", "."}
    ], "no source tree in the runtime image"


def test_nothing_is_installed_editable() -> None:
    for stage in stages().values():
        for command in pip_commands(stage):
            assert "-e" not in command and "--editable" not in command, command
            assert not any(arg.startswith("--editable=") for arg in command), command
    assert not re.search(
        r"(^|\s)(-e|--editable)(\s|=)", DOCKERFILE.read_text().replace("# ", "")
    ), "an editable install is mentioned outside a comment"


def build_args() -> dict[str, str]:
    """The global ARG defaults (declared before the first FROM)."""
    found: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def torch_wheels(**overrides: str) -> tuple[set[str], set[str]]:
    """(torch requirement specs, pip index URLs) of the recipe built with ``overrides``
    as ``--build-arg``s, ARG references substituted the way the builder does."""
    args = {**build_args(), **overrides}
    text = " ".join(rest for _, rest in instructions())
    text = re.sub(r"\$\{(\w+)\}", lambda match: args.get(match.group(1), match.group(0)), text)
    assert "${TORCH_" not in text, "every torch ARG has a default"
    specs = set(re.findall(r'"(torch==[^"]+)"', text))
    indexes = set(re.findall(r'--index-url "?(\S+?)"?(?:\s|$)', text))
    return specs, indexes


def test_torch_is_the_pinned_cpu_build_by_default() -> None:
    pinned = [
        d
        for d in PYPROJECT["project"]["optional-dependencies"]["trainer"]
        if d.startswith("torch==")
    ]
    assert pinned == ["torch==2.13.0"]
    assert build_args()["TORCH_VERSION"] == pinned[0].removeprefix("torch==")
    specs, indexes = torch_wheels()
    assert specs == {f"{pinned[0]}+cpu"}, "the wheel stage and the runtime install agree"
    assert indexes == {"https://download.pytorch.org/whl/cpu"}


def test_the_cuda_variant_names_a_cuda_torch_wheel() -> None:
    assert build_args()["TORCH_VARIANT"] == "cpu"
    specs, indexes = torch_wheels(TORCH_VARIANT="cu128")
    assert specs == {"torch==2.13.0+cu128"}
    assert indexes == {"https://download.pytorch.org/whl/cu128"}
    # Both stages see the variant: an ARG not re-declared after FROM is empty there.
    for name, stage in stages().items():
        declared = {rest for keyword, rest in stage if keyword == "ARG"}
        assert {"TORCH_VERSION", "TORCH_VARIANT"} <= declared, name
    # The build refuses a variant that is not a wheel index of PyTorch's, by running the
    # recipe's own guard (the shell `case` before `pip wheel`).
    (guard,) = [
        rest.split("&&")[0]
        for keyword, rest in stages()["wheels"]
        if keyword == "RUN" and "TORCH_VARIANT" in rest and "case" in rest
    ]
    for variant, code in (("cpu", 0), ("cu126", 0), ("cu128", 0), ("rocm6.2", 2), ("", 2)):
        result = subprocess.run(
            ["sh", "-c", guard],
            env={"TORCH_VARIANT": variant},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == code, (variant, result.stderr)


def test_runs_as_a_non_root_user_with_writable_state_only_in_volumes() -> None:
    runtime = stages()["runtime"]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == ["10001:10001"], "numeric non-root user (runAsNonRoot can verify it)"
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "TENSAFE_DATA_DIR=/var/lib/tensafe" in env
    assert "HOME=/tmp" in env
    volumes = [rest for keyword, rest in runtime if keyword == "VOLUME"]
    assert volumes == ['["/var/lib/tensafe"]']
    assert any("compileall" in rest for keyword, rest in runtime if keyword == "RUN"), (
        "bytecode is compiled at build time, so a read-only root never needs a write"
    )
    user_index = runtime.index(("USER", "10001:10001"))
    assert all(keyword != "RUN" for keyword, _ in runtime[user_index:])


def test_one_entry_point_per_process_and_each_module_exists() -> None:
    runtime = stages()["runtime"]
    (entrypoint,) = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == '["python", "-m"]'
    header = DOCKERFILE.read_text()
    modules = set(re.findall(r"\btensafe\.[a-z_.]+[a-z]", header.split("ARG ")[0]))
    assert modules == {
        "tensafe.auth",
        "tensafe.trainer",
        "tensafe.registry",
        "tensafe.he_runtime",
        "tensafe.trainer.worker",
        "tensafe.tinker_api",
        "tensafe.console",
    }
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        if module != "tensafe.trainer.worker":
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module
    assert ("COPY", "deploy/docker/migrate.py /opt/tensafe/migrate.py") in runtime


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "clients/node/node_modules", "**/__pycache__"} <= set(ignored)


def _migrate(database_url: str, *services: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MIGRATE), *services],
        env={**os.environ, "TENSAFE_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_migration_script_upgrades_each_service_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    first = _migrate(url, "auth", "registry", "trainer")
    assert first.returncode == 0, first.stderr
    again = _migrate(url, "trainer")
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(tmp_path / "state.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
        versions = {
            table: db.execute(f"select version_num from {table}").fetchall()
            for table in (
                "alembic_version_auth",
                "alembic_version_registry",
                "alembic_version_trainer",
            )
        }
    assert all(len(rows) == 1 for rows in versions.values()), versions
    trainer_revision = versions["alembic_version_trainer"][0][0]
    assert f"trainer at revision {trainer_revision}" in again.stdout
    assert "trainer_jobs" in tables


@pytest.mark.parametrize(
    ("args", "env_url", "code"),
    [(["trainer"], "", 2), (["no_such_service"], "sqlite+aiosqlite:///x.db", 2)],
)
def test_the_migration_script_refuses_bad_input(
    tmp_path: Path, args: list[str], env_url: str, code: int
) -> None:
    result = _migrate(env_url, *args)
    assert result.returncode == code
    assert result.stderr.strip()

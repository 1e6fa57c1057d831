"""The trainer keeps the house shape (STYLE.md, "One shape per service"): its domain
imports no protobuf, gRPC or SQL, and only its store speaks SQL.

The checks read the source's import statements (``ast``), so a lazy import inside a
function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[2] / "services" / "trainer"

DOMAIN_FORBIDDEN = (
    "google.protobuf",
    "grpc",
    "sqlalchemy",
    "tensafe.proto",
    "tensafe.trainer.serde",
    "tensafe.trainer.servicer",
)
"""What the domain may not import: wire types, SQL and the layers above it."""

SQL = ("sqlalchemy",)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(
    paths: list[Path], forbidden: tuple[str, ...], *, root: Path = TRAINER
) -> list[str]:
    found = []
    for path in paths:
        for name in sorted(_imports(path)):
            if any(name == bad or name.startswith(f"{bad}.") for bad in forbidden):
                found.append(f"{path.relative_to(root)} imports {name}")
    return found


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_trainer_has_the_house_shape() -> None:
    for part in ("server.py", "servicer.py", "serde.py", "domain", "store/sql.py"):
        assert (TRAINER / part).exists(), part
    for folder in ("domain", "domain/engine", "domain/datasets", "domain/audit", "store"):
        # setup.py packages only folders with an __init__.py.
        assert (TRAINER / folder / "__init__.py").is_file(), folder


def test_the_domain_imports_no_protobuf_grpc_or_sql() -> None:
    modules = _modules(TRAINER / "domain")
    assert len(modules) > 20  # the engine, the datasets, the audit and the rest
    assert _violations(modules, DOMAIN_FORBIDDEN) == []


def test_only_the_store_speaks_sql() -> None:
    store = TRAINER / "store"
    outside = [p for p in _modules(TRAINER) if store not in p.parents]
    assert _violations(outside, SQL) == []
    # And the store does: the check looks at the right thing.
    assert _violations([store / "sql.py"], SQL) != []


@pytest.mark.parametrize(
    ("source", "forbidden", "caught"),
    [
        ("import grpc\n", DOMAIN_FORBIDDEN, True),
        ("from google.protobuf.message import Message\n", DOMAIN_FORBIDDEN, True),
        ("from tensafe.proto.trainer.v1 import trainer_service_pb2\n", DOMAIN_FORBIDDEN, True),
        ("from tensafe.trainer import serde\n", DOMAIN_FORBIDDEN, True),
        ("def f():\n    import sqlalchemy as sa\n", SQL, True),
        ("from sqlalchemy.ext.asyncio import AsyncSession\n", SQL, True),
        ("from tensafe.trainer.domain.model import ClientRecord\n", DOMAIN_FORBIDDEN, False),
        ("import grpclike\n", DOMAIN_FORBIDDEN, False),
    ],
)
def test_the_check_catches_a_wrong_layout(
    tmp_path: Path, source: str, forbidden: tuple[str, ...], caught: bool
) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert bool(_violations([probe], forbidden, root=tmp_path)) is caught

"""Which optional extra of the ``tensafe`` distribution provides which import.

``pip install tensafe`` is the slim install: the SDK (``tensafe.tinker``,
``tensafe.client``) and the CLI's status, admin, registry and audit commands. Heavy
stacks live in extras (``pyproject.toml``) and are imported only by the code that needs
them, inside the function that needs them. When one is missing, :func:`missing_extra`
turns the ``ModuleNotFoundError`` into one line naming the extra to install, e.g.
``tensafe demo needs the [trainer] extra: pip install 'tensafe[trainer]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

from tensafe.common.errors import FailedPrecondition

EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "trainer",
    "transformers": "trainer",
    "peft": "trainer",
    "opacus": "trainer",
    "dp_accounting": "trainer",
    "tokenizers": "trainer",
    "seal": "he",
    "matplotlib": "plot",
}
"""Top-level module name → the extra that installs it."""


class MissingExtra(FailedPrecondition):
    """An optional dependency is not installed; the message names the extra."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__(
            f"{what} needs the [{extra}] extra (no module named {module!r}): "
            f"pip install 'tensafe[{extra}]'",
            reason="EXTRA_NOT_INSTALLED",
        )
        self.extra = extra
        self.module = module


def missing_extra(error: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The :class:`MissingExtra` that explains ``error``, or ``None`` if no extra does.

    Args:
        error: The failed import.
        what: Who needed it, for the message (``"tensafe demo"``,
            ``"TrainingClient.get_tokenizer()"``).
    """
    top = (error.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    return MissingExtra(what, extra, top) if extra else None


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming the extra to install.

    Raises:
        MissingExtra: The module (or one it imports) belongs to an extra that is not
            installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        explained = missing_extra(error, what)
        if explained is None:
            raise
        raise explained from None


def require_installed(modules: Iterable[str], what: str) -> None:
    """Check that modules are installed, without importing them (fast).

    For a command that starts other processes which import them (``tensafe up``): it
    names the missing extra before anything starts.

    Raises:
        MissingExtra: The first missing module's extra.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(what, EXTRA_OF_MODULE[module], module)

"""A fresh SoftHSM2 token per test: the real PKCS#11 module, its own token directory.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the module is initialised (``C_Initialize``), so
the fixture writes a configuration whose ``directories.tokendir`` is the test's temporary
folder, points ``SOFTHSM2_CONF`` at it, initialises one token with ``softhsm2-util``
and re-initialises the module if an earlier test of the process loaded it. No two tests
share a token or its objects. ``scripts/test.sh`` installs the Debian package
``softhsm2``; without it these tests fail (they are never skipped).
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import subprocess
from pathlib import Path

import pkcs11
import pytest

MODULE_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)


@dataclasses.dataclass(frozen=True)
class SoftHsmToken:
    """One initialised token.

    Attributes:
        module: The PKCS#11 module.
        label: The token's label.
        pin: Its user PIN.
        conf: The SOFTHSM2_CONF file naming its directory.
    """

    module: Path
    label: str
    pin: str
    conf: Path

    def env(self) -> dict[str, str]:
        """Settings of a service using this token (the TENSAFE_KEK_* variables)."""
        return {
            "SOFTHSM2_CONF": str(self.conf),
            "TENSAFE_KEK_PROVIDER": "pkcs11",
            "TENSAFE_KEK_PKCS11_MODULE": str(self.module),
            "TENSAFE_KEK_PKCS11_TOKEN_LABEL": self.label,
            "TENSAFE_KEK_PKCS11_PIN": self.pin,
        }

    def settings(self) -> dict[str, object]:
        """The same settings as config dataclass keyword arguments."""
        return {
            "kek_provider": "pkcs11",
            "kek_pkcs11_module": self.module,
            "kek_pkcs11_token_label": self.label,
            "kek_pkcs11_pin": self.pin,
        }


def softhsm_module() -> Path:
    """The installed SoftHSM2 module; fails the test (never skips) when it is missing."""
    for candidate in MODULE_CANDIDATES:
        if candidate.is_file():
            return candidate
    pytest.fail("SoftHSM2 is not installed (apt-get install softhsm2; scripts/test.sh does)")


def new_token(
    directory: Path, monkeypatch: pytest.MonkeyPatch, label: str = "tensafe"
) -> SoftHsmToken:
    """Initialise a token in ``directory`` and point this process's SoftHSM2 at it."""
    module = softhsm_module()
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.fail("softhsm2-util is not installed (apt-get install softhsm2)")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    pin = secrets.token_hex(8)
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            secrets.token_hex(8),
            "--pin",
            pin,
        ],
        check=True,
        capture_output=True,
        env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"},
    )
    library = pkcs11.lib(str(module))  # initialises on first load, with this conf
    library.reinitialize()  # a module an earlier test loaded still reads the old conf
    return SoftHsmToken(module=module, label=label, pin=pin, conf=conf)

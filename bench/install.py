"""Set-up time of ``scripts/demo.sh``: ``pip install '.[all]'`` against ``uv pip install``.

Each round, in an order that alternates per round, installs the project from a fresh
``git clone`` of this checkout's HEAD into a new virtualenv, with nothing cached:

* pip  ``python -m pip install '.[all]'``  (what demo.sh ran before; the baseline)
* uv   ``python -m pip install uv`` into the venv, then ``uv pip install
       --compile-bytecode --find-links $PIP_FIND_LINKS '.[all]'`` (what demo.sh runs
       now; the find-links folder is where this machine keeps the CPU torch wheel,
       which pip finds through its configuration and uv only when told)

and reports the medians of wall time and of the CPU time of the install processes,
with uv's ratio to pip. Where pip's time goes: resolving and downloading one package
at a time, a single-threaded unpack, and the bytecode compilation of every installed
module (torch, transformers, ...), about 40% of its CPU time. uv downloads and unpacks
in parallel and compiles on every core. It compiles here too (``--compile-bytecode``;
uv's default is not to) because with PYTHONDONTWRITEBYTECODE set, as on these
machines, uncompiled modules are compiled again by every process that imports them:
each service of ``tensafe up`` would pay for torch.

Run: ``python bench/install.py [--rounds 2]``. Needs the network (PyPI) like a fresh
clone's first command; on shared cores the wall times vary with the load, the ratio
less so.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UV = "uv==0.13.8"


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _commands(variant: str, venv: Path, cache: Path) -> list[list[str]]:
    python = str(venv / "bin" / "python")
    quiet = ["-q", "--disable-pip-version-check", "--no-cache-dir"]
    if variant == "pip":
        return [[python, "-m", "pip", "install", *quiet, ".[all]"]]
    find_links = os.environ.get("PIP_FIND_LINKS", "")
    links = ["--find-links", find_links] if find_links else []
    return [
        [python, "-m", "pip", "install", *quiet, UV],
        [str(venv / "bin" / "uv"), "pip", "install", "-q", "--compile-bytecode",
         "--cache-dir", str(cache), "--python", python, *links, ".[all]"],
    ]


def _install(variant: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="tensafe-install-") as scratch:
        clone, venv, cache = Path(scratch) / "clone", Path(scratch) / "venv", Path(scratch) / "uv"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        cpu, start = _cpu_of_children(), time.monotonic()
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        for command in _commands(variant, venv, cache):
            subprocess.run(command, cwd=clone, check=True)
        return time.monotonic() - start, _cpu_of_children() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = ["pip", "uv"]
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            wall, cpu = _install(variant)
            results[variant].append((wall, cpu))
            load = os.getloadavg()[0]
            print(f"round {round_ + 1} {variant:3s}: {wall:6.1f} s wall, {cpu:6.1f} s CPU "
                  f"(load {load:.1f})", flush=True)
    walls = {v: statistics.median(w for w, _ in results[v]) for v in variants}
    cpus = {v: statistics.median(c for _, c in results[v]) for v in variants}
    for v in variants:
        print(f"median {v:3s}: {walls[v]:6.1f} s wall, {cpus[v]:6.1f} s CPU")
    print(f"uv / pip: wall {walls['uv'] / walls['pip']:.2f}x, CPU {cpus['uv'] / cpus['pip']:.2f}x")


if __name__ == "__main__":
    main()

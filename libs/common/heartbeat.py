"""A liveness heartbeat for processes that serve no gRPC (the trainer workers).

The process touches a file every ``interval`` seconds from its event loop while its
main task runs; a Kubernetes exec probe runs ``python -m tensafe.common.heartbeat
<file> --max-age <seconds>``, which fails when the file is older than that. A worker
whose event loop is wedged (a deadlock, a blocking call on the loop) or whose consumer
task ended stops beating and is restarted; long training steps run in threads
(``asyncio.to_thread``), so they do not stop the beat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def touch(path: Path) -> None:
    """Set the heartbeat file's modification time to now (creating it if needed)."""
    path.touch(exist_ok=True)
    os.utime(path)


async def beating(main: Awaitable[T], path: Path, *, interval: float = 5.0) -> T:
    """Run ``main`` and touch ``path`` every ``interval`` seconds until it ends.

    Args:
        main: The process's main coroutine.
        path: The heartbeat file.
        interval: Seconds between beats.

    Returns:
        What ``main`` returned.
    """
    task = asyncio.ensure_future(main)
    try:
        while not task.done():
            touch(path)
            await asyncio.wait({task}, timeout=interval)
        return task.result()
    finally:
        task.cancel()
        path.unlink(missing_ok=True)


def age_seconds(path: Path) -> float:
    """Seconds since the last beat (``inf`` without a file)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def main(argv: list[str] | None = None) -> int:
    """``python -m tensafe.common.heartbeat FILE --max-age S``: 0 if fresh, 1 if not."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("file", type=Path)
    parser.add_argument("--max-age", type=float, default=60.0)
    args = parser.parse_args(argv)
    age = age_seconds(args.file)
    if age > args.max_age:
        print(f"heartbeat {args.file} is {age:.0f} s old (max {args.max_age:.0f} s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

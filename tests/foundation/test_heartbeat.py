"""The worker's liveness heartbeat (tensafe.common.heartbeat) and its probe command."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tensafe.common.heartbeat import age_seconds, beating, main


async def test_the_file_is_touched_while_the_main_task_runs(tmp_path: Path) -> None:
    beat = tmp_path / "heartbeat"
    release = asyncio.Event()
    seen: list[float] = []

    async def work() -> str:
        await release.wait()
        return "done"

    task = asyncio.create_task(beating(work(), beat, interval=0.05))
    while not beat.exists():
        await asyncio.sleep(0.01)
    os.utime(beat, (time.time() - 100, time.time() - 100))  # as if the loop had stalled
    assert age_seconds(beat) > 99
    while age_seconds(beat) > 1:  # the next beat refreshes it
        await asyncio.sleep(0.01)
    seen.append(age_seconds(beat))
    assert main([str(beat), "--max-age", "30"]) == 0
    release.set()
    assert await task == "done"
    assert not beat.exists()  # a stopped worker leaves no fresh-looking file
    assert seen[0] < 1


def test_the_probe_fails_on_an_old_or_missing_file(tmp_path: Path) -> None:
    beat = tmp_path / "heartbeat"
    assert main([str(beat), "--max-age", "30"]) == 1
    beat.touch()
    os.utime(beat, (time.time() - 60, time.time() - 60))
    assert main([str(beat), "--max-age", "30"]) == 1
    assert main([str(beat), "--max-age", "90"]) == 0

"""The one thread that runs everything on a worker's shared base models.

Steps on a shared base run one at a time anyway (peft's active adapter is global state
of the model, so the worker holds its engine lock around each). Running them always on
the same thread, instead of on whichever thread of asyncio's default executor is free,
changes two things:

- Memory. glibc malloc gives each thread its own arena and keeps what is freed there
  for that arena's next allocations. A forward/backward's activations are freed at its
  end; on the default executor's threads each one kept a pass's worth of freed memory,
  on one thread the next pass reuses it (docs/trainer.md, "The engine's one thread").
- Order. A call whose awaiting task is cancelled keeps running in its thread (Python
  cannot stop a thread); on one thread the next call starts only after it ended, so no
  two calls ever change the shared base at once, whatever was cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")


class EngineThread:
    """A single thread for engine calls, awaited like :func:`asyncio.to_thread`."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn(*args, **kwargs)`` on the engine thread, with the caller's context (as
        :func:`asyncio.to_thread`: tracing spans and other context variables go along).

        Raises:
            RuntimeError: The thread was closed.
        """
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Stop taking calls; a call already running finishes in its thread."""
        self._executor.shutdown(wait=False)

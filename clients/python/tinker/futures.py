"""Futures of the Tinker-compatible SDK: a server-side future seen as ``APIFuture[T]``.

A long call (``forward_backward``, ``optim_step``, ``sample``, ...) is submitted at once
and returns an :class:`APIFuture`; ``.result()`` blocks until the server's
``tensafe.common.v1.Future`` is finished, waiting in deadline-bounded ``WaitFuture``
slices (no client-side sleeps), then converts the ``google.protobuf.Any`` result to the
SDK type. As in Tinker, the future is also awaitable and has ``result_async()``.

A FAILED future raises the server's typed error (``BudgetExhausted``, ``InvalidArgument``
...); a CANCELLED one raises :class:`FutureCancelled`; ``result(timeout=...)`` that runs
out raises ``TimeoutError`` and leaves the future usable.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

from google.protobuf import message as protobuf_message

from tensafe.client.training import TrainerRpc, future_error
from tensafe.common.errors import ErrorCode, TenSafeError
from tensafe.proto.common.v1 import common_pb2

T = TypeVar("T")
R = TypeVar("R")


class FutureCancelled(TenSafeError):
    """The operation was cancelled before it took effect."""

    code = ErrorCode.CANCELLED
    default_reason = "CANCELLED"


class APIFuture(abc.ABC, Generic[T]):
    """The eventual result of a long call (Tinker's ``APIFuture``)."""

    @abc.abstractmethod
    def result(self, timeout: float | None = None) -> T:
        """Block until the result is there.

        Args:
            timeout: Seconds to wait at most; ``None`` waits as long as it takes.

        Returns:
            The result.

        Raises:
            TenSafeError: The operation failed (its typed error) or was cancelled.
            TimeoutError: ``timeout`` passed first; the future stays usable.
        """

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether the result (or error) is known without waiting."""

    async def result_async(self, timeout: float | None = None) -> T:
        """Async :meth:`result`: waits in a worker thread, not on the event loop."""
        return await asyncio.to_thread(self.result, timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


class ServerFuture(APIFuture[T]):
    """A ``tensafe.common.v1.Future`` on the trainer, converted on success.

    Args:
        rpc: The trainer connection.
        future: The future as the submitting call returned it.
        result_type: The message type packed in ``Future.result``.
        convert: Turns that message into the SDK type.
    """

    def __init__(
        self,
        rpc: TrainerRpc,
        future: common_pb2.Future,
        result_type: type[protobuf_message.Message],
        convert: Callable[[Any], T],
    ) -> None:
        self._rpc = rpc
        self._future = future
        self._result_type = result_type
        self._convert = convert
        self._lock = threading.Lock()
        self._outcome: tuple[T] | None = None
        self._error: TenSafeError | None = None

    @property
    def future_id(self) -> str:
        """The server's id of this future."""
        return self._future.id

    @property
    def status(self) -> common_pb2.FutureStatus.ValueType:
        """The last status seen (no call is made)."""
        return self._future.status

    def done(self) -> bool:
        """Whether the last state seen is terminal."""
        return self._future.status in _TERMINAL

    def cancel(self) -> bool:
        """Ask the server to cancel; True if the future is now CANCELLED.

        Not serialised with :meth:`result`, so another thread may cancel while one
        waits; the waiter sees the CANCELLED state on its next wait slice.
        """
        future = self._rpc.cancel_future(self._future.id)
        self._future = future
        return future.status == common_pb2.FUTURE_STATUS_CANCELLED

    def result(self, timeout: float | None = None) -> T:
        """Wait for the server's future and convert its result (see :class:`APIFuture`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._outcome is not None:
                    return self._outcome[0]
                if self._error is not None:
                    raise self._error
                if self._future.status in _TERMINAL:
                    self._settle()
                    continue
                remaining = (
                    self._rpc.options.wait_slice_seconds
                    if deadline is None
                    else deadline - time.monotonic()
                )
                if remaining <= 0:
                    raise TimeoutError(f"future {self._future.id} not finished after {timeout} s")
                self._future = self._rpc.wait_future(self._future.id, remaining)

    def _settle(self) -> None:
        future = self._future
        if future.status == common_pb2.FUTURE_STATUS_SUCCEEDED:
            message = self._result_type()
            if not future.result.Unpack(message):
                self._error = TenSafeError(
                    f"future {future.id} holds {future.result.TypeName()}, expected "
                    f"{message.DESCRIPTOR.full_name}",
                    reason="UNEXPECTED_RESULT_TYPE",
                )
                return
            self._outcome = (self._convert(message),)
        elif future.status == common_pb2.FUTURE_STATUS_FAILED:
            self._error = future_error(future.error)
        else:
            self._error = FutureCancelled(f"future {future.id} ({future.kind}) was cancelled")


_TERMINAL = frozenset(
    {
        common_pb2.FUTURE_STATUS_SUCCEEDED,
        common_pb2.FUTURE_STATUS_FAILED,
        common_pb2.FUTURE_STATUS_CANCELLED,
    }
)


class CombinedFuture(APIFuture[R], Generic[T, R]):
    """Several futures combined into one result (e.g. samples with prompt logprobs).

    Args:
        parts: The futures, waited on in order.
        combine: Builds the result from their results.
    """

    def __init__(self, parts: Sequence[APIFuture[Any]], combine: Callable[[list[Any]], R]) -> None:
        self._parts = list(parts)
        self._combine = combine

    def done(self) -> bool:
        """Whether every part is done."""
        return all(part.done() for part in self._parts)

    def result(self, timeout: float | None = None) -> R:
        """Wait for every part, then combine (the timeout bounds the whole wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for part in self._parts:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(part.result(remaining))
        return self._combine(results)


class ResolvedFuture(APIFuture[T]):
    """A future whose result is already known (a client-side step such as building a
    ``SamplingClient`` from a path)."""

    def __init__(self, value: T) -> None:
        self._value = value

    def done(self) -> bool:
        """Always true."""
        return True

    def result(self, timeout: float | None = None) -> T:
        """The value."""
        return self._value


class MappedFuture(APIFuture[R], Generic[T, R]):
    """Another future's result passed through a function (evaluated once).

    Args:
        inner: The future.
        function: Applied to its result.
    """

    def __init__(self, inner: APIFuture[T], function: Callable[[T], R]) -> None:
        self._inner = inner
        self._function = function
        self._lock = threading.Lock()
        self._value: tuple[R] | None = None

    def done(self) -> bool:
        """Whether the inner future is done."""
        return self._inner.done()

    def result(self, timeout: float | None = None) -> R:
        """The function of the inner result."""
        with self._lock:
            if self._value is None:
                self._value = (self._function(self._inner.result(timeout)),)
            return self._value[0]

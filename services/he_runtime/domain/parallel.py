"""Peer processes that run part of an HE-LoRA evaluation on another core.

seal-python holds the GIL during every SEAL call (measured: two threads rotating
concurrently take 2.08x the time of one), so a second core is only reachable from
another process. A :class:`EvaluationPeers` pool starts ``processes`` long-lived worker
processes. Each executor that is given the pool opens its session in one worker (the
worker parses the same public parameters and Galois keys and encodes the same adapter
plaintexts, so it can do any part of the plan), and then, per request, hands the
worker an independent part of the work (the executor decides which: see
``HeLoraExecutor.apply``) as serialized ciphertexts, does its own part meanwhile and
adds the worker's results in. SEAL's ciphertext serialization without compression
costs ~0.03 ms per 0.26 MiB ciphertext, far below a rotation (~1.3 ms), so the split
can be fine-grained.

The worker reports the operations it performed; the executor adds them to its own,
so the counts of a request are still what really ran and must equal the plan's.

A worker that exits (killed, out of memory) fails the calls that need it with
UNAVAILABLE, naming the worker; the runtime does not silently evaluate on one core
instead. The sessions domain then drops the session's executor, so the client's retry
rebuilds it (from its row and key file, like after a restart) on a new worker process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

from tensafe.common.errors import TenSafeError, Unavailable


class PeerFailed(Unavailable):
    """A peer process died or failed a task (the request is not evaluated)."""


class PeerWorker:
    """One worker process and the pipe to it (one request in flight at a time).

    Args:
        context: The multiprocessing context (spawn: no state inherited from a
            process that runs gRPC threads).
        index: Position in the pool (names the process).
    """

    def __init__(self, context: Any, index: int) -> None:
        parent, child = context.Pipe()
        self.name = f"tensafe-he-peer-{index}"
        self._process = context.Process(target=serve, args=(child,), name=self.name, daemon=True)
        self._process.start()
        child.close()
        self._conn: Connection = parent
        self._lock = threading.Lock()
        # Closes requested from finalizers (which may run inside a locked section of
        # the same thread, so they must not take the lock); sent before the next task.
        self._deferred: list[tuple[Any, ...]] = []
        self._broken: str | None = None

    @property
    def alive(self) -> bool:
        """False once the worker has exited or its pipe broke."""
        return self._broken is None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        pid: int | None = self._process.pid
        return pid

    def defer(self, message: tuple[Any, ...]) -> None:
        """Send a fire-and-forget message (a session or adapter release) now if the pipe
        is free, else when the task holding it ends (never blocks: a finalizer may run
        while its own thread holds the pipe)."""
        self._deferred.append(message)
        if self._lock.acquire(blocking=False):
            try:
                self._flush()
            except PeerFailed:
                pass  # the worker is gone, and with it what the message would release
            finally:
                self._lock.release()

    def call(self, message: tuple[Any, ...]) -> Any:
        """Send ``message`` and wait for the reply."""
        return self.submit(message).result()

    def submit(self, message: tuple[Any, ...]) -> Pending:
        """Send ``message``; the worker is held until :meth:`Pending.result` is called.

        Raises:
            PeerFailed: The worker is gone.
        """
        self._lock.acquire()
        try:
            self._check()
            self._flush()
            self._send(message)
        except BaseException:
            self._lock.release()
            raise
        return Pending(self)

    def receive(self) -> Any:
        """Read one reply (called by :class:`Pending` with the lock held)."""
        try:
            self._check()
            try:
                status, value = self._conn.recv()
            except (EOFError, OSError) as error:
                self._broken = f"{self.name} exited ({error or 'pipe closed'})"
                raise PeerFailed(f"HE evaluation peer {self._broken}") from None
            with contextlib.suppress(PeerFailed):  # the next task reports a dead worker
                self._flush()
        finally:
            self._lock.release()
        if status != "ok":
            raise PeerFailed(f"HE evaluation peer {self.name} failed a task: {value}")
        return value

    def held(self) -> tuple[int, int]:
        """(sessions, encoded adapters) the worker holds (after pending releases)."""
        sessions, adapters = self.call(("held",))
        return int(sessions), int(adapters)

    def close(self) -> None:
        """Stop the worker process (waits up to 5 s, then terminates it)."""
        with self._lock:
            if self._broken is None:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(("exit",))
            self._broken = self._broken or f"{self.name} closed"
            self._conn.close()
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5.0)

    def _flush(self) -> None:
        # Called with the lock held.
        while self._deferred and self._broken is None:
            self._send(self._deferred.pop(0))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as error:
            self._broken = f"{self.name} exited ({error})"
            raise PeerFailed(f"HE evaluation peer {self._broken}") from None

    def _check(self) -> None:
        if self._broken is not None:
            raise PeerFailed(f"HE evaluation peer {self._broken}")
        if not self._process.is_alive():
            self._broken = f"{self.name} exited with code {self._process.exitcode}"
            raise PeerFailed(f"HE evaluation peer {self._broken}")


class Pending:
    """A task sent to a worker whose reply has not been read yet."""

    def __init__(self, worker: PeerWorker) -> None:
        self._worker = worker
        self._done = False

    def result(self) -> Any:
        """Wait for and return the reply (exactly once; it releases the worker)."""
        if self._done:
            raise RuntimeError("Pending.result called twice")
        self._done = True
        return self._worker.receive()


class EvaluationPeers:
    """A pool of worker processes that executors hand independent work to.

    Args:
        processes: Worker processes to start (the runtime starts one fewer than the
            cores it may use: the process that serves gRPC computes too).

    Raises:
        ValueError: ``processes`` is below 1.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self._context = multiprocessing.get_context("spawn")
        self._workers = [PeerWorker(self._context, index) for index in range(processes)]
        self._next = itertools.cycle(range(processes))
        self._pick = threading.Lock()

    def __len__(self) -> int:
        return len(self._workers)

    def worker(self) -> PeerWorker:
        """The next worker, round robin (sessions spread over the workers); a worker
        that has exited is replaced by a new process first."""
        with self._pick:
            index = next(self._next)
            worker = self._workers[index]
            if not worker.alive:
                worker.close()
                worker = self._workers[index] = PeerWorker(self._context, index)
            return worker

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.close()


# -- the worker process ------------------------------------------------------------------


class _WorkerState:
    """What one worker process holds: executors per session, adapters, parsed plans."""

    def __init__(self) -> None:
        from tensafe.he_runtime.domain.executor import EncodedAdapter, HeLoraExecutor
        from tensafe.helora.plan import Plan

        self._executor_type = HeLoraExecutor
        self._plan_type = Plan
        self.sessions: dict[str, HeLoraExecutor] = {}
        self.adapters: dict[tuple[str, str], EncodedAdapter] = {}
        self._plans: dict[str, Plan] = {}

    def plan(self, text: str) -> Any:
        plan = self._plans.get(text)
        if plan is None:
            if len(self._plans) >= 256:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plan_type.from_dict(json.loads(text))
            self._plans[text] = plan
        return plan

    def handle(self, message: tuple[Any, ...]) -> Any:
        from tensafe.he_runtime.domain import executor as module

        kind = message[0]
        if kind == "open":
            _, session, parameters, galois_keys = message
            self.sessions[session] = self._executor_type(
                parameters=parameters, galois_keys=galois_keys
            )
            return None
        if kind == "close":
            session = message[1]
            self.sessions.pop(session, None)
            for key in [key for key in self.adapters if key[0] == session]:
                del self.adapters[key]
            return None
        if kind == "adapter":
            _, session, adapter_id, plan_text, lora_a, lora_b = message
            # Several layers on one input come as lists (HeLoraExecutor.encode_adapter).
            weights: Any = (
                [
                    module.LoraWeights(lora_a=a, lora_b=b)
                    for a, b in zip(lora_a, lora_b, strict=True)
                ]
                if isinstance(lora_a, list)
                else module.LoraWeights(lora_a=lora_a, lora_b=lora_b)
            )
            self.adapters[(session, adapter_id)] = self.sessions[session].encode_adapter(
                self.plan(plan_text), weights
            )
            return None
        if kind == "drop_adapter":
            self.adapters.pop((message[1], message[2]), None)
            return None
        if kind == "held":
            return len(self.sessions), len(self.adapters)
        if kind == "task":
            _, session, adapter_id, plan_text, task, arguments = message
            executor = self.sessions[session]
            adapter = self.adapters[(session, adapter_id)]
            return executor.run_task(self.plan(plan_text), adapter, task, arguments)
        raise ValueError(f"unknown message {kind!r}")


def serve(conn: Connection) -> None:
    """The worker's loop: one reply per message until ``exit`` or the pipe closes."""
    state = _WorkerState()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "exit":
            return
        if message[0] in ("close", "drop_adapter"):
            # Fire and forget (deferred releases): no reply.
            state.handle(message)
            continue
        try:
            reply: tuple[str, Any] = ("ok", state.handle(message))
        except TenSafeError as error:
            reply = ("error", f"{type(error).__name__}: {error}")
        except Exception:  # reported to the caller, which raises UNAVAILABLE
            reply = ("error", traceback.format_exc(limit=4))
        conn.send(reply)

"""Training you can see: a live progress bar with loss and ε, and a metrics file.

:class:`TrainingProgress` is what ``tensafe train`` and ``tensafe demo`` draw, and what
an SDK script can use around its own loop::

    from tensafe.client.progress import TrainingProgress

    with TrainingProgress(steps, metrics_file="run.jsonl") as progress:
        for _ in range(steps):
            training_client.forward_backward(batch, "cross_entropy").result()
            result = training_client.optim_step(adam).result()
            progress.update(loss=loss, optim=result)

The bar is ``tqdm`` (on stderr, redrawn in place on a terminal); the metrics file gets
one JSON object per step, ``{"step", "loss", "epsilon", "delta", "epsilon_budget",
"elapsed_s"}`` (``epsilon`` is ``null`` for a non-private client: JSON has no
infinity), which ``tensafe plot METRICS --out run.png`` draws.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from tensafe.tinker import types


def format_epsilon(epsilon: float) -> str:
    """ε for people: four decimals, or "∞ (non-private)"."""
    return "∞ (non-private)" if math.isinf(epsilon) else f"{epsilon:.4f}"


class TrainingProgress:
    """A live bar with loss and ε per step, and optionally a JSON-lines metrics file.

    Args:
        total: Steps planned.
        stream: Where the bar is drawn (default stderr). On a stream that is not a
            terminal tqdm still writes, less often (``mininterval``).
        metrics_file: Where to append one JSON line per step (created; truncated).
        description: The bar's label.
        disable: No bar at all (the metrics file is still written).
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        metrics_file: str | Path | None = None,
        description: str = "training",
        disable: bool = False,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar = tqdm(
            total=total,
            desc=description,
            unit="step",
            file=self._stream,
            disable=disable,
            dynamic_ncols=True,
            # One redraw per step at most every 0.1 s; steps take longer than that.
            mininterval=0.1,
        )
        self._started = time.monotonic()
        self._metrics: IO[str] | None = None
        if metrics_file is not None:
            path = Path(metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._metrics = path.open("w", encoding="utf-8")
        self.steps = 0
        """Steps recorded so far."""

    def update(
        self,
        *,
        loss: float,
        epsilon: float | None = None,
        optim: types.OptimStepResponse | None = None,
        step: int | None = None,
        **extra: float,
    ) -> None:
        """Record one step: advance the bar, show loss and ε, write the metrics line.

        Args:
            loss: The step's loss.
            epsilon: ε spent after the step; default from ``optim.privacy_spent``
                (``inf`` when the client is non-private).
            optim: The step's ``optim_step`` result (gives the step number and the
                privacy spent).
            step: The step number (default ``optim.step``, else a running count).
            **extra: More numbers for the metrics line.
        """
        spent = optim.privacy_spent if optim is not None else None
        if epsilon is None:
            epsilon = spent.epsilon if spent is not None else math.inf
        self.steps += 1
        if step is None:
            step = optim.step if optim is not None and optim.step else self.steps
        self._bar.set_postfix_str(f"loss {loss:.4f}  ε {format_epsilon(epsilon)}", refresh=False)
        self._bar.update(1)
        if self._metrics is not None:
            record: dict[str, Any] = {
                "step": step,
                "loss": loss if math.isfinite(loss) else None,
                "epsilon": epsilon if math.isfinite(epsilon) else None,
                "delta": spent.delta if spent is not None else None,
                "epsilon_budget": spent.epsilon_budget if spent is not None else None,
                "elapsed_s": round(time.monotonic() - self._started, 3),
                **extra,
            }
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write(self, line: str, file: TextIO | None = None) -> None:
        """Print a line without tearing the bar (it is redrawn below the line)."""
        self._bar.write(line, file=file if file is not None else sys.stdout)

    def close(self) -> None:
        """End the bar and close the metrics file."""
        self._bar.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

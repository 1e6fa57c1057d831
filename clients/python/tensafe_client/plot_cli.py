"""``tensafe plot``: loss and ε against steps, from a metrics file, as a PNG.

Reads the JSON lines that ``tensafe train --metrics-file`` (or
:class:`tensafe.client.progress.TrainingProgress`) writes and draws two panels sharing
the step axis: the loss, and the ε spent with the budget as a dashed line when the run
had one. Needs matplotlib, the ``[plot]`` extra (imported only here).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensafe.common.errors import InvalidArgument, TenSafeError

LOSS_COLOR = "#1f77b4"
"""The loss curve's colour (tests look for it in the picture)."""

EPSILON_COLOR = "#d62728"
"""The ε curve's colour."""


@dataclass
class Metrics:
    """The series of one metrics file.

    Attributes:
        steps: Step numbers.
        losses: Loss per step (``nan`` where the record had none).
        epsilons: ε after each step (``nan`` for a non-private run).
        epsilon_budget: The run's budget, if it had one.
        delta: The δ of the ε values, if private.
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)
    epsilon_budget: float | None = None
    delta: float | None = None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def read_metrics(path: Path) -> Metrics:
    """Read a metrics file.

    Raises:
        InvalidArgument: A line is not a JSON object with an integer ``step``, or the
            file has no records.
    """
    from tensafe.client.train_cli import read_json_lines

    metrics = Metrics()
    for number, record in read_json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise InvalidArgument(f"{path}:{number}", 'expected {"step": <int>, ...}')
        metrics.steps.append(record["step"])
        metrics.losses.append(_number(record.get("loss")))
        metrics.epsilons.append(_number(record.get("epsilon")))
        if isinstance(record.get("epsilon_budget"), int | float):
            metrics.epsilon_budget = float(record["epsilon_budget"])
        if isinstance(record.get("delta"), int | float):
            metrics.delta = float(record["delta"])
    if not metrics.steps:
        raise InvalidArgument(str(path), "no records")
    return metrics


def plot_metrics(metrics: Metrics, out: Path, *, title: str | None = None) -> Path:
    """Draw loss and ε against steps into a PNG.

    Raises:
        MissingExtra: matplotlib is not installed (the ``[plot]`` extra).
    """
    from tensafe.client.extras import require

    require("matplotlib", "tensafe plot")
    import matplotlib

    # A file, never a window: the Agg backend needs no display.
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (loss_axes, epsilon_axes) = pyplot.subplots(
        2, 1, sharex=True, figsize=(7, 5), dpi=100, constrained_layout=True
    )
    try:
        loss_axes.plot(metrics.steps, metrics.losses, color=LOSS_COLOR, marker="o", ms=3)
        loss_axes.set_ylabel("loss (mean NLL / token)")
        loss_axes.grid(alpha=0.3)
        if any(math.isfinite(e) for e in metrics.epsilons):
            label = "ε spent" + (f" (δ = {metrics.delta:g})" if metrics.delta else "")
            epsilon_axes.plot(
                metrics.steps,
                metrics.epsilons,
                color=EPSILON_COLOR,
                marker="o",
                ms=3,
                label=label,
            )
        else:
            epsilon_axes.text(
                0.5,
                0.5,
                "non-private run: no ε",
                ha="center",
                va="center",
                transform=epsilon_axes.transAxes,
            )
        if metrics.epsilon_budget:
            epsilon_axes.axhline(
                metrics.epsilon_budget,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"budget ε = {metrics.epsilon_budget:g}",
            )
        if epsilon_axes.get_legend_handles_labels()[0]:
            epsilon_axes.legend(loc="lower right")
        epsilon_axes.set_ylabel("ε")
        epsilon_axes.set_xlabel("step")
        epsilon_axes.set_ylim(bottom=0)
        epsilon_axes.grid(alpha=0.3)
        if title:
            figure.suptitle(title)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png")
    finally:
        pyplot.close(figure)
    return out


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` command to the ``tensafe`` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "plot",
        help="draw loss and ε against steps from a metrics file (needs the [plot] extra)",
        description="Draws the loss and the ε spent (with the budget line) against steps, "
        "from the JSON lines of tensafe train --metrics-file, into a PNG.",
    )
    parser.add_argument("metrics", type=Path, help="metrics file (JSON lines)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--title", help="a title above the panels")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``tensafe plot``."""
    from tensafe.client.extras import MissingExtra

    try:
        metrics = read_metrics(args.metrics)
        path = plot_metrics(metrics, args.out, title=args.title)
    except MissingExtra:
        raise  # `tensafe` prints it, naming the extra
    except (OSError, TenSafeError) as exc:
        print(f"tensafe plot: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: loss and ε over {len(metrics.steps)} steps")
    return 0

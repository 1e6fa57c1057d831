"""Differential-privacy accounting of DP-SGD optimizer steps with Google's dp-accounting.

Every optimizer step of a DP training client adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to the sum of the per-example clipped gradients. What
that step costs in privacy depends on how its batch was formed, and the accountant must
assume exactly the sampling the server performed:

* **Client-supplied batches** (:attr:`BatchSampling.CLIENT_BATCHES`): the server cannot
  vouch for how the client chose the examples, so no privacy amplification by sampling
  is claimed. Each step is one full Gaussian mechanism, ``GaussianDpEvent(sigma)``.
* **Server-drawn Poisson batches** (:attr:`BatchSampling.POISSON`): the server holds the
  dataset and includes every example independently with probability ``q``; each step is
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (Abadi et al. 2016, "Deep Learning
  with Differential Privacy", arXiv:1607.00133; Mironov et al. 2019, "Renyi Differential
  Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530).

Both use the add-or-remove-one neighbouring relation (dp-accounting's default), under
which one example changes the clipped-gradient sum by at most ``max_grad_norm``.

Two accountants share one interface, :class:`PrivacyAccountant`, and are created by name
(``"rdp"``, ``"pld"``) like Opacus's accountants:

* :class:`RdpAccountant` composes Renyi-DP curves (Mironov 2017, arXiv:1702.07476) over
  dp-accounting's ``DEFAULT_RDP_ORDERS`` and converts to (epsilon, delta) with the bound
  of Canonne, Kamath and Steinke (arXiv:2004.00010, Prop. 12) that dp-accounting uses.
* :class:`PldAccountant` composes privacy loss distributions (Koskela et al. 2020,
  arXiv:1906.03049; Doroshenko et al. 2022, "Connect the Dots", arXiv:2207.04380) with
  pessimistic discretisation, so the epsilon it reports is an upper bound.

An accountant's state is the list of composed steps grouped by mechanism
(``(sampling, q, sigma) -> count``): small, JSON-serialisable (:meth:`to_state`), saved
with every checkpoint and restored with :meth:`PrivacyAccountant.from_state`.

Cost. The RDP computation takes milliseconds. A PLD for ``T = 10**4`` Poisson steps takes
a few tenths of a second to build from scratch, so the PLD accountant keeps the composed
distribution of the states it has evaluated and composes only the new steps onto the
nearest one it holds; every epsilon is cached per (state, delta). The usual trainer flow
``would_exceed`` / ``epsilon_if`` (check) then ``record`` (commit) therefore composes one
step per optimizer step, and the recorded state's epsilon is already cached.

Accountants are not thread-safe: the trainer serialises the steps of one training
client (one lease holder) and checks and records a step in the transaction that admits
it.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Final, Generic, TypeVar

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from tensafe.common.errors import BudgetExhausted, InvalidArgument

STATE_FORMAT: Final = "tensafe.privacy_accountant.v1"
"""Value of the ``format`` key of :meth:`PrivacyAccountant.to_state`."""

NEIGHBORING_RELATION: Final = "add_or_remove_one"
"""The neighbouring relation every accountant here uses (dp-accounting's default)."""

DEFAULT_PLD_DISCRETIZATION: Final = 1e-4
"""dp-accounting's default ``value_discretization_interval`` for PLDs.

With it, sigma=1.1, q=0.01, T=10**4, delta=1e-5 gives epsilon=5.19262 (PLD), against
5.63201 for RDP over the default orders.
"""

DEFAULT_CALIBRATION_TOLERANCE: Final = 1e-3
"""Default relative tolerance of :func:`calibrate_noise_multiplier` on sigma."""

# Bounds on the noise-multiplier search: below 1e-3 a single step has epsilon in the
# hundreds of thousands for any delta of interest; above 1e6 the noise swamps any
# gradient, so a target not met there is not a target a training run can use.
_SIGMA_SEARCH_MIN: Final = 1e-3
_SIGMA_SEARCH_MAX: Final = 1e6

# Cache sizes: an epsilon is a float, a composed PLD may take megabytes (T=10**4
# Poisson steps: two pmfs of ~10**5 points each), so only a handful are kept.
_EPSILON_CACHE_SIZE: Final = 256

# Relative margin by which the exact Gaussian lower bound must exceed a budget before a
# check refuses on it alone; PLD and the analytic formula agree to ~1e-9 relative.
_LOWER_BOUND_MARGIN: Final = 1e-6
_PLD_CACHE_SIZE: Final = 4


class BatchSampling(enum.Enum):
    """How the examples of one optimizer step were chosen."""

    CLIENT_BATCHES = "client_batches"
    """The client handed in the batch: no amplification, one full Gaussian per step."""

    POISSON = "poisson"
    """The server drew the batch from its copy of the dataset by Poisson sampling."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMechanism:
    """The privacy mechanism of one DP-SGD optimizer step.

    Build it with :meth:`client_batches` or :meth:`poisson`; invalid values raise
    :class:`~tensafe.common.errors.InvalidArgument` naming the field.
    """

    sampling: BatchSampling
    """How the step's batch was formed."""

    noise_multiplier: float
    """Noise standard deviation divided by the clipping norm (sigma); finite, > 0."""

    sampling_probability: float = 1.0
    """Poisson inclusion probability q in (0, 1]; exactly 1.0 for client batches."""

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, BatchSampling):
            raise InvalidArgument("sampling", f"must be a BatchSampling, got {self.sampling!r}")
        object.__setattr__(
            self,
            "noise_multiplier",
            _positive_finite(self.noise_multiplier, "noise_multiplier"),
        )
        q = _real(self.sampling_probability, "sampling_probability")
        if self.sampling is BatchSampling.CLIENT_BATCHES and q != 1.0:
            raise InvalidArgument(
                "sampling_probability",
                "client-supplied batches get no amplification by sampling; must be 1.0",
            )
        if not 0.0 < q <= 1.0:
            raise InvalidArgument("sampling_probability", f"must be in (0, 1], got {q!r}")
        object.__setattr__(self, "sampling_probability", q)

    @classmethod
    def client_batches(cls, noise_multiplier: float) -> StepMechanism:
        """A step over a client-supplied batch: the full Gaussian mechanism.

        Args:
            noise_multiplier: Sigma, the noise standard deviation over the clipping norm.

        Returns:
            The mechanism, accounted as ``GaussianDpEvent(noise_multiplier)``.
        """
        return cls(sampling=BatchSampling.CLIENT_BATCHES, noise_multiplier=noise_multiplier)

    @classmethod
    def poisson(cls, noise_multiplier: float, sampling_probability: float) -> StepMechanism:
        """A step over a server-drawn Poisson batch: the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: Sigma, the noise standard deviation over the clipping norm.
            sampling_probability: The probability q with which each example is included.

        Returns:
            The mechanism, accounted as ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``.
        """
        return cls(
            sampling=BatchSampling.POISSON,
            noise_multiplier=noise_multiplier,
            sampling_probability=sampling_probability,
        )

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of one step of this mechanism."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling is BatchSampling.CLIENT_BATCHES:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_probability, gaussian)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the mechanism (without a step count)."""
        return {
            "sampling": self.sampling.value,
            "noise_multiplier": self.noise_multiplier,
            "sampling_probability": self.sampling_probability,
        }


History = tuple[tuple[StepMechanism, int], ...]
"""Composed steps grouped by mechanism, in the order each mechanism was first recorded."""


def _history_key(history: History) -> frozenset[tuple[StepMechanism, int]]:
    """Order-insensitive identity of a history (composition is commutative)."""
    return frozenset(history)


def _extend_history(history: History, mechanism: StepMechanism, steps: int) -> History:
    if steps == 0:
        return history
    counts = dict(history)
    counts[mechanism] = counts.get(mechanism, 0) + steps
    return tuple(counts.items())


def _gaussian_part_inverse_variance(history: Iterable[tuple[StepMechanism, int]]) -> float:
    """Sum of ``count / sigma**2`` over the full-Gaussian (client batch) groups.

    ``k`` Gaussian mechanisms of sensitivity 1 and standard deviations ``sigma_i``
    compose exactly to one Gaussian mechanism with ``1 / sigma**2 = sum 1 / sigma_i**2``
    (Dong, Roth and Su 2019, "Gaussian Differential Privacy", arXiv:1905.02383, Cor. 3.3).
    """
    return math.fsum(
        count / mechanism.noise_multiplier**2
        for mechanism, count in history
        if mechanism.sampling is BatchSampling.CLIENT_BATCHES
    )


_Value = TypeVar("_Value")


class _BoundedCache(Generic[_Value]):
    """A small least-recently-used map; the accountant's memo of computed values."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, _Value] = OrderedDict()

    def get(self, key: Hashable) -> _Value | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: _Value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def items(self) -> list[tuple[Hashable, _Value]]:
        return list(self._entries.items())


class PrivacyAccountant(abc.ABC):
    """Composes the privacy cost of DP-SGD steps and reports (epsilon, delta).

    Subclasses implement one accounting method; the registry (:func:`create_accountant`)
    creates them by :attr:`name`. Record a step only after it was admitted; ask
    :meth:`epsilon_if` or :meth:`would_exceed` (or use :meth:`charge`, which does both)
    before admitting it.
    """

    name: ClassVar[str]
    """Registry name of the accounting method (``"rdp"`` or ``"pld"``)."""

    fast: ClassVar[bool]
    """Whether every query is well under a millisecond (async callers then skip moving
    it off their event loop)."""

    def __init__(self) -> None:
        self._history: History = ()
        self._epsilon_cache: _BoundedCache[float] = _BoundedCache(_EPSILON_CACHE_SIZE)

    # ----------------------------------------------------------------- composition

    @property
    def history(self) -> History:
        """The composed steps as ``((mechanism, count), ...)``, first-recorded first."""
        return self._history

    @property
    def steps(self) -> int:
        """Total number of optimizer steps composed."""
        return sum(count for _, count in self._history)

    def record(self, mechanism: StepMechanism, *, steps: int = 1) -> None:
        """Compose ``steps`` more steps of ``mechanism`` into the accountant.

        Args:
            mechanism: The mechanism of the steps that were applied.
            steps: How many steps; zero leaves the accountant unchanged.

        Raises:
            InvalidArgument: ``steps`` is not a non-negative integer.
        """
        steps = _non_negative_int(steps, "steps")
        self._history = _extend_history(self._history, _mechanism(mechanism), steps)

    def restore(self, other: PrivacyAccountant) -> None:
        """Take over another accountant's composed steps (keeping this one's caches).

        Raises:
            InvalidArgument: ``other`` uses another accounting method.
        """
        if other.name != self.name:
            raise InvalidArgument("accountant", f"cannot restore {other.name} into {self.name}")
        self._history = other.history

    def dp_event(self) -> dp_accounting.DpEvent:
        """The composed dp-accounting event of every recorded step (for certificates)."""
        return dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(mechanism.dp_event(), count)
                for mechanism, count in self._history
            ]
        )

    # --------------------------------------------------------------------- queries

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far, at ``delta``.

        Args:
            delta: Target delta, in (0, 1).

        Returns:
            The smallest epsilon the method can certify; ``0.0`` before any step.

        Raises:
            InvalidArgument: ``delta`` is not in (0, 1).
        """
        return self._epsilon_of(self._history, _delta(delta))

    def epsilon_if(self, mechanism: StepMechanism, *, additional_steps: int, delta: float) -> float:
        """Epsilon after ``additional_steps`` more steps of ``mechanism``, at ``delta``.

        The accountant is not changed, but what this computes is kept so that recording
        exactly these steps afterwards costs nothing more.

        Args:
            mechanism: The mechanism of the prospective steps.
            additional_steps: How many more steps, >= 0.
            delta: Target delta, in (0, 1).

        Returns:
            The epsilon the composition would have.

        Raises:
            InvalidArgument: A bad ``delta`` or ``additional_steps``.
        """
        additional_steps = _non_negative_int(additional_steps, "additional_steps")
        history = _extend_history(self._history, _mechanism(mechanism), additional_steps)
        return self._epsilon_of(history, _delta(delta))

    def would_exceed(
        self,
        *,
        budget_epsilon: float,
        delta: float,
        mechanism: StepMechanism,
        additional_steps: int = 1,
    ) -> bool:
        """Whether ``additional_steps`` more steps would take epsilon over the budget.

        Args:
            budget_epsilon: The client's epsilon budget, > 0 (``math.inf``: unbounded).
            delta: The budget's delta, in (0, 1).
            mechanism: The mechanism of the prospective steps.
            additional_steps: How many more steps, >= 0.

        Returns:
            True if epsilon after the steps would be strictly greater than the budget.

        Raises:
            InvalidArgument: A bad budget, delta or step count.
        """
        budget_epsilon = _budget(budget_epsilon)
        delta = _delta(delta)
        additional_steps = _non_negative_int(additional_steps, "additional_steps")
        history = _extend_history(self._history, _mechanism(mechanism), additional_steps)
        # Refuse without building a PLD when the exact epsilon of the client-batch part
        # alone is already over budget; the margin keeps this shortcut from ever
        # disagreeing with the full computation through last-digit rounding.
        lower_bound = _exact_gaussian_lower_bound(history, delta)
        if lower_bound > budget_epsilon * (1.0 + _LOWER_BOUND_MARGIN):
            return True
        return self._epsilon_of(history, delta) > budget_epsilon

    def charge(
        self,
        mechanism: StepMechanism,
        *,
        steps: int = 1,
        delta: float,
        budget_epsilon: float,
    ) -> float:
        """Admit ``steps`` steps if they fit the budget, and record them.

        The trainer calls this on the accountant it loaded under the training client's
        lock and stores the new state in the same transaction that admits the step, so
        concurrent requests cannot overspend.

        Args:
            mechanism: The mechanism of the steps to admit.
            steps: How many steps, >= 0.
            delta: The budget's delta, in (0, 1).
            budget_epsilon: The client's epsilon budget, > 0.

        Returns:
            Epsilon after the steps were recorded.

        Raises:
            BudgetExhausted: The steps would exceed the budget; nothing is recorded.
            InvalidArgument: A bad budget, delta or step count.
        """
        mechanism = _mechanism(mechanism)
        if self.would_exceed(
            budget_epsilon=budget_epsilon,
            delta=delta,
            mechanism=mechanism,
            additional_steps=steps,
        ):
            spent = self.epsilon(delta)
            raise BudgetExhausted(
                f"{steps} more step(s) would exceed the privacy budget "
                f"epsilon={budget_epsilon:g} at delta={delta:g} "
                f"(spent so far: epsilon={spent:.6g} over {self.steps} steps)",
                metadata={
                    "budget_epsilon": repr(float(budget_epsilon)),
                    "delta": repr(float(delta)),
                    "epsilon_spent": repr(spent),
                    "steps_done": str(self.steps),
                    "accountant": self.name,
                },
            )
        self.record(mechanism, steps=steps)
        return self.epsilon(delta)

    # --------------------------------------------------------------- serialisation

    def to_state(self) -> dict[str, Any]:
        """The accountant as a JSON-able dict, saved with each checkpoint."""
        return {
            "format": STATE_FORMAT,
            "accountant": self.name,
            "neighboring_relation": NEIGHBORING_RELATION,
            "options": self._options_to_json(),
            "history": [
                {**mechanism.to_json(), "steps": count} for mechanism, count in self._history
            ],
        }

    @staticmethod
    def from_state(state: Mapping[str, Any]) -> PrivacyAccountant:
        """Rebuild an accountant of the right kind from :meth:`to_state` output.

        Args:
            state: A dict produced by :meth:`to_state` (possibly through JSON).

        Returns:
            An accountant with the same method, options and composed steps.

        Raises:
            InvalidArgument: The state is malformed; ``field`` is its path (``state.*``).
        """
        if not isinstance(state, Mapping):
            raise InvalidArgument("state", "must be a mapping")
        if state.get("format") != STATE_FORMAT:
            raise InvalidArgument("state.format", f"must be {STATE_FORMAT!r}")
        if state.get("neighboring_relation") != NEIGHBORING_RELATION:
            raise InvalidArgument("state.neighboring_relation", f"must be {NEIGHBORING_RELATION!r}")
        name = state.get("accountant")
        accountant_class = _ACCOUNTANTS.get(name) if isinstance(name, str) else None
        if accountant_class is None:
            raise InvalidArgument("state.accountant", f"must be one of {accountant_names()}")
        options = state.get("options")
        if not isinstance(options, Mapping):
            raise InvalidArgument("state.options", "must be a mapping")
        accountant = accountant_class._from_options_json(options)
        entries = state.get("history")
        if not isinstance(entries, list):
            raise InvalidArgument("state.history", "must be a list")
        for index, entry in enumerate(entries):
            field = f"state.history[{index}]"
            if not isinstance(entry, Mapping):
                raise InvalidArgument(field, "must be a mapping")
            try:
                mechanism = StepMechanism(
                    sampling=BatchSampling(entry.get("sampling")),
                    noise_multiplier=_real(entry.get("noise_multiplier"), "noise_multiplier"),
                    sampling_probability=_real(
                        entry.get("sampling_probability"), "sampling_probability"
                    ),
                )
            except ValueError as error:
                raise InvalidArgument(f"{field}.sampling", str(error)) from error
            except InvalidArgument as error:
                raise InvalidArgument(f"{field}.{error.field}", error.description) from error
            accountant.record(
                mechanism, steps=_non_negative_int(entry.get("steps"), f"{field}.steps")
            )
        return accountant

    # ------------------------------------------------------------------ internals

    def _epsilon_of(self, history: History, delta: float) -> float:
        if not history:
            return 0.0
        key = (_history_key(history), delta)
        cached = self._epsilon_cache.get(key)
        if cached is None:
            cached = float(self._compute_epsilon(history, delta))
            self._epsilon_cache.put(key, cached)
        return cached

    @abc.abstractmethod
    def _compute_epsilon(self, history: History, delta: float) -> float:
        """Epsilon of a non-empty history at ``delta`` (validated)."""

    @abc.abstractmethod
    def _options_to_json(self) -> dict[str, Any]:
        """The constructor options as a JSON-able dict."""

    @classmethod
    @abc.abstractmethod
    def _from_options_json(cls, options: Mapping[str, Any]) -> PrivacyAccountant:
        """A fresh accountant from :meth:`_options_to_json` output."""


class RdpAccountant(PrivacyAccountant):
    """Renyi-DP accounting (dp-accounting's ``RdpAccountant`` curves and conversion).

    The RDP curve of a mechanism is computed once per mechanism and the composition is
    their count-weighted sum, exactly what dp-accounting's ``RdpAccountant`` accumulates.

    Args:
        orders: The Renyi orders (all > 1). Defaults to dp-accounting's
            ``DEFAULT_RDP_ORDERS`` (1.1..10.9 by 0.1, 11..63, 128, 256, 512, 1024).
    """

    name: ClassVar[str] = "rdp"
    fast: ClassVar[bool] = True  # one conversion of a count-weighted sum of curves

    def __init__(self, *, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        chosen = rdp_privacy_accountant.DEFAULT_RDP_ORDERS if orders is None else orders
        try:
            order_values = tuple(float(order) for order in chosen)
        except (TypeError, ValueError) as error:
            raise InvalidArgument("orders", "must be a sequence of numbers") from error
        if not order_values or not all(
            math.isfinite(order) and order > 1.0 for order in order_values
        ):
            raise InvalidArgument("orders", "must be a non-empty sequence of finite orders > 1")
        self._orders: tuple[float, ...] = order_values
        self._order_array = np.asarray(order_values, dtype=np.float64)
        self._curves: dict[StepMechanism, npt.NDArray[np.float64]] = {}

    @property
    def orders(self) -> tuple[float, ...]:
        """The Renyi orders the curves are evaluated at."""
        return self._orders

    def rdp_curve(self) -> npt.NDArray[np.float64]:
        """The composed RDP values at :attr:`orders` of everything recorded."""
        return self._composed_curve(self._history)

    def _curve(self, mechanism: StepMechanism) -> npt.NDArray[np.float64]:
        curve = self._curves.get(mechanism)
        if curve is None:
            single_step = rdp_privacy_accountant.RdpAccountant(orders=list(self._orders))
            single_step.compose(mechanism.dp_event())
            curve = np.asarray(single_step.rdp, dtype=np.float64)
            self._curves[mechanism] = curve
        return curve

    def _composed_curve(self, history: History) -> npt.NDArray[np.float64]:
        total = np.zeros_like(self._order_array)
        for mechanism, count in history:
            total += count * self._curve(mechanism)
        return total

    def _compute_epsilon(self, history: History, delta: float) -> float:
        epsilon, _ = rdp_privacy_accountant.compute_epsilon(
            self._order_array, self._composed_curve(history), delta
        )
        return float(epsilon)

    def _options_to_json(self) -> dict[str, Any]:
        return {"orders": list(self._orders)}

    @classmethod
    def _from_options_json(cls, options: Mapping[str, Any]) -> RdpAccountant:
        orders = options.get("orders")
        if not isinstance(orders, list):
            raise InvalidArgument("state.options.orders", "must be a list of numbers")
        try:
            return cls(orders=orders)
        except InvalidArgument as error:
            raise InvalidArgument("state.options.orders", error.description) from error


@dataclasses.dataclass(frozen=True)
class _PldComposition:
    """A composed PLD and the pieces needed to extend it.

    The full-Gaussian groups are kept as one exact Gaussian (``inverse_variance`` =
    sum of count / sigma**2) and the Poisson groups as their composed PLD, so adding
    client-batch steps rebuilds only the closed-form Gaussian part and adding Poisson
    steps composes only the new steps.
    """

    history: History
    gaussian_inverse_variance: float
    gaussian: Any  # privacy_loss_distribution.PrivacyLossDistribution | None
    poisson: Any  # privacy_loss_distribution.PrivacyLossDistribution | None
    total: Any  # privacy_loss_distribution.PrivacyLossDistribution


class PldAccountant(PrivacyAccountant):
    """Privacy-loss-distribution accounting (dp-accounting's PLD with pessimistic rounding).

    Composes the same distributions as dp-accounting's ``PLDAccountant``: for Poisson
    groups the single-step subsampled-Gaussian PLD self-composed ``count`` times, for
    client-batch groups the Gaussian PLD of standard deviation ``sigma / sqrt(count)``
    (several client-batch groups are merged into one exactly composed Gaussian). It keeps
    the composed PLD of the last few states it evaluated and extends the closest one
    with only the new steps.

    Args:
        value_discretization_interval: Width of the privacy-loss grid; smaller is tighter
            and slower. Default 1e-4 (dp-accounting's default).
    """

    name: ClassVar[str] = "pld"
    # A composition is an FFT over the privacy-loss grid: 0.07 s per Poisson step,
    # 0.5-8 s for a client-batch Gaussian (docs/privacy.md).
    fast: ClassVar[bool] = False

    def __init__(
        self, *, value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION
    ) -> None:
        super().__init__()
        self._discretization = _positive_finite(
            value_discretization_interval, "value_discretization_interval"
        )
        self._single_step: dict[StepMechanism, Any] = {}
        self._compositions: _BoundedCache[_PldComposition] = _BoundedCache(_PLD_CACHE_SIZE)

    @property
    def value_discretization_interval(self) -> float:
        """Width of the privacy-loss grid of every PLD this accountant builds."""
        return self._discretization

    def _single_step_pld(self, mechanism: StepMechanism) -> Any:
        pld = self._single_step.get(mechanism)
        if pld is None:
            pld = privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=mechanism.noise_multiplier,
                sampling_prob=mechanism.sampling_probability,
                value_discretization_interval=self._discretization,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
            self._single_step[mechanism] = pld
        return pld

    def _gaussian_pld(self, inverse_variance: float) -> Any:
        return privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=1.0 / math.sqrt(inverse_variance),
            value_discretization_interval=self._discretization,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        )

    def _nearest_composition(self, history: History) -> tuple[_PldComposition | None, History]:
        """The cached composition with most steps that ``history`` extends, and the rest."""
        wanted = dict(history)
        best: _PldComposition | None = None
        best_steps = -1
        for _, composition in self._compositions.items():
            held = dict(composition.history)
            if all(wanted.get(mechanism, 0) >= count for mechanism, count in held.items()):
                steps = sum(held.values())
                if steps > best_steps:
                    best, best_steps = composition, steps
        held = dict(best.history) if best is not None else {}
        remainder = tuple(
            (mechanism, count - held.get(mechanism, 0))
            for mechanism, count in history
            if count > held.get(mechanism, 0)
        )
        return best, remainder

    def _composition(self, history: History) -> _PldComposition:
        key = _history_key(history)
        cached = self._compositions.get(key)
        if cached is not None:
            return cached
        base, remainder = self._nearest_composition(history)
        poisson = base.poisson if base is not None else None
        for mechanism, count in remainder:
            if mechanism.sampling is BatchSampling.POISSON:
                added = self._single_step_pld(mechanism)
                if count > 1:
                    added = added.self_compose(count)
                poisson = added if poisson is None else poisson.compose(added)
        inverse_variance = _gaussian_part_inverse_variance(history)
        gaussian = None
        if inverse_variance > 0.0:
            if base is not None and base.gaussian_inverse_variance == inverse_variance:
                gaussian = base.gaussian
            else:
                gaussian = self._gaussian_pld(inverse_variance)
        if gaussian is None:
            total = poisson
        else:
            total = gaussian if poisson is None else gaussian.compose(poisson)
        composition = _PldComposition(
            history=history,
            gaussian_inverse_variance=inverse_variance,
            gaussian=gaussian,
            poisson=poisson,
            total=total,
        )
        self._compositions.put(key, composition)
        return composition

    def _compute_epsilon(self, history: History, delta: float) -> float:
        return float(self._composition(history).total.get_epsilon_for_delta(delta))

    def _options_to_json(self) -> dict[str, Any]:
        return {"value_discretization_interval": self._discretization}

    @classmethod
    def _from_options_json(cls, options: Mapping[str, Any]) -> PldAccountant:
        try:
            return cls(
                value_discretization_interval=_real(
                    options.get("value_discretization_interval"), "value_discretization_interval"
                )
            )
        except InvalidArgument as error:
            raise InvalidArgument(
                "state.options.value_discretization_interval", error.description
            ) from error


_ACCOUNTANTS: Final[Mapping[str, type[PrivacyAccountant]]] = MappingProxyType(
    {RdpAccountant.name: RdpAccountant, PldAccountant.name: PldAccountant}
)


def accountant_names() -> tuple[str, ...]:
    """Names accepted by :func:`create_accountant` (``("rdp", "pld")``)."""
    return tuple(_ACCOUNTANTS)


def accountant_type(name: str) -> type[PrivacyAccountant]:
    """The accountant class registered as ``name`` (``"rdp"`` or ``"pld"``).

    Raises:
        InvalidArgument: Unknown name (field ``accountant``).
    """
    accountant_class = _ACCOUNTANTS.get(name)
    if accountant_class is None:
        raise InvalidArgument("accountant", f"must be one of {accountant_names()}, got {name!r}")
    return accountant_class


def create_accountant(name: str, **options: Any) -> PrivacyAccountant:
    """Create an empty accountant by registry name.

    Args:
        name: ``"rdp"`` or ``"pld"``.
        **options: Keyword options of that accountant (``orders`` for RDP,
            ``value_discretization_interval`` for PLD).

    Returns:
        A fresh accountant with no steps.

    Raises:
        InvalidArgument: Unknown name (field ``accountant``) or bad option.
    """
    accountant_class = accountant_type(name)
    try:
        return accountant_class(**options)
    except TypeError as error:
        raise InvalidArgument("accountant", f"bad options for {name!r}: {error}") from error


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    steps: int,
    sampling: BatchSampling,
    sampling_probability: float = 1.0,
    accountant: str = "rdp",
    accountant_options: Mapping[str, Any] | None = None,
    relative_tolerance: float = DEFAULT_CALIBRATION_TOLERANCE,
) -> float:
    """The smallest noise multiplier (within tolerance) that keeps ``steps`` steps in budget.

    Epsilon is non-increasing in sigma, so a bracketing search on sigma keeps
    ``lo < sigma* <= hi`` with ``epsilon(lo) > target >= epsilon(hi)`` until
    ``hi <= lo * (1 + relative_tolerance)`` and returns ``hi``. Hence the result
    satisfies ``epsilon(result) <= target_epsilon`` (it was evaluated) and is at most
    ``relative_tolerance`` above the exact minimal sigma. For PLD the search starts from
    the RDP solution, which is an upper bracket in practice (PLD is tighter) and checked.

    Args:
        target_epsilon: The epsilon the whole run may spend, > 0.
        delta: Target delta, in (0, 1).
        steps: Planned number of optimizer steps, >= 1.
        sampling: How batches are formed.
        sampling_probability: Poisson q in (0, 1]; must be 1.0 for client batches.
        accountant: ``"rdp"`` or ``"pld"``.
        accountant_options: Options for :func:`create_accountant`.
        relative_tolerance: Relative precision on sigma, in (0, 1); default 1e-3.

    Returns:
        The noise multiplier.

    Raises:
        InvalidArgument: Bad arguments, or a target no sigma up to 1e6 reaches.
    """
    target_epsilon = _positive_finite(target_epsilon, "target_epsilon")
    delta = _delta(delta)
    steps = _non_negative_int(steps, "steps")
    if steps == 0:
        raise InvalidArgument("steps", "calibration needs at least one planned step")
    relative_tolerance = _real(relative_tolerance, "relative_tolerance")
    if not 0.0 < relative_tolerance < 1.0:
        raise InvalidArgument("relative_tolerance", "must be in (0, 1)")
    options = dict(accountant_options or {})
    create_accountant(accountant, **options)  # validates the name and options up front
    # Validates sampling and q with the field names callers know.
    StepMechanism(
        sampling=sampling, noise_multiplier=1.0, sampling_probability=sampling_probability
    )

    def epsilon_at(noise_multiplier: float) -> float:
        trial = create_accountant(accountant, **options)
        mechanism = StepMechanism(
            sampling=sampling,
            noise_multiplier=noise_multiplier,
            sampling_probability=sampling_probability,
        )
        trial.record(mechanism, steps=steps)
        return trial.epsilon(delta)

    if accountant == PldAccountant.name:
        start = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=delta,
            steps=steps,
            sampling=sampling,
            sampling_probability=sampling_probability,
            accountant=RdpAccountant.name,
            relative_tolerance=relative_tolerance,
        )
        # PLD needs a little less noise than RDP; shrink gently so the expensive PLD is
        # never evaluated at a sigma far below the answer (its cost grows like 1/sigma).
        shrink = 0.9
    else:
        start, shrink = 1.0, 0.5
    return _search_noise_multiplier(
        epsilon_at,
        target_epsilon,
        start=start,
        shrink=shrink,
        relative_tolerance=relative_tolerance,
    )


def _search_noise_multiplier(
    epsilon_at: Callable[[float], float],
    target_epsilon: float,
    *,
    start: float,
    shrink: float,
    relative_tolerance: float,
) -> float:
    """Bracket the answer, then shrink the bracket to ``relative_tolerance``.

    Works on ``f(sigma) = log(epsilon(sigma) / target)`` against ``log(sigma)``, where
    the curve is close to a straight line, with the Illinois variant of regula falsi
    (Dowell and Jarratt 1971): the interpolated point usually lands next to the root,
    and halving the retained end's value guarantees both ends move. Each probe is kept
    a quarter of the tolerance inside the bracket, so the bracket always shrinks; the
    loop ends exactly as a bisection would (``high <= low * (1 + tolerance)``) but needs
    about half the epsilon evaluations, which matters for PLD.
    """

    def log_ratio(noise_multiplier: float) -> float:
        epsilon = epsilon_at(noise_multiplier)
        if epsilon <= 0.0:
            return -math.inf
        return math.log(epsilon / target_epsilon)

    sigma = start
    value = log_ratio(sigma)
    if value <= 0.0:
        high, value_high = sigma, value
        while True:
            sigma *= shrink
            if sigma < _SIGMA_SEARCH_MIN:
                return high
            value = log_ratio(sigma)
            if value > 0.0:
                low, value_low = sigma, value
                break
            high, value_high = sigma, value
    else:
        low, value_low = sigma, value
        while True:
            sigma /= shrink
            if sigma > _SIGMA_SEARCH_MAX:
                raise InvalidArgument(
                    "target_epsilon",
                    f"not reachable with a noise multiplier up to {_SIGMA_SEARCH_MAX:g}",
                )
            value = log_ratio(sigma)
            if value <= 0.0:
                high, value_high = sigma, value
                break
            low, value_low = sigma, value

    margin = math.log1p(relative_tolerance) / 4.0
    kept_side = 0  # +1: the high end was kept last time, -1: the low end
    while high > low * (1.0 + relative_tolerance):
        log_low, log_high = math.log(low), math.log(high)
        if math.isfinite(value_low) and math.isfinite(value_high) and value_low > value_high:
            fraction = value_low / (value_low - value_high)
            probe = log_low + fraction * (log_high - log_low)
        else:
            probe = 0.5 * (log_low + log_high)
        probe = min(max(probe, log_low + margin), log_high - margin)
        sigma = math.exp(probe)
        value = log_ratio(sigma)
        if value <= 0.0:
            high, value_high = sigma, value
            if kept_side == -1:
                value_low /= 2.0
            kept_side = -1
        else:
            low, value_low = sigma, value
            if kept_side == 1:
                value_high /= 2.0
            kept_side = 1
    return high


def _exact_gaussian_lower_bound(history: History, delta: float) -> float:
    """Exact epsilon of the client-batch part alone, a lower bound on the whole.

    The client-batch steps compose to one Gaussian mechanism whose exact epsilon is
    known (Balle and Wang 2018, "Improving the Gaussian Mechanism", arXiv:1805.06530).
    Any sound accountant's epsilon for the full history is at least this (dropping
    mechanisms is post-processing), so a budget check can refuse on it without building
    a large PLD.
    """
    inverse_variance = _gaussian_part_inverse_variance(history)
    if inverse_variance == 0.0:
        return 0.0
    return float(dp_accounting.get_epsilon_gaussian(1.0 / math.sqrt(inverse_variance), delta))


# ----------------------------------------------------------------------- validation


def _real(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise InvalidArgument(field, f"must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise InvalidArgument(field, "must not be NaN")
    return number


def _positive_finite(value: object, field: str) -> float:
    number = _real(value, field)
    if not (math.isfinite(number) and number > 0.0):
        raise InvalidArgument(field, f"must be finite and > 0, got {number!r}")
    return number


def _delta(value: object, field: str = "delta") -> float:
    number = _real(value, field)
    if not 0.0 < number < 1.0:
        raise InvalidArgument(field, f"must be in (0, 1), got {number!r}")
    return number


def _budget(value: object) -> float:
    number = _real(value, "budget_epsilon")
    if not number > 0.0:
        raise InvalidArgument("budget_epsilon", f"must be > 0, got {number!r}")
    return number


def _non_negative_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidArgument(field, f"must be an integer, got {value!r}")
    if value < 0:
        raise InvalidArgument(field, f"must be >= 0, got {value}")
    return int(value)


def _mechanism(value: object) -> StepMechanism:
    if not isinstance(value, StepMechanism):
        raise InvalidArgument("mechanism", f"must be a StepMechanism, got {value!r}")
    return value

"""The privacy ledger: the one component that reserves, commits and releases epsilon,
and carries the privacy lineage of a training client's weights (DESIGN §8, §9).

Everything that spends or checks privacy goes through :class:`PrivacyLedger`: the API
when it admits an OptimStep, a TrainOnDataset run or a LoadState; the worker when it
commits or drops a step; the dataset runner for each Poisson step; the publisher for a
package's DP certificate. Every method works inside the caller's transaction, so a
reservation commits with the job it admits and a ledger row with the step it charges.

**Epsilon belongs to the weights.** A training client's accountant composes its own DP
steps *and* every step of the weights it continued: a LoadState of another client's
checkpoint (also ``create_training_client_from_state``) merges that checkpoint's
lineage into the loading client's, and the steps it adds are composed into its
accountant at once, at admission (so an OptimStep queued behind the LoadState is
checked against the whole history). A lineage maps each source training client to the
number of its own DP steps the weights include; merging takes the larger count per
source, so loading the same history twice never counts it twice, and reloading one's
own checkpoint (a rollback) changes nothing: a client's own steps are never given back.
The budget and delta that apply are the tightest of the client's and of every source's,
so a new client cannot reset or widen the budget of the weights it continues.
Weights trained without DP carry a non-private source: loading them into a DP client
is allowed (public pre-training is a normal start), and the DP certificate then says
which steps its epsilon does not cover.

**Per-dataset budgets.** A server-held dataset may carry its own (epsilon, delta)
budget. Every Poisson step of any client that samples it is composed into the
dataset's accountant (RDP): its ledger rows and the steps still reserved. A TrainOnDataset
run is admitted only if both the client's and the dataset's budgets hold; admissions of
one tenant are serialised by the tenant's job lock, so concurrent runs cannot
overspend a dataset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

from tensafe.common.errors import BudgetExhausted, FailedPrecondition
from tensafe.trainer.domain.engine.accounting import (
    PrivacyAccountant,
    StepMechanism,
    accountant_type,
    create_accountant,
)
from tensafe.trainer.domain.model import (
    CheckpointState,
    ClientState,
    DatasetRecord,
)
from tensafe.trainer.domain.settings import DpSettings, json_state
from tensafe.trainer.store.sql import TrainerTransaction

DATASET_ACCOUNTANT = "rdp"
"""Dataset budgets compose with RDP: cheap to evaluate over many clients' steps, and an
upper bound like every accountant here."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LineageSource:
    """Another training client whose steps the weights include."""

    client_id: str
    private: bool
    """False when that client trained without DP (its steps have no guarantee)."""
    dp_steps: int
    """How many of that client's own DP steps (its ledger rows 1..n) are included."""
    steps: int
    """How many of its optimizer steps are included (DP or not)."""
    epsilon_budget: float | None
    """That client's budget, which keeps applying to the weights."""
    delta: float | None
    """That client's delta."""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> LineageSource:
        """Parse :meth:`to_json` output."""
        return cls(**value)


@dataclasses.dataclass(frozen=True)
class Lineage:
    """The sources of a set of weights, at most one entry per client, sorted by id."""

    sources: tuple[LineageSource, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Lineage:
        """Parse the JSON a row stores (None: no source)."""
        if not text:
            return cls()
        return cls(tuple(LineageSource.from_json(item) for item in json.loads(text)))

    def to_json(self) -> str | None:
        """JSON for a row (None when empty)."""
        if not self.sources:
            return None
        return json.dumps([source.to_json() for source in self.sources], sort_keys=True)

    def source(self, client_id: str) -> LineageSource | None:
        """The entry of one client, if any."""
        return next((s for s in self.sources if s.client_id == client_id), None)

    def merged(self, other: Lineage, *, without: str) -> Lineage:
        """Both lineages, keeping the larger step counts per source, ``without`` one
        client (the loading client: its own steps are counted by its own ledger)."""
        by_id = {source.client_id: source for source in self.sources}
        for source in other.sources:
            if source.client_id == without:
                continue
            mine = by_id.get(source.client_id)
            if mine is None or (source.dp_steps, source.steps) > (mine.dp_steps, mine.steps):
                by_id[source.client_id] = source
        by_id.pop(without, None)
        return Lineage(tuple(by_id[key] for key in sorted(by_id)))

    @property
    def dp_steps(self) -> int:
        """DP steps of every source."""
        return sum(source.dp_steps for source in self.sources)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyReport:
    """What a client has spent, over the whole lineage of its weights."""

    epsilon: float
    """Epsilon at :attr:`delta` of every DP step the weights have seen."""
    delta: float
    """The tightest delta of the client and its sources."""
    epsilon_budget: float | None
    """The tightest budget of the client and its sources."""
    steps: int
    """DP steps composed: the client's own plus the inherited ones."""
    inherited_steps: int
    """DP steps of other clients' checkpoints the weights continue."""
    non_private_sources: tuple[LineageSource, ...]
    """Sources trained without DP."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistoryGroup:
    """Steps of one mechanism taken by one training client (for certificates)."""

    client_id: str
    mechanism: StepMechanism
    steps: int


def _tightest(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


class PrivacyLedger:
    """Reserve, commit, release and lineage of epsilon (see the module docstring).

    Stateless: every method that reads or writes the ledger takes the transaction it
    belongs to (:class:`~tensafe.trainer.store.sql.TrainerTransaction`), and reads the
    client through :class:`~tensafe.trainer.domain.model.ClientState` (a record, or the
    row a worker holds locked in that transaction).
    """

    # ------------------------------------------------------------------ reads

    @staticmethod
    def accountant(client: ClientState, dp: DpSettings) -> PrivacyAccountant:
        """The client's accountant: every committed step of the weights' lineage."""
        if client.accountant_state is None:
            return create_accountant(dp.accountant)
        return PrivacyAccountant.from_state(json.loads(client.accountant_state))

    @staticmethod
    def lineage(client: ClientState) -> Lineage:
        """The client's sources."""
        return Lineage.parse(client.lineage_json)

    def budget(self, client: ClientState, dp: DpSettings) -> tuple[float | None, float]:
        """The (budget, delta) that apply to the client's weights: the tightest of the
        client's and its sources'."""
        return _budget(self.lineage(client), dp)

    def report(self, client: ClientState) -> PrivacyReport | None:
        """What the client has spent; None for a non-private client."""
        dp = client_dp(client)
        if dp is None:
            return None
        lineage = self.lineage(client)
        budget, delta = self.budget(client, dp)
        return PrivacyReport(
            epsilon=float(client.epsilon_spent),
            delta=delta,
            epsilon_budget=budget,
            steps=int(client.dp_steps) + lineage.dp_steps,
            inherited_steps=lineage.dp_steps,
            non_private_sources=tuple(s for s in lineage.sources if not s.private),
        )

    def snapshot(self, client: ClientState) -> str | None:
        """The lineage of the client's current weights, the client included: what a
        checkpoint of them stores."""
        dp = client_dp(client)
        own = LineageSource(
            client_id=client.id,
            private=dp is not None,
            dp_steps=int(client.dp_steps),
            steps=int(client.step),
            epsilon_budget=dp.epsilon_budget if dp is not None else None,
            delta=dp.delta if dp is not None else None,
        )
        return self.lineage(client).merged(Lineage((own,)), without="").to_json()

    # ------------------------------------------------------------------ reserve

    async def reserve(
        self,
        tx: TrainerTransaction,
        client: ClientState,
        dp: DpSettings,
        *,
        mechanism: StepMechanism,
        future_id: str,
        seq: int,
        steps: int = 1,
        dataset: DatasetRecord | None = None,
    ) -> None:
        """Check ``steps`` more steps against the budgets, counting every admitted step,
        and reserve them. Call it in the transaction that admits the job, under the
        client's row lock (and the tenant's job lock, for dataset budgets).

        Raises:
            BudgetExhausted: The client's (or its lineage's, or the dataset's) budget
                would be exceeded; nothing is reserved.
        """
        accountant = self.accountant(client, dp)
        for reservation in await tx.open_reservations(client.id):
            accountant.record(reservation.mechanism, steps=reservation.steps)
        budget, delta = self.budget(client, dp)
        if budget is not None:
            epsilon_after = await _query(
                accountant,
                partial(accountant.epsilon_if, mechanism, additional_steps=steps, delta=delta),
            )
            if epsilon_after > budget:
                admitted = accountant.steps
                epsilon_now = await _query(accountant, partial(accountant.epsilon, delta))
                raise BudgetExhausted(
                    f"{steps} more DP step(s) would take epsilon to {epsilon_after:.6g}, over "
                    f"the privacy budget epsilon={budget:g} at delta={delta:g} ({admitted} "
                    f"step(s) of these weights already admitted, epsilon after them "
                    f"{epsilon_now:.6g})",
                    metadata={
                        "epsilon_budget": repr(budget),
                        "epsilon_after": repr(epsilon_after),
                        "delta": repr(delta),
                        "steps_admitted": str(admitted),
                        "accountant": dp.accountant,
                    },
                )
        if dataset is not None:
            await self._check_dataset(tx, dataset, mechanism, steps)
        tx.add_reservation(
            future_id=future_id,
            tenant=client.tenant,
            client_id=client.id,
            seq=seq,
            mechanism=mechanism,
            steps=steps,
            dataset_id=dataset.id if dataset is not None else None,
        )

    def check_next(
        self,
        client: ClientState,
        dp: DpSettings,
        accountant: PrivacyAccountant,
        mechanism: StepMechanism,
    ) -> None:
        """A second line for a multi-step job that reserved at admission: refuse the
        next step if it alone would cross the budget (e.g. after a concurrent LoadState).

        Raises:
            BudgetExhausted: The next step would exceed the budget.
        """
        budget, delta = self.budget(client, dp)
        if budget is not None and accountant.would_exceed(
            budget_epsilon=budget, delta=delta, mechanism=mechanism
        ):
            raise BudgetExhausted(
                f"one more DP step would exceed the privacy budget epsilon={budget:g} at "
                f"delta={delta:g} after {accountant.steps} step(s)"
            )

    async def _check_dataset(
        self,
        tx: TrainerTransaction,
        dataset: DatasetRecord,
        mechanism: StepMechanism,
        steps: int,
    ) -> None:
        if dataset.epsilon_budget is None or dataset.delta is None:
            return
        accountant = await self.dataset_accountant(tx, dataset.id)
        epsilon_after = await _query(
            accountant,
            partial(accountant.epsilon_if, mechanism, additional_steps=steps, delta=dataset.delta),
        )
        if epsilon_after > dataset.epsilon_budget:
            raise BudgetExhausted(
                f"{steps} more step(s) on dataset {dataset.id} would take its epsilon to "
                f"{epsilon_after:.6g}, over the dataset's budget "
                f"epsilon={dataset.epsilon_budget:g} at delta={dataset.delta:g} "
                f"({accountant.steps} step(s) of all clients already admitted on it)",
                metadata={
                    "dataset_id": dataset.id,
                    "dataset_epsilon_budget": repr(dataset.epsilon_budget),
                    "epsilon_after": repr(epsilon_after),
                    "delta": repr(dataset.delta),
                    "steps_admitted": str(accountant.steps),
                },
            )

    async def dataset_accountant(
        self, tx: TrainerTransaction, dataset_id: str, *, reserved: bool = True
    ) -> PrivacyAccountant:
        """Every step any client committed (and, with ``reserved``, still holds
        reserved) on a dataset, composed."""
        accountant = create_accountant(DATASET_ACCOUNTANT)
        for entry in await tx.dataset_ledger(dataset_id):
            accountant.record(entry.mechanism)
        if reserved:
            for reservation in await tx.dataset_reservations(dataset_id):
                accountant.record(reservation.mechanism, steps=reservation.steps)
        return accountant

    async def dataset_epsilon(
        self, tx: TrainerTransaction, dataset: DatasetRecord
    ) -> float | None:
        """Epsilon committed on a dataset at its budget's delta (None: no budget)."""
        if dataset.delta is None:
            return None
        committed = await self.dataset_accountant(tx, dataset.id, reserved=False)
        return await _query(committed, partial(committed.epsilon, dataset.delta))

    # ------------------------------------------------------------------ commit

    async def prepare_step(
        self, client: ClientState, mechanism: StepMechanism
    ) -> PrivacyAccountant | None:
        """The client's accountant with one more step of ``mechanism`` composed and its
        epsilon kept, to pass to :meth:`commit_step` (``accountant=``) when the method is
        slow: the charge then composes nothing inside the commit's transaction, which
        holds the client's row (and, on SQLite, the database's write lock) while a PLD
        composition would take seconds.

        Returns:
            The prepared accountant; None for a non-private client or a fast method
            (RDP: composing in the transaction costs well under a millisecond).
        """
        dp = client_dp(client)
        if dp is None or accountant_type(dp.accountant).fast:
            return None
        accountant = self.accountant(client, dp)
        _, delta = self.budget(client, dp)
        await _query(
            accountant, partial(accountant.epsilon_if, mechanism, additional_steps=1, delta=delta)
        )
        return accountant

    async def commit_step(
        self,
        tx: TrainerTransaction,
        client: ClientState,
        *,
        mechanism: StepMechanism,
        seq: int,
        future_id: str,
        dataset_id: str | None = None,
        accountant: PrivacyAccountant | None = None,
    ) -> float:
        """Charge one DP step the worker applied: compose it, write its ledger entry and
        the client's new accountant state, and consume one reserved step of the job.

        Args:
            tx: The transaction that commits the step's effects.
            client: The client, locked and fenced by the caller.
            mechanism: The step's mechanism.
            seq: The job's sequence number.
            future_id: The job's future (its reservation).
            dataset_id: The server-held dataset the step sampled, if any.
            accountant: The caller's up-to-date accountant of this client (the dataset
                runner keeps one across its steps so PLD compositions are reused;
                the worker passes :meth:`prepare_step`'s); it is updated in place.
                None: rebuilt from the client.

        Returns:
            Epsilon after the step.
        """
        dp = client_dp(client)
        if dp is None:
            raise FailedPrecondition(f"training client {client.id} is not private")
        committed = self.accountant(client, dp)
        if accountant is None or accountant.history != committed.history:
            # The caller's copy is stale (a LoadState admitted meanwhile added steps):
            # the stored state is the truth.
            if accountant is not None:
                accountant.restore(committed)
            else:
                accountant = committed
        accountant.record(mechanism)
        _, delta = self.budget(client, dp)
        epsilon = await _query(accountant, partial(accountant.epsilon, delta))
        state_json = json_state(accountant.to_state())
        dp_steps = int(client.dp_steps) + 1
        await tx.set_client_privacy(
            client.id, accountant_state=state_json, epsilon_spent=epsilon, dp_steps=dp_steps
        )
        tx.add_ledger_entry(
            tenant=client.tenant,
            client_id=client.id,
            dp_step=dp_steps,
            seq=seq,
            future_id=future_id,
            mechanism=mechanism,
            delta=delta,
            accountant=dp.accountant,
            epsilon_after=epsilon,
            accountant_state=state_json,
            dataset_id=dataset_id,
        )
        await tx.consume_reserved_step(future_id)
        return epsilon

    async def settle(self, tx: TrainerTransaction, future_id: str) -> None:
        """A job ended with its steps committed: nothing it reserved stays open."""
        await tx.settle_reservation(future_id)

    async def release(self, tx: TrainerTransaction, future_id: str) -> None:
        """A job failed or was dropped: give back what it reserved and did not use."""
        await tx.release_reservation(future_id)

    # ------------------------------------------------------------------ lineage

    async def inherit(
        self,
        tx: TrainerTransaction,
        client: ClientState,
        checkpoint: CheckpointState,
        *,
        future_id: str,
    ) -> None:
        """The client's weights become (or will become) the checkpoint's: merge its
        lineage and compose every DP step it adds. Idempotent.

        Raises:
            FailedPrecondition: A source's ledger does not hold the steps the
                checkpoint says its weights include.
        """
        current = self.lineage(client)
        saved_by = None
        if checkpoint.lineage_json is None:
            saved_by = await tx.client(checkpoint.client_id)
        merged = current.merged(checkpoint_lineage(checkpoint, saved_by), without=client.id)
        if merged == current:
            return
        dp = client_dp(client)
        accountant = self.accountant(client, dp) if dp is not None else None
        events: list[tuple[LineageSource, int]] = []
        for source in merged.sources:
            before = current.source(source.client_id)
            dp_before = before.dp_steps if before is not None else 0
            if before == source:
                continue
            if accountant is not None and source.dp_steps > dp_before:
                entries = await tx.ledger_entries(
                    source.client_id, after=dp_before, upto=source.dp_steps
                )
                if [e.dp_step for e in entries] != list(range(dp_before + 1, source.dp_steps + 1)):
                    raise FailedPrecondition(
                        f"the privacy ledger of training client {source.client_id} does not "
                        f"hold steps {dp_before + 1}..{source.dp_steps} of checkpoint "
                        f"{checkpoint.name!r}; it cannot be loaded"
                    )
                for entry in entries:
                    accountant.record(entry.mechanism)
            events.append((source, dp_before))
        epsilon_after = float(client.epsilon_spent)
        if accountant is not None and dp is not None:
            # The budget's delta is the merged lineage's: the sources just taken in count.
            _, delta = _budget(merged, dp)
            epsilon_after = await _query(accountant, partial(accountant.epsilon, delta))
            await tx.set_client_privacy(
                client.id,
                accountant_state=json_state(accountant.to_state()),
                epsilon_spent=epsilon_after,
            )
        await tx.set_client_lineage(client.id, merged.to_json())
        for source, dp_before in events:
            tx.add_lineage_event(
                tenant=client.tenant,
                client_id=client.id,
                source_client_id=source.client_id,
                checkpoint_id=checkpoint.id,
                future_id=future_id,
                private=source.private,
                dp_steps_before=dp_before,
                dp_steps_after=source.dp_steps,
                steps_after=source.steps,
                epsilon_after=epsilon_after,
            )

    async def history(self, tx: TrainerTransaction, client: ClientState) -> list[HistoryGroup]:
        """Every DP step of the weights' lineage, grouped by (client, mechanism), the
        client's own first; for the DP certificate.

        Raises:
            FailedPrecondition: A ledger does not hold the steps the lineage names.
        """
        groups: list[HistoryGroup] = []
        wanted = [(client.id, int(client.dp_steps))] + [
            (s.client_id, s.dp_steps) for s in self.lineage(client).sources if s.dp_steps
        ]
        for client_id, count in wanted:
            entries = await tx.ledger_entries(client_id, after=0, upto=count)
            if [e.dp_step for e in entries] != list(range(1, count + 1)):
                raise FailedPrecondition(
                    f"privacy ledger of training client {client_id} is inconsistent: "
                    f"{len(entries)} row(s) for {count} DP step(s)"
                )
            counts: dict[StepMechanism, int] = {}
            for entry in entries:
                counts[entry.mechanism] = counts.get(entry.mechanism, 0) + 1
            groups.extend(
                HistoryGroup(client_id=client_id, mechanism=m, steps=n) for m, n in counts.items()
            )
        return groups


_T = TypeVar("_T")


async def _query(accountant: PrivacyAccountant, compute: Callable[[], _T]) -> _T:
    """An accountant query from async code: in place when the method is fast (RDP), in a
    thread otherwise (a PLD composition takes 0.07-8 s), so that one client's accounting
    never stalls the event loop that serves every other request of the process. The
    caller's transaction and locks are held meanwhile, as they would be in place."""
    if accountant.fast:
        return compute()
    return await asyncio.to_thread(compute)


def _budget(lineage: Lineage, dp: DpSettings) -> tuple[float | None, float]:
    budget = _tightest([dp.epsilon_budget, *(s.epsilon_budget for s in lineage.sources)])
    delta = _tightest([dp.delta, *(s.delta for s in lineage.sources)])
    assert delta is not None
    return budget, delta


def client_dp(client: ClientState) -> DpSettings | None:
    """The client's DP settings, None for a non-private client."""
    return DpSettings.from_json(client.dp_json) if client.dp_json is not None else None


def checkpoint_lineage(
    checkpoint: CheckpointState, saved_by: ClientState | None = None
) -> Lineage:
    """The lineage a checkpoint's weights carry.

    Checkpoints saved before lineage was recorded hold only their client's own steps
    (nothing could be inherited then): their accountant state counts them, and the
    saving client (``saved_by``) says whether it was private.
    """
    if checkpoint.lineage_json is not None:
        return Lineage.parse(checkpoint.lineage_json)
    dp_steps = 0
    if checkpoint.accountant_state is not None:
        dp_steps = PrivacyAccountant.from_state(json.loads(checkpoint.accountant_state)).steps
    dp = client_dp(saved_by) if saved_by is not None else None
    return Lineage(
        (
            LineageSource(
                client_id=checkpoint.client_id,
                private=dp is not None or dp_steps > 0,
                dp_steps=dp_steps,
                steps=int(checkpoint.step),
                epsilon_budget=dp.epsilon_budget if dp is not None else None,
                delta=dp.delta if dp is not None else None,
            ),
        )
    )


def client_batches_mechanism(dp: DpSettings) -> StepMechanism:
    """The mechanism of one step over client-supplied batches: no amplification."""
    return StepMechanism.client_batches(dp.noise_multiplier)

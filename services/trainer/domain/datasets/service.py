"""Server-held datasets: upload, read, list, delete, and admission of TrainOnDataset.

Upload tokenises the JSONL with the base model's tokenizer, encrypts the tokenised
records under the tenant's data key (:mod:`.crypto`) and writes them to the object folder
*before* the metadata row commits (a committed row never points at a missing file; a
crash in between leaves an unreferenced ciphertext). Every read filters by tenant, so
another tenant's dataset is NOT_FOUND, indistinguishable from a missing one.

TrainOnDataset is admitted like every trainer job (:meth:`TrainerDomain.admit`), and in the
same transaction the whole run's privacy cost — ``steps`` Poisson-subsampled Gaussian
steps at rate q — is checked against the client's budget, counting every step already
committed or reserved, and reserved. The worker gives one reserved step back with each
step it commits (:mod:`tensafe.trainer.runners.datasets`), so concurrent OptimSteps can
never overspend.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from transformers import AutoTokenizer

from tensafe.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from tensafe.common.futures import Future
from tensafe.common.quotas import quota_exceeded
from tensafe.trainer.base_models import BaseModelInfo, BaseModelRegistry
from tensafe.trainer.domain.commands import TrainOnDataset, UploadHeader, UploadPart
from tensafe.trainer.domain.datasets.crypto import (
    DatasetKeyring,
    decrypt_dataset,
    encrypt_dataset,
)
from tensafe.trainer.domain.datasets.records import (
    TokenizedDataset,
    Tokenizer,
    tokenize_jsonl,
)
from tensafe.trainer.domain.datasets.sampling import resolve_sample_rate
from tensafe.trainer.domain.engine.accounting import StepMechanism
from tensafe.trainer.domain.jobs import JobKind
from tensafe.trainer.domain.ledger import client_dp
from tensafe.trainer.domain.model import ClientRecord, DatasetRecord, DuplicateRecord, Page
from tensafe.trainer.domain.service import Caller, TrainerDomain
from tensafe.trainer.objects import ObjectFolder
from tensafe.trainer.store.sql import TrainerStore, TrainerTransaction

MAX_TRAIN_STEPS = 1_000_000
"""Most steps one TrainOnDataset request may run."""

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAX_REQUEST_ID = 128


@dataclass(frozen=True, kw_only=True)
class SealedDataset:
    """A dataset's records, encrypted and written to the object folder."""

    object_path: str
    sha256: str
    size_bytes: int
    key_id: str
    records: int
    tokens: int


class DatasetVault:
    """Tenant data keys and encrypted dataset objects (used by the API and the workers).

    Args:
        store: The trainer's database.
        objects: The object folder.
        keyring: The deployment's KEK (a start-up requirement, see
            :class:`~tensafe.trainer.config.TrainerConfig`).
    """

    def __init__(
        self, *, store: TrainerStore, objects: ObjectFolder, keyring: DatasetKeyring
    ) -> None:
        self._store = store
        self._objects = objects
        self._keyring = keyring

    async def tenant_key(self, tenant: str) -> tuple[str, bytes]:
        """The tenant's DEK (created and stored wrapped on first use): (key id, key)."""
        keyring = self._keyring
        async with self._store.transaction(read_only=True) as tx:
            wrapped = await tx.dataset_key(tenant)
        if wrapped is None:
            wrapped, _ = keyring.new_tenant_key(tenant)
            try:
                async with self._store.transaction() as tx:
                    tx.add_dataset_key(tenant, wrapped)
            except DuplicateRecord:
                # Another upload of the tenant created it first: use that one.
                pass
            async with self._store.transaction(read_only=True) as tx:
                wrapped = await tx.dataset_key(tenant)
            assert wrapped is not None
        dek = keyring.unwrap(tenant, wrapped)
        return wrapped.key_id, dek

    async def store(
        self, tenant: str, dataset_id: str, dataset: TokenizedDataset
    ) -> SealedDataset:
        """Encrypt and write a dataset's records; returns where and under which key."""
        key_id, dek = await self.tenant_key(tenant)
        sealed = encrypt_dataset(
            dek, dataset.to_bytes(), tenant=tenant, dataset_id=dataset_id, key_id=key_id
        )
        relative = f"datasets/{dataset_id}.tsds"
        sha = await asyncio.to_thread(self._objects.write, relative, sealed)
        return SealedDataset(
            object_path=relative,
            sha256=sha,
            size_bytes=len(sealed),
            key_id=key_id,
            records=dataset.records,
            tokens=dataset.total_tokens,
        )

    async def load(self, row: DatasetRecord) -> TokenizedDataset:
        """Read, verify and decrypt a dataset's records.

        Raises:
            NotFound: The object is missing.
            IntegrityError: The object or its key fails verification.
            FailedPrecondition: The dataset was encrypted under another data key.
        """
        key_id, dek = await self.tenant_key(row.tenant)
        if key_id != row.key_id:
            raise FailedPrecondition(f"dataset {row.id} was encrypted under another data key")
        sealed = await asyncio.to_thread(self._objects.read, row.object_path, sha256=row.sha256)
        plaintext = decrypt_dataset(
            dek, sealed, tenant=row.tenant, dataset_id=row.id, key_id=row.key_id
        )
        return await asyncio.to_thread(TokenizedDataset.from_bytes, plaintext)

    def delete_object(self, object_path: str) -> None:
        """Remove a dataset's ciphertext."""
        self._objects.delete(object_path)


class DatasetService:
    """The dataset RPCs' domain.

    Args:
        store: The trainer's database.
        api: The trainer API (job admission, clients).
        vault: Keys and encrypted objects.
        base_models: The registered base models (their tokenizers).
        max_upload_bytes: Largest accepted JSONL upload.
        max_storage_bytes_per_tenant: Most bytes of encrypted datasets per tenant.
    """

    def __init__(
        self,
        *,
        store: TrainerStore,
        api: TrainerDomain,
        vault: DatasetVault,
        base_models: BaseModelRegistry,
        max_upload_bytes: int,
        max_storage_bytes_per_tenant: int,
    ) -> None:
        self._store = store
        self._api = api
        self._vault = vault
        self._base_models = base_models
        self._max_upload_bytes = max_upload_bytes
        self._max_storage_bytes = max_storage_bytes_per_tenant
        self._tokenizers: dict[str, Tokenizer] = {}

    # ------------------------------------------------------------------ upload

    async def upload(
        self, caller: Caller, parts: AsyncIterator[UploadPart]
    ) -> DatasetRecord:
        """Store a streamed JSONL dataset (header first, then chunks).

        Raises:
            InvalidArgument: A bad header, record or empty dataset (nothing is stored).
            ResourceExhausted: The upload exceeds the configured maximum, or the
                tenant's stored datasets would pass
                ``max_dataset_storage_bytes_per_tenant`` (reason ``QUOTA_EXCEEDED``;
                nothing is stored).
            NotFound: Unknown base model.
        """
        header: UploadHeader | None = None
        content = bytearray()
        async for part in parts:
            if header is None:
                if part.header is None:
                    raise InvalidArgument("header", "the first message must be the header")
                header = part.header
                _check_header(header)
                continue
            if part.chunk is None:
                raise InvalidArgument("header", "only the first message may be a header")
            content.extend(part.chunk)
            if len(content) > self._max_upload_bytes:
                raise ResourceExhausted(
                    f"the upload exceeds the maximum of {self._max_upload_bytes} bytes"
                )
        if header is None:
            raise InvalidArgument("header", "is required")
        request_id = header.request_id or uuid.uuid4().hex
        info = await asyncio.to_thread(self._base_models.get, header.base_model)
        fingerprint = _upload_fingerprint(header, bytes(content))
        existing = await self._by_request(caller.tenant, request_id, fingerprint)
        if existing is not None:
            return existing
        # Fail before tokenising when the tenant is full already; the binding check is
        # the one in the insert transaction below.
        async with self._store.transaction(read_only=True) as tx:
            await self._check_storage(tx, caller.tenant, adding=0)
        tokenizer = await asyncio.to_thread(self._tokenizer, info)
        record_format = header.format
        assert record_format is not None  # _check_header refused an unknown format
        dataset = await asyncio.to_thread(
            tokenize_jsonl,
            bytes(content),
            record_format=record_format,
            tokenizer=tokenizer,
            max_context_length=info.max_context_length,
        )
        dataset_id = uuid.uuid4().hex
        sealed = await self._vault.store(caller.tenant, dataset_id, dataset)
        record = DatasetRecord(
            id=dataset_id,
            tenant=caller.tenant,
            request_id=request_id,
            request_fingerprint=fingerprint,
            name=header.name,
            base_model=info.name,
            format=record_format.value,
            records=sealed.records,
            tokens=sealed.tokens,
            key_id=sealed.key_id,
            object_path=sealed.object_path,
            sha256=sealed.sha256,
            size_bytes=sealed.size_bytes,
            epsilon_budget=header.epsilon_budget or None,
            delta=header.delta if header.epsilon_budget else None,
            created_at=datetime.now(UTC),
        )
        try:
            async with self._store.transaction() as tx:
                await tx.lock_tenant("trainer.datasets", caller.tenant)
                # Under the lock a concurrent upload with this request id has either
                # committed (answer with it, not with a quota error) or not started.
                raced = await tx.dataset_by_request(caller.tenant, request_id)
                if raced is None:
                    await self._check_storage(tx, caller.tenant, adding=record.size_bytes)
                    tx.add_dataset(record)
        except ResourceExhausted:
            self._vault.delete_object(record.object_path)
            raise
        except DuplicateRecord:
            # The same request id raced us and won: drop our copy, answer with its.
            self._vault.delete_object(record.object_path)
            winner = await self._by_request(caller.tenant, request_id, fingerprint)
            if winner is None:
                raise
            return winner
        if raced is not None:
            self._vault.delete_object(record.object_path)
            winner = await self._by_request(caller.tenant, request_id, fingerprint)
            assert winner is not None
            return winner
        return record

    async def _check_storage(self, tx: TrainerTransaction, tenant: str, *, adding: int) -> None:
        stored = await tx.stored_dataset_bytes(tenant)
        if stored + adding > self._max_storage_bytes or stored >= self._max_storage_bytes:
            raise quota_exceeded(
                "max_dataset_storage_bytes_per_tenant",
                self._max_storage_bytes,
                f"{stored} bytes of datasets" + (f" and this one adds {adding}" if adding else ""),
            )

    async def _by_request(
        self, tenant: str, request_id: str, fingerprint: str
    ) -> DatasetRecord | None:
        async with self._store.transaction(read_only=True) as tx:
            row = await tx.dataset_by_request(tenant, request_id)
        if row is not None and row.request_fingerprint != fingerprint:
            raise InvalidArgument(
                "header.request_id",
                "was already used for a different upload",
                reason="REQUEST_ID_REUSED",
            )
        return row

    def _tokenizer(self, info: BaseModelInfo) -> Tokenizer:
        tokenizer = self._tokenizers.get(info.name)
        if tokenizer is None:
            try:
                tokenizer = Tokenizer(AutoTokenizer.from_pretrained(info.path))
            except (OSError, ValueError) as error:
                raise FailedPrecondition(
                    f"base model {info.name} has no usable tokenizer: {error}"
                ) from error
            self._tokenizers[info.name] = tokenizer
        return tokenizer

    # ------------------------------------------------------------------ reads

    async def get(self, caller: Caller, dataset_id: str) -> DatasetRecord:
        """A dataset of the caller's tenant (NotFound otherwise)."""
        async with self._store.transaction(read_only=True) as tx:
            return await tx.get_dataset(caller.tenant, dataset_id)

    async def epsilon_spent(self, row: DatasetRecord) -> float | None:
        """Epsilon every committed step of every client has spent on a dataset with a
        budget, at its delta (None without a budget)."""
        if row.delta is None:
            return None
        async with self._store.transaction(read_only=True) as tx:
            return await self._api.ledger.dataset_epsilon(tx, row)

    async def list(
        self, caller: Caller, *, page_size: int, page_token: str
    ) -> Page[DatasetRecord]:
        """A page of the caller's datasets, newest first (AIP-158)."""
        async with self._store.transaction(read_only=True) as tx:
            return await tx.list_datasets(
                caller.tenant, page_size=page_size, page_token=page_token
            )

    async def delete(self, caller: Caller, dataset_id: str) -> None:
        """Delete a dataset's metadata and ciphertext. A run already reading it finishes
        with the records it loaded; runs queued later fail with NOT_FOUND."""
        async with self._store.transaction() as tx:
            row = await tx.delete_dataset(caller.tenant, dataset_id)
        self._vault.delete_object(row.object_path)

    # ------------------------------------------------------------------ training

    async def train_on_dataset(self, caller: Caller, command: TrainOnDataset) -> Future:
        """Admit a TrainOnDataset run, reserving its whole privacy cost.

        Raises:
            InvalidArgument: Bad rate, steps or Adam parameters.
            NotFound: Unknown client or dataset (or another tenant's).
            FailedPrecondition: A non-private client, or a dataset of another base model.
            BudgetExhausted: The run's steps would exceed the client's budget.
            ResourceExhausted: More steps than ``max_steps_per_job``.
        """
        if not 1 <= command.steps <= MAX_TRAIN_STEPS:
            raise InvalidArgument("steps", f"must be in [1, {MAX_TRAIN_STEPS}]")
        self._api.check_job_steps(command.steps)
        command.adam.get()
        which = command.rate
        if which is None:
            raise InvalidArgument("rate", "give sample_rate or expected_batch_size")
        dataset = await self.get(caller, command.dataset_id)
        client = await self._api.get_client(caller, command.client_id)
        if not client.private:
            raise FailedPrecondition(
                "TrainOnDataset needs a private (DP) training client; this one is non-private"
            )
        if dataset.base_model != client.base_model:
            raise FailedPrecondition(
                f"dataset {dataset.id} was tokenised for {dataset.base_model}, the client "
                f"trains {client.base_model}"
            )
        sample_rate = resolve_sample_rate(
            sample_rate=command.sample_rate if which == "sample_rate" else None,
            expected_batch_size=(
                command.expected_batch_size if which == "expected_batch_size" else None
            ),
            records=int(dataset.records),
        )
        steps = int(command.steps)
        records = int(dataset.records)

        async def within(
            tx: TrainerTransaction, row: ClientRecord, future_id: str, seq: int
        ) -> None:
            dp = client_dp(row)
            if dp is None:
                raise FailedPrecondition("TrainOnDataset needs a private (DP) training client")
            mechanism = StepMechanism.poisson(dp.noise_multiplier, sample_rate)
            # The dataset row as this transaction sees it (a concurrent delete wins).
            dataset_row = await tx.get_dataset(row.tenant, dataset.id)
            await self._api.ledger.reserve(
                tx,
                row,
                dp,
                mechanism=mechanism,
                future_id=future_id,
                seq=seq,
                steps=steps,
                dataset=dataset_row,
            )
            tx.add_dataset_run(
                future_id=future_id,
                tenant=row.tenant,
                client_id=row.id,
                dataset_id=dataset.id,
                sample_rate=sample_rate,
                expected_batch_size=sample_rate * records,
                steps=steps,
            )

        return await self._api.admit(
            caller,
            command.client_id,
            JobKind.TRAIN_ON_DATASET,
            command.request,
            within=within,
        )


def _upload_fingerprint(header: UploadHeader, content: bytes) -> str:
    digest = hashlib.sha256(header.fingerprint_bytes)
    digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def _check_header(header: UploadHeader) -> None:
    """Validate the header before any chunk is read."""
    if not _NAME.match(header.name):
        raise InvalidArgument("header.name", "must match [A-Za-z0-9._-]{1,64}")
    if header.format is None:
        raise InvalidArgument(
            "header.format",
            "must be DATASET_FORMAT_TEXT or DATASET_FORMAT_PROMPT_COMPLETION",
        )
    if len(header.request_id) > _MAX_REQUEST_ID:
        raise InvalidArgument("header.request_id", f"must be at most {_MAX_REQUEST_ID} characters")
    if not math.isfinite(header.epsilon_budget) or header.epsilon_budget < 0:
        raise InvalidArgument("header.epsilon_budget", "must be >= 0 and finite (0: none)")
    if header.epsilon_budget > 0 and not 0.0 < header.delta < 1.0:
        raise InvalidArgument("header.delta", "must be in (0, 1) with epsilon_budget")
    if header.epsilon_budget == 0 and header.delta != 0:
        raise InvalidArgument("header.delta", "is set without epsilon_budget")

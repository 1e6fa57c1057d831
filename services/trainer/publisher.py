"""SaveAdapter: seal a training client's adapter as a TGSP package and publish it.

The worker runs a SaveAdapter job like any other job of the client (in order, under the
client's lease), so the adapter sealed is exactly the one every earlier committed job
produced. :class:`AdapterPublisher` then:

1. takes the adapter from the engine with PEFT's tensor names
   (``adapter_model.safetensors``) and PEFT's ``adapter_config.json``, whose
   ``base_model_name_or_path`` (a folder of this deployment) is replaced by the base
   model's name;
2. builds the DP certificate **from the privacy ledger** (one row per committed DP
   step): epsilon at delta after the last step, the accountant, the noise multiplier,
   the clipping norm, the sampling the accountant assumed (client batches: no
   amplification, with the at-most-once-per-step assumption stated; server-drawn
   Poisson batches: the rate q) and the number of steps. A non-private client gets a
   certificate that says plainly that no guarantee exists;
3. seals it with :func:`tensafe.tgsp.write`: the tenant's KEK wraps the data key, the
   trainer's own Ed25519 key signs (the registry trusts its public key through
   ``TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES``);
4. keeps the sealed bytes under the job's future id before publishing, so that a
   redelivered job publishes the *same* bytes under the same request id and the
   registry returns the version the first attempt created (a re-sealed package would
   differ: fresh data key, new time);
5. publishes to the registry acting for the tenant (``x-tensafe-acting-tenant``).

KEKs: the KEK provider is deployment infrastructure shared by the services that seal
and open packages (``TENSAFE_KEK_PROVIDER``: the registry's PKCS#11 token in
production; in dev mode a local folder, ``TENSAFE_KEK_DIR``, pointing at the registry's
``TENSAFE_REGISTRY_KEK_DIR``). In explicit dev mode a
tenant without a KEK gets one, created explicitly and logged; outside dev mode a
missing KEK is FAILED_PRECONDITION (create it with
``python -m tensafe.registry.admin create-tenant-kek TENANT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tensafe import tgsp
from tensafe.common.config import env_name
from tensafe.common.db import Database
from tensafe.common.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
)
from tensafe.common.registry_client import RegistryClient
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.base_models import BaseModelRegistry
from tensafe.trainer.domain.engine.accounting import BatchSampling
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from tensafe.trainer.domain.ledger import HistoryGroup, PrivacyLedger, PrivacyReport, client_dp
from tensafe.trainer.domain.model import ClientState
from tensafe.trainer.store.models import JobRow, TrainingClientRow
from tensafe.trainer.store.sql import TrainerTransaction

log = logging.getLogger(__name__)

DEV_SIGNING_KEY_FILE = "dev-trainer-signing-key.pem"
"""File under the data dir holding the trainer's dev-mode signing key (dev mode only)."""

CLIENT_BATCHES_ASSUMPTION = (
    "each client-supplied example appears at most once per optimizer step (the server "
    "cannot check how client batches were drawn, so every step is accounted as a full "
    "Gaussian mechanism without amplification)"
)
"""The assumption a client-batch certificate rests on (docs/privacy.md, "What one step
protects")."""

NON_PRIVATE_REASON = (
    "trained by a non-private training client (no DP-SGD): no differential-privacy guarantee exists"
)


def code_version() -> str:
    """``provenance.code_version`` of packages the trainer seals."""
    return f"tensafe-trainer/{importlib.metadata.version('tensafe')}"


def load_signing_key(path: Path | None, *, dev_mode: bool, data_dir: Path) -> tgsp.SigningKey:
    """The trainer's package-signing key.

    Args:
        path: ``TENSAFE_TRAINER_SIGNING_KEY_FILE`` (PKCS#8 PEM, mode 0600).
        dev_mode: Whether explicit dev mode is on.
        data_dir: Where the dev-mode key is created when ``path`` is unset.

    Raises:
        ConfigError: No key outside dev mode, or an unreadable, group/world-readable or
            malformed key file.
    """
    setting_name = env_name("trainer_signing_key_file")
    if path is None:
        if not dev_mode:
            raise ConfigError(
                setting_name,
                "required outside dev mode when TENSAFE_REGISTRY_URL is set: the trainer "
                "signs the packages it publishes and never generates a key silently",
            )
        path = data_dir / DEV_SIGNING_KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(tgsp.SigningKey.generate().to_pem())
        log.warning(
            "DEV MODE: adapters are signed with a development-only trainer key in %s; the "
            "registry accepts them only if it trusts its public key; set %s in production",
            path,
            setting_name,
        )
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(setting_name, f"{path} must not be readable by group or others")
        return tgsp.SigningKey.from_pem(path.read_bytes())
    except OSError as error:
        raise ConfigError(setting_name, f"cannot read {path}: {error}") from error
    except InvalidArgument as error:
        raise ConfigError(setting_name, f"{path}: {error.description}") from error


def dp_certificate(
    client: ClientState,
    history: list[HistoryGroup],
    report: PrivacyReport | None,
) -> tgsp.DPGuarantee | tgsp.NoDPGuarantee:
    """The DP certificate of a client's adapter, from the privacy ledger.

    Args:
        client: The training client.
        history: Every DP step of its weights' lineage, grouped
            (:meth:`PrivacyLedger.history`).
        report: What the weights have spent (:meth:`PrivacyLedger.report`); None for a
            non-private client.

    Returns:
        The guarantee the ledger supports (or the statement that there is none).

    Raises:
        FailedPrecondition: The ledger and the client disagree (a corrupted ledger is
            never papered over with a certificate).
    """
    dp = client_dp(client)
    if dp is None or report is None:
        return tgsp.NoDPGuarantee(reason=NON_PRIVATE_REASON)
    total = sum(group.steps for group in history)
    if total != report.steps:
        raise FailedPrecondition(
            f"privacy ledger of training client {client.id} is inconsistent: {total} "
            f"step(s) in the lineage's ledgers for {report.steps} composed"
        )
    methods = {group.mechanism.sampling for group in history}
    rates = {
        group.mechanism.sampling_probability
        for group in history
        if group.mechanism.sampling is BatchSampling.POISSON
    }
    sampling: tgsp.Sampling
    assumptions: tuple[str, ...] = ()
    if methods == {BatchSampling.POISSON} and len(rates) == 1:
        sampling = tgsp.PoissonSampling(rate=rates.pop())
    else:
        sampling = tgsp.ClientBatches()
        assumptions = (CLIENT_BATCHES_ASSUMPTION,)
        if BatchSampling.POISSON in methods:
            poisson = sum(g.steps for g in history if g.mechanism.sampling is BatchSampling.POISSON)
            assumptions += (
                f"{poisson} of {total} steps used server-drawn Poisson batches "
                f"(rates {', '.join(f'{rate:g}' for rate in sorted(rates))}); epsilon "
                "composes every step with the sampling it actually had",
            )
    if report.inherited_steps:
        sources = sorted({g.client_id for g in history if g.client_id != client.id})
        assumptions += (
            f"the weights continue {report.inherited_steps} DP step(s) of training "
            f"client(s) {', '.join(sources)} (checkpoints loaded); epsilon composes them",
        )
    for source in report.non_private_sources:
        assumptions += (
            f"the weights continue {source.steps} optimizer step(s) of training client "
            f"{source.client_id} trained WITHOUT differential privacy; epsilon does not "
            "cover the data of those steps",
        )
    return tgsp.DPGuarantee(
        epsilon=report.epsilon,
        delta=report.delta,
        accountant=dp.accountant,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sampling=sampling,
        steps=total,
        assumptions=assumptions,
        history=tuple(
            tgsp.StepGroup(
                training_client_id=group.client_id,
                sampling=(
                    tgsp.PoissonSampling(rate=group.mechanism.sampling_probability)
                    if group.mechanism.sampling is BatchSampling.POISSON
                    else tgsp.ClientBatches()
                ),
                noise_multiplier=group.mechanism.noise_multiplier,
                steps=group.steps,
            )
            for group in history
        ),
    )


def peft_config_text(engine: LoraTrainingEngine, base_model_name: str) -> str:
    """The adapter's ``adapter_config.json``, naming the base model by its name.

    The engine's config names the base model's folder on this worker, which means
    nothing to a reader of the package; the manifest's base model id is the name.
    """
    config = engine.adapter_config()
    config["base_model_name_or_path"] = base_model_name
    return json.dumps(config, indent=2, sort_keys=True)


class AdapterPublisher:
    """Seals and publishes adapters for the worker (see the module docstring).

    Args:
        database: The trainer's database (the privacy ledger).
        base_models: The base models (name and weights digest).
        registry: The registry client (the trainer's service credentials).
        kek_provider: The deployment's KEK provider.
        signing_key: The trainer's package-signing key.
        staging_dir: Where sealed packages wait until their job commits.
        dev_mode: Whether a missing tenant KEK may be created.
        ledger: The privacy ledger (the certificate's lineage).
    """

    def __init__(
        self,
        *,
        database: Database,
        base_models: BaseModelRegistry,
        registry: RegistryClient,
        kek_provider: tgsp.KekProvider,
        signing_key: tgsp.SigningKey,
        staging_dir: Path,
        dev_mode: bool,
        ledger: PrivacyLedger,
    ) -> None:
        self._db = database
        self._ledger = ledger
        self._base_models = base_models
        self._registry = registry
        self._kek = kek_provider
        self._signing_key = signing_key
        self._staging = staging_dir
        self._dev_mode = dev_mode
        staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def close(self) -> None:
        """Close the registry client and the KEK provider's session."""
        try:
            await self._registry.close()
        finally:
            self._kek.close()

    def _staged_path(self, future_id: str) -> Path:
        return self._staging / f"{uuid.UUID(hex=future_id).hex}.tgsp"

    async def publish(
        self,
        *,
        job: JobRow,
        client: TrainingClientRow,
        engine: LoraTrainingEngine,
        request: pb.SaveAdapterRequest,
    ) -> pb.SaveAdapterResult:
        """Seal the engine's adapter (or reuse this job's sealed bytes) and publish it.

        Args:
            job: The SaveAdapter job (its future id is the idempotency key).
            client: The training client, as committed before this job.
            engine: The client's engine, at the client's committed state.
            request: The job's request.

        Returns:
            The registry's name, version and package digest.

        Raises:
            FailedPrecondition: No KEK for the tenant outside dev mode; an inconsistent
                ledger.
            TenSafeError: The registry's refusal, typed.
        """
        staged = self._staged_path(job.future_id)
        package: bytes | None = None
        if staged.exists():
            package = await asyncio.to_thread(self._reuse, staged, job.tenant)
        if package is None:
            package = await self._seal(job, client, engine, request.adapter_name)
            await asyncio.to_thread(_write_private, staged, package)
        version = await self._registry.publish(
            package,
            adapter_name=request.adapter_name,
            request_id=job.future_id,
            acting_tenant=job.tenant,
        )
        log.info(
            "published adapter %s v%d (%s) for training client %s",
            version.adapter_name,
            version.version,
            version.package_sha256,
            client.id,
        )
        return pb.SaveAdapterResult(
            adapter_name=version.adapter_name,
            version=version.version,
            package_sha256=version.package_sha256,
        )

    def forget(self, future_id: str) -> None:
        """Drop a job's sealed bytes once its result is committed."""
        self._staged_path(future_id).unlink(missing_ok=True)

    def _reuse(self, staged: Path, tenant: str) -> bytes | None:
        package = staged.read_bytes()
        try:
            tgsp.verify(
                package, trusted_keys=[self._signing_key.verifying_key], expected_tenant=tenant
            )
        except (IntegrityError, InvalidArgument) as error:
            # A torn or foreign file: seal again (the registry has not seen these bytes
            # unless they verified, so a fresh package cannot clash with them).
            log.warning("discarding staged package %s: %s", staged, error)
            staged.unlink(missing_ok=True)
            return None
        return package

    async def _seal(
        self, job: JobRow, client: TrainingClientRow, engine: LoraTrainingEngine, name: str
    ) -> bytes:
        async with self._db.transaction(read_only=True) as session:
            tx = TrainerTransaction(session)
            row = await tx.client(client.id)
            assert row is not None
            history = await self._ledger.history(tx, row)
            report = self._ledger.report(row)
        certificate = dp_certificate(row, history, report)
        info = await asyncio.to_thread(self._base_models.get, client.base_model)
        await asyncio.to_thread(self._ensure_kek, job.tenant)
        tensors = await asyncio.to_thread(engine.adapter_tensors)
        lora = tgsp.LoraSpec.from_peft_adapter_config(peft_config_text(engine, info.name))
        return await asyncio.to_thread(
            tgsp.write,
            weights=tensors,
            adapter=tgsp.AdapterRef(adapter_id=name, version=f"step-{engine.step}"),
            base_model=tgsp.BaseModelRef(model_id=info.name, weights_sha256=info.weights_sha256),
            lora=lora,
            dp_certificate=certificate,
            provenance=tgsp.Provenance(
                tenant_id=job.tenant,
                training_client_id=client.id,
                code_version=code_version(),
                created_at=datetime.now(UTC),
            ),
            kek_provider=self._kek,
            signing_key=self._signing_key,
        )

    def _ensure_kek(self, tenant: str) -> None:
        if self._kek.has_tenant_kek(tenant):
            return
        if not self._dev_mode:
            raise FailedPrecondition(
                f"tenant {tenant} has no key-encryption key; create it with "
                f"`python -m tensafe.registry.admin create-tenant-kek {tenant}`",
                reason="TENANT_KEK_MISSING",
            )
        with contextlib.suppress(AlreadyExists):
            kek_id = self._kek.create_tenant_kek(tenant)
            log.warning("DEV MODE: created key-encryption key %s for tenant %s", kek_id, tenant)


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)

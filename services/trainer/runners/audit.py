"""The worker side of an AuditPrivacy job.

An audit is not a training client's job: it runs on a lane of its own (its job row's
``client_id`` is its future id and its ``seq`` is 1), takes no lease, changes no client,
ledger or budget, and its only effect is the future's result. So at-least-once delivery
needs no fencing beyond the job row: a job already done is only acked, a redelivery of
an unfinished one runs the audit again (the result of a shadow run depends on fresh DP
noise anyway), and a result that arrives after the future was cancelled is dropped.

An audit holds its worker for the length of the shadow run: every step runs the model
over the included canaries (as data) and, for white-box canaries, computes all m canary
gradients, so a step costs about 1.5 m sequences of forward and backward (seconds per
step for the bench's tiny model at m = 1000; see ``bench/privacy_audit.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tensafe.common.db import Database
from tensafe.common.errors import FailedPrecondition, TenSafeError
from tensafe.common.futures import FutureStatus, SqlFutureStore
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer import serde
from tensafe.trainer.base_models import BaseModelRegistry
from tensafe.trainer.domain.audit.service import execute_audit
from tensafe.trainer.store import repository as repo
from tensafe.trainer.store.models import JobRow

log = logging.getLogger(__name__)

MAX_UNEXPECTED_FAILURES = 5
"""Deliveries after which an audit that keeps failing unexpectedly fails its future."""


async def run_audit_job(
    job: JobRow,
    *,
    database: Database,
    futures: SqlFutureStore,
    base_models: BaseModelRegistry,
    deliveries: int,
) -> None:
    """Run one delivered AuditPrivacy job to its committed outcome.

    Args:
        job: The job row (kind ``trainer.audit_privacy``).
        database: The trainer's database.
        futures: The futures store.
        base_models: The registered base models.
        deliveries: How often the message was delivered (this one included).
    """
    async with database.transaction() as session:
        current = await repo.get_job(session, job.future_id)
        if current is None or current.status != repo.JOB_QUEUED:
            return
        future = await futures.get(job.tenant, job.future_id, session=session)
        if future.status is FutureStatus.CANCELLED:
            await repo.finish_job(session, job.future_id)
            return
        await futures.mark_running(job.tenant, job.future_id, session=session)
    request = pb.AuditPrivacyRequest.FromString(job.payload)
    try:
        info = await asyncio.to_thread(base_models.get, request.base_model)
        report = await asyncio.to_thread(execute_audit, serde.audit_privacy(request), info)
        result = serde.audit_report_to_proto(report)
    except TenSafeError as error:
        await _finish(job, futures=futures, database=database, error=error)
        return
    except Exception as error:
        if deliveries < MAX_UNEXPECTED_FAILURES:
            raise
        log.exception("audit %s failed %d times", job.future_id, deliveries)
        internal = TenSafeError(f"audit failed repeatedly ({type(error).__name__})")
        await _finish(job, futures=futures, database=database, error=internal)
        return
    await _finish(job, futures=futures, database=database, result=result)


async def _finish(
    job: JobRow,
    *,
    futures: SqlFutureStore,
    database: Database,
    result: pb.AuditPrivacyResult | None = None,
    error: TenSafeError | None = None,
) -> None:
    async with database.transaction() as session:
        # FailedPrecondition: the future finished meanwhile (cancelled); drop the outcome.
        with contextlib.suppress(FailedPrecondition):
            if result is not None:
                await futures.succeed(
                    job.tenant, job.future_id, result=serde.pack_result(result), session=session
                )
            elif error is not None:
                await futures.fail(
                    job.tenant,
                    job.future_id,
                    code=error.code,
                    message=error.message,
                    reason=error.reason,
                    session=session,
                )
        await repo.finish_job(session, job.future_id)

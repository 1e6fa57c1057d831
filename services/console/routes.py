"""The console's pages: each handler reads the signed-in user's session, makes the gRPC
calls any client would make with the user's token, and renders a template.

Nothing here decides who may see what: the services do, and their answer is shown as is
(NOT_FOUND is a 404 page, PERMISSION_DENIED a 403 page, UNAUTHENTICATED the sign-in
form).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web
from google.protobuf import timestamp_pb2

from tensafe import tgsp
from tensafe.common.errors import (
    IntegrityError,
    InvalidArgument,
    PermissionDenied,
    TenSafeError,
    Unauthenticated,
)
from tensafe.console.backend import Backend
from tensafe.console.config import ConsoleConfig
from tensafe.console.session import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    new_login_nonce,
)
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SESSION_KEY = web.RequestKey("session", Session)
"""Where the session middleware leaves the caller's session on the request."""

PAGE_SIZE = 50
"""Rows per page of a list (the services' default page)."""

LIST_ALL_PAGE = 1000
"""Page size when a page shows every row (the services' maximum)."""

ACCOUNTANTS = {pb.ACCOUNTANT_RDP: "RDP", pb.ACCOUNTANT_PLD: "PLD"}
STATES = {pb.TRAINING_CLIENT_STATE_ACTIVE: "active", pb.TRAINING_CLIENT_STATE_DELETED: "deleted"}
FORMATS = {pb.DATASET_FORMAT_TEXT: "text", pb.DATASET_FORMAT_PROMPT_COMPLETION: "prompt/completion"}


def environment() -> jinja2.Environment:
    """The template environment (autoescaped HTML)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tensafe.console", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        enable_async=False,
    )
    env.filters["eps"] = format_epsilon
    env.filters["time"] = format_time
    return env


def format_epsilon(value: float) -> str:
    """An ε as the pages print it (∞ for a non-private client)."""
    if math.isinf(value):
        return "∞"
    return f"{value:.3f}"


def format_time(value: timestamp_pb2.Timestamp) -> str:
    """A protobuf timestamp in UTC, to the second."""
    if not value.seconds and not value.nanos:
        return "—"
    moment = datetime.fromtimestamp(value.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def budget_view(spent: float, budget: float, private: bool) -> dict[str, Any]:
    """What an ε bar shows: spent, budget, the share used (None without a budget)."""
    share = None
    if private and budget > 0 and math.isfinite(spent):
        share = min(spent / budget, 1.0)
    return {"spent": spent, "budget": budget, "private": private, "share": share}


def dp_view(client: pb.TrainingClient, spent: pb.PrivacySpent) -> dict[str, Any]:
    """A training client's DP settings and privacy spent, for the list and run pages."""
    return {
        "private": client.private,
        "noise_multiplier": spent.noise_multiplier if client.private else None,
        "max_grad_norm": client.dp.max_grad_norm if client.private else None,
        "delta": spent.delta if client.private else None,
        "accountant": ACCOUNTANTS.get(spent.accountant, "—") if client.private else "—",
        "budget": budget_view(spent.epsilon, spent.epsilon_budget, client.private),
        "steps": spent.steps,
        "inherited_steps": spent.inherited_steps,
        "non_private_steps": spent.non_private_steps,
    }


def chart_points(steps: list[pb.TrainingStep]) -> list[list[float | None]]:
    """The chart's ``[step, ε, loss]`` points: the steps the client's current weights
    took since the last LoadState that took the step counter back (the chart's x axis
    must grow; earlier steps belong to weights the client no longer has)."""
    start = 0
    for index in range(1, len(steps)):
        if steps[index].step <= steps[index - 1].step:
            start = index
    return [
        [
            step.step,
            step.epsilon if step.private else None,
            step.loss if step.has_loss else None,
        ]
        for step in steps[start:]
    ]


def progress_json(
    client: pb.TrainingClient, spent: pb.PrivacySpent, steps: list[pb.TrainingStep]
) -> dict[str, Any]:
    """The run page's poll answer: the run's counters and its whole chart."""
    epsilon = spent.epsilon if client.private and math.isfinite(spent.epsilon) else None
    return {
        "id": client.id,
        "step": client.step,
        "epsilon": epsilon,
        "epsilon_budget": spent.epsilon_budget or None,
        "dp_steps": spent.steps,
        "state": STATES.get(client.state, "unknown"),
        "points": chart_points(steps),
    }


CHECKPOINT_KINDS = {pb.CHECKPOINT_KIND_STATE: "state", pb.CHECKPOINT_KIND_SAMPLER: "sampler"}


def certificate_view(manifest: tgsp.Manifest) -> dict[str, Any]:
    """The DP certificate of a verified package, for its page."""
    certificate = manifest.dp_certificate
    if isinstance(certificate, tgsp.NoDPGuarantee):
        return {"private": False, "reason": certificate.reason}
    sampling = certificate.sampling
    return {
        "private": True,
        "epsilon": certificate.epsilon,
        "delta": certificate.delta,
        "accountant": certificate.accountant,
        "noise_multiplier": certificate.noise_multiplier,
        "max_grad_norm": certificate.max_grad_norm,
        "steps": certificate.steps,
        "sampling": (
            f"Poisson, rate {sampling.rate:g}"
            if isinstance(sampling, tgsp.PoissonSampling)
            else "client batches (no amplification)"
        ),
        "assumptions": list(certificate.assumptions),
        "history": [
            {
                "training_client_id": group.training_client_id,
                "steps": group.steps,
                "noise_multiplier": group.noise_multiplier,
            }
            for group in certificate.history
        ],
    }


def redirect(location: str) -> web.Response:
    """A 303 See Other to ``location`` (after a form, or to sign in)."""
    return web.Response(status=303, headers={"Location": location})


def _positive_int(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidArgument(name, f"must be a positive integer, got {raw!r}")
    return int(raw)


class ConsoleRoutes:
    """The console's pages, over a :class:`Backend`.

    Args:
        config: Cookie and polling settings.
        backend: The gRPC clients.
    """

    def __init__(self, config: ConsoleConfig, backend: Backend) -> None:
        self._config = config
        self._backend = backend
        self._templates = environment()

    def table(self) -> list[web.AbstractRouteDef]:
        """The routes."""
        return [
            web.get("/", self.home),
            web.get("/healthz", self.healthz),
            web.get("/login", self.login_form),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
            web.get("/runs", self.runs),
            web.get("/runs/{client_id}", self.run),
            web.get("/runs/{client_id}/progress.json", self.run_progress),
            web.get("/datasets", self.datasets),
            web.get("/registry", self.adapters),
            web.get("/registry/{adapter}", self.adapter),
            web.get("/registry/{adapter}/{version}", self.package),
            web.get("/audit", self.audit),
            web.post("/audit/verify", self.verify_audit),
            web.get("/privacy-audits", self.privacy_audits),
        ]

    # -- rendering ---------------------------------------------------------------------

    def render(
        self,
        request: web.Request,
        template: str,
        context: Mapping[str, Any],
        *,
        status: int = 200,
    ) -> web.Response:
        """Render a page; the layout gets the session (if any) and its CSRF token."""
        session = request.get(SESSION_KEY)
        html = self._templates.get_template(template).render(
            session=session,
            csrf_field=CSRF_FIELD,
            csrf_token=session.csrf_token if session is not None else "",
            path=request.path,
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html")

    def error_page(
        self, request: web.Request, status: int, title: str, message: str
    ) -> web.Response:
        """A page for an error, with its HTTP status."""
        return self.render(
            request, "error.html", {"title": title, "message": message}, status=status
        )

    # -- sign-in -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        """Liveness and readiness: the process serves HTTP (it holds no other state)."""
        return web.Response(text="ok")

    async def home(self, request: web.Request) -> web.StreamResponse:
        """The training clients are the front page."""
        return redirect("/runs")

    async def login_form(
        self, request: web.Request, *, error: str = "", status: int = 200
    ) -> web.Response:
        """The sign-in form with its double-submit nonce: the browser's current one if it
        has one (two tabs, or a favicon fetch redirected here, must not invalidate the
        form on screen), else a fresh one."""
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if len(nonce) < 32:
            nonce = new_login_nonce()
        response = self.render(
            request, "login.html", {"login_nonce": nonce, "error": error}, status=status
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            httponly=True,
            secure=self._config.secure_cookie,
            samesite="Strict",
            path="/login",
            max_age=3600,
        )
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Exchange the API key for an access token; the token becomes the session."""
        form = await request.post()
        api_key = str(form.get("api_key", "")).strip()
        if not api_key:
            return await self.login_form(request, error="Enter an API key.", status=400)
        try:
            exchanged = await self._backend.exchange_api_key(api_key)
        except (Unauthenticated, InvalidArgument):
            return await self.login_form(
                request, error="That API key was not accepted.", status=401
            )
        response = redirect("/runs")
        lifetime = max(int(exchanged.expire_time.seconds - datetime.now(UTC).timestamp()), 1)
        response.set_cookie(
            SESSION_COOKIE,
            exchanged.access_token,
            httponly=True,
            secure=self._config.secure_cookie,
            samesite="Strict",
            path="/",
            max_age=lifetime,
        )
        response.del_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """Revoke the session's token at auth and drop the cookie."""
        session = request[SESSION_KEY]
        # An already expired or revoked token is signed out either way.
        if session.token_id:
            with contextlib.suppress(Unauthenticated):
                await self._backend.revoke_token(session.token_id, session.token)
        response = redirect("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # -- training clients --------------------------------------------------------------

    async def runs(self, request: web.Request) -> web.StreamResponse:
        """The tenant's training clients, each with its privacy spent."""
        token = request[SESSION_KEY].token
        page_token = request.query.get("page_token", "")
        page = await self._backend.training_clients(
            token, page_size=PAGE_SIZE, page_token=page_token
        )
        spent = await asyncio.gather(
            *(self._backend.privacy_spent(c.id, token) for c in page.training_clients)
        )
        rows = [
            {
                "id": client.id,
                "base_model": client.base_model,
                "step": client.step,
                "state": STATES.get(client.state, "unknown"),
                "created": client.create_time,
                "dp": dp_view(client, privacy),
            }
            for client, privacy in zip(page.training_clients, spent, strict=True)
        ]
        return self.render(
            request, "runs.html", {"rows": rows, "next_page_token": page.next_page_token}
        )

    async def _steps(self, client_id: str, token: str) -> list[pb.TrainingStep]:
        """Every committed step of a client, in commit order (the trainer's history)."""
        steps: list[pb.TrainingStep] = []
        page_token = ""
        while True:
            page = await self._backend.training_steps(
                client_id, token, page_size=LIST_ALL_PAGE, page_token=page_token
            )
            steps.extend(page.steps)
            page_token = page.next_page_token
            if not page_token:
                return steps

    async def _progress(
        self, client_id: str, token: str
    ) -> tuple[pb.TrainingClient, pb.PrivacySpent, dict[str, Any]]:
        client = await self._backend.training_client(client_id, token)
        spent, steps = await asyncio.gather(
            self._backend.privacy_spent(client.id, token), self._steps(client.id, token)
        )
        return client, spent, progress_json(client, spent, steps)

    async def run(self, request: web.Request) -> web.StreamResponse:
        """One training client: settings, privacy spent and lineage, loss and ε against
        steps, its checkpoints."""
        token = request[SESSION_KEY].token
        client, spent, progress = await self._progress(request.match_info["client_id"], token)
        page = await self._backend.checkpoints(
            client.id, token, page_size=PAGE_SIZE, page_token=request.query.get("page_token", "")
        )
        checkpoints = [
            {
                "path": checkpoint.path,
                "kind": CHECKPOINT_KINDS.get(checkpoint.kind, "unknown"),
                "name": checkpoint.name,
                "step": checkpoint.step,
                "created": checkpoint.create_time,
                "lineage": list(checkpoint.lineage_client_ids),
            }
            for checkpoint in page.checkpoints
        ]
        return self.render(
            request,
            "run.html",
            {
                "client": client,
                "state": STATES.get(client.state, "unknown"),
                "dp": dp_view(client, spent),
                "lora_targets": ", ".join(client.lora.target_modules) or "model default",
                "progress": json.dumps(progress),
                "poll_ms": int(self._config.console_poll_seconds * 1000),
                "checkpoints": checkpoints,
                "next_page_token": page.next_page_token,
            },
        )

    async def run_progress(self, request: web.Request) -> web.StreamResponse:
        """The run's counters and its loss and ε history, polled by its chart."""
        token = request[SESSION_KEY].token
        _, _, progress = await self._progress(request.match_info["client_id"], token)
        return web.json_response(progress, headers={"Cache-Control": "no-store"})

    # -- datasets ----------------------------------------------------------------------

    async def datasets(self, request: web.Request) -> web.StreamResponse:
        """The tenant's server-held datasets with their own budgets."""
        page = await self._backend.datasets(
            request[SESSION_KEY].token,
            page_size=PAGE_SIZE,
            page_token=request.query.get("page_token", ""),
        )
        rows = [
            {
                "dataset": dataset,
                "format": FORMATS.get(dataset.format, "unknown"),
                "budget": budget_view(
                    dataset.epsilon_spent, dataset.epsilon_budget, dataset.epsilon_budget > 0
                ),
            }
            for dataset in page.datasets
        ]
        return self.render(
            request, "datasets.html", {"rows": rows, "next_page_token": page.next_page_token}
        )

    # -- registry ----------------------------------------------------------------------

    async def adapters(self, request: web.Request) -> web.StreamResponse:
        """The tenant's adapters, their latest versions and aliases."""
        page = await self._backend.adapters(
            request[SESSION_KEY].token,
            page_size=PAGE_SIZE,
            page_token=request.query.get("page_token", ""),
        )
        return self.render(
            request,
            "adapters.html",
            {"adapters": list(page.adapters), "next_page_token": page.next_page_token},
        )

    async def adapter(self, request: web.Request) -> web.StreamResponse:
        """One adapter: its aliases and versions."""
        token = request[SESSION_KEY].token
        name = request.match_info["adapter"]
        adapter, versions = await asyncio.gather(
            self._backend.adapter(name, token),
            self._backend.versions(
                name, token, page_size=PAGE_SIZE, page_token=request.query.get("page_token", "")
            ),
        )
        aliases_of: dict[int, list[str]] = {}
        for alias, version in sorted(adapter.aliases.items()):
            aliases_of.setdefault(version, []).append(alias)
        return self.render(
            request,
            "adapter.html",
            {
                "adapter": adapter,
                "versions": list(versions.versions),
                "aliases_of": aliases_of,
                "next_page_token": versions.next_page_token,
            },
        )

    async def package(self, request: web.Request) -> web.StreamResponse:
        """A package: downloaded and verified here against the registry's signing keys,
        then its manifest, signer and DP certificate."""
        token = request[SESSION_KEY].token
        name = request.match_info["adapter"]
        version = _positive_int(request, "version")
        (record, package), keys = await asyncio.gather(
            self._backend.download(name, version, token), self._backend.signing_keys(token)
        )
        signer = tgsp.signer_key_id(package)
        try:
            trusted = [tgsp.VerifyingKey.from_raw(key.public_key) for key in keys]
            manifest = tgsp.verify(
                package, trusted_keys=trusted, expected_tenant=request[SESSION_KEY].tenant_id
            )
        except IntegrityError as error:
            verification = {"ok": False, "reason": error.message}
            manifest = tgsp.inspect(package)
        else:
            verification = {"ok": True, "reason": ""}
        return self.render(
            request,
            "package.html",
            {
                "record": record,
                "signer": signer,
                "verification": verification,
                "certificate": certificate_view(manifest),
                "manifest": manifest,
                "manifest_json": json.dumps(manifest.to_json(), indent=2, sort_keys=True),
            },
        )

    # -- audit -------------------------------------------------------------------------

    async def audit(self, request: web.Request) -> web.StreamResponse:
        """One page of the tenant's audit events, filtered by kind."""
        return await self._audit_page(request, verdict=None)

    async def verify_audit(self, request: web.Request) -> web.StreamResponse:
        """Verify the audit chain; htmx gets the result alone, a plain form the page."""
        verdict: dict[str, Any]
        try:
            result = await self._backend.verify_audit_log(request[SESSION_KEY].token)
        except PermissionDenied as error:
            # The chain interleaves every tenant's entries, so auth lets only platform
            # admins walk it; a tenant is told so in place of a verdict.
            verdict = {"allowed": False, "reason": error.message}
        else:
            verdict = {
                "allowed": True,
                "ok": result.ok,
                "entries_checked": result.entries_checked,
                "first_bad_seq": result.first_bad_seq,
                "reason": result.reason,
            }
        if request.headers.get("HX-Request") == "true":
            return self.render(request, "audit_verdict.html", {"verdict": verdict})
        return await self._audit_page(request, verdict=verdict)

    async def _audit_page(
        self, request: web.Request, *, verdict: Mapping[str, Any] | None
    ) -> web.Response:
        kind = request.query.get("kind", "").strip()
        page = await self._backend.audit_events(
            request[SESSION_KEY].token,
            page_size=PAGE_SIZE,
            page_token=request.query.get("page_token", ""),
        )
        events = [e for e in page.events if not kind or e.kind.startswith(kind)]
        return self.render(
            request,
            "audit.html",
            {
                "events": events,
                "kind": kind,
                "page_events": len(page.events),
                "next_page_token": page.next_page_token,
                "verdict": verdict,
            },
        )

    # -- privacy audits ----------------------------------------------------------------

    async def privacy_audits(self, request: web.Request) -> web.StreamResponse:
        """The empirical privacy audits run, each bound beside the ε it tests."""
        page = await self._backend.futures(
            request[SESSION_KEY].token,
            kind="trainer.audit_privacy",
            page_size=PAGE_SIZE,
            page_token=request.query.get("page_token", ""),
        )
        rows = []
        for future in page.futures:
            row: dict[str, Any] = {"future": future, "result": None}
            if future.status == common_pb2.FUTURE_STATUS_SUCCEEDED:
                result = pb.AuditPrivacyResult()
                future.result.Unpack(result)
                row["result"] = result
                row["refuted"] = result.epsilon_lower_bound > result.claimed_epsilon
            row["status"] = (
                common_pb2.FutureStatus.Name(future.status).removeprefix("FUTURE_STATUS_").lower()
            )
            rows.append(row)
        return self.render(
            request,
            "privacy_audits.html",
            {"rows": rows, "next_page_token": page.next_page_token},
        )


def error_status(error: TenSafeError) -> tuple[int, str]:
    """The HTTP status and title of a service's error."""
    statuses = {
        "NOT_FOUND": (404, "Not found"),
        "PERMISSION_DENIED": (403, "Not allowed"),
        "INVALID_ARGUMENT": (400, "Bad request"),
        "FAILED_PRECONDITION": (409, "Not possible now"),
        "RESOURCE_EXHAUSTED": (429, "Too many requests"),
        "UNAVAILABLE": (503, "A service is unavailable"),
        "DEADLINE_EXCEEDED": (504, "A service did not answer in time"),
        "DATA_LOSS": (502, "Integrity check failed"),
    }
    return statuses.get(error.code.value, (500, "Something went wrong"))

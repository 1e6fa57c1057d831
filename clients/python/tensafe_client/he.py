"""HE-LoRA from the SDK: the adapter's delta on encrypted activations, computed remotely.

Three layers, each usable on its own:

- :class:`HeRuntimeRpc`: the ``tensafe.he.v1.HeRuntimeService`` calls with typed errors,
  and the chunked streams of CreateSession (Galois keys) and ApplyLora (ciphertexts).
- :class:`HeLoraSession`: creates the CKKS keys **locally**
  (:class:`tensafe.helora.client.HeLoraClient` keeps the secret key), compiles the plan
  with the same compiler as the runtime, uploads only public material (the framed
  parameter set and the Galois keys for exactly the plan's rotation steps), checks that
  the runtime's plan is the one it compiled, then per call encrypts activations, calls
  ApplyLora and decrypts the delta.
- :class:`HeLoraModel`: wraps a local transformers model (the base model runs in
  plaintext on the client) with forward hooks on the base ``nn.Linear`` modules the
  adapter adapts, so each adapted layer's output gets ``(alpha/r)·x·A·B`` computed by
  the runtime on encrypted ``x`` and added after decryption. ``generate`` works as on
  the plain model.

What crosses the wire is framed by :mod:`tensafe.helora.wire`: PARAMETERS, GALOIS_KEYS
and CIPHERTEXT blobs, nothing else (there is no frame for a secret key).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tensafe.client.channels import OwnedChannels
from tensafe.client.he_verify import DeltaVerifier
from tensafe.client.retry import call_with_retry
from tensafe.client.training import ChannelOptions, authenticated_channels
from tensafe.common import errors
from tensafe.helora.client import HeLoraClient
from tensafe.helora.params import CkksParams, compact_params
from tensafe.helora.plan import (
    OpCounts,
    Packing,
    Plan,
    Variant,
    choose_plan,
    compile_plan,
    shared_input_offsets,
)
from tensafe.proto.he.v1 import he_service_pb2 as pb
from tensafe.proto.he.v1 import he_service_pb2_grpc

Result = TypeVar("Result")

CHUNK_BYTES = 1024 * 1024
"""Bytes per streamed chunk of keys or ciphertexts (1 MiB, far under message limits)."""

INLINE_MAX_BYTES = 2 * 1024 * 1024
"""Calls whose ciphertexts total at most this go in one message (``ApplyLoraInline``):
a generation step (d = 4096, r = 16: four 0.26 MiB ciphertexts) skips the stream's
framing. Under the runtime's smallest sensible message limit (4 MiB) with its results."""

_PACKING_TO_PROTO = {
    Packing.PER_TOKEN: pb.PACKING_PER_TOKEN,
    Packing.BATCH_FIRST: pb.PACKING_BATCH_FIRST,
}
_VARIANT_TO_PROTO = {
    Variant.SERVER_BABY_STEPS: pb.PLAN_VARIANT_SERVER_BABY_STEPS,
    Variant.CLIENT_BABY_STEPS: pb.PLAN_VARIANT_CLIENT_BABY_STEPS,
    Variant.TWO_PRIMES: pb.PLAN_VARIANT_TWO_PRIMES,
    Variant.ONE_PRIME: pb.PLAN_VARIANT_ONE_PRIME,
}


class HeRuntimeRpc(OwnedChannels):
    """The HE runtime's RPCs on one channel, raising typed errors.

    ``CompilePlan``, ``GetSession``, ``ApplyLora`` and ``ApplyLoraInline`` (a pure
    function of the session's keys, plan and adapter and of the ciphertexts sent) are
    retried on UNAVAILABLE as :mod:`tensafe.client.retry` describes; ``CreateSession``
    and ``CloseSession`` are sent once. Sessions live in the runtime's memory, so after
    a runtime restart a retry meets NOT_FOUND: create a new session.

    Args:
        channel: An (authenticated) channel to the HE runtime.
        options: Deadlines of unary calls and the retry policy.
        sleep: Pauses between retries (``time.sleep``; tests may pass a recorder).
        also_close: Other channels to close with this one (e.g. to auth).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        options: ChannelOptions | None = None,
        sleep: Callable[[float], None] = time.sleep,
        also_close: Sequence[grpc.Channel] = (),
    ) -> None:
        self._options = options or ChannelOptions()
        self._sleep = sleep
        super().__init__(channel, also_close)
        self._stub = he_service_pb2_grpc.HeRuntimeServiceStub(channel)

    def compile_plan(self, spec: pb.PlanSpec) -> pb.Plan:
        """``CompilePlan``."""
        request = pb.CompilePlanRequest(spec=spec)
        timeout = self._options.call_timeout_seconds
        response = self._attempt(lambda: self._stub.CompilePlan(request, timeout=timeout))
        return response.plan

    def create_session(
        self,
        header: pb.CreateSessionHeader,
        galois_keys: bytes | None,
        *,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> pb.Session:
        """``CreateSession``: the header, then ``galois_keys`` in chunks.

        ``header.galois_keys_size`` must be the length of ``galois_keys``.
        """
        keys = galois_keys or b""

        def requests() -> Iterator[pb.CreateSessionRequest]:
            yield pb.CreateSessionRequest(header=header)
            for start in range(0, len(keys), chunk_bytes):
                yield pb.CreateSessionRequest(galois_keys_chunk=keys[start : start + chunk_bytes])

        response = self._attempt(lambda: self._stub.CreateSession(requests()), idempotent=False)
        return response.session

    def get_session(self, session_id: str) -> pb.Session:
        """``GetSession``."""
        request = pb.GetSessionRequest(session_id=session_id)
        timeout = self._options.call_timeout_seconds
        response = self._attempt(lambda: self._stub.GetSession(request, timeout=timeout))
        return response.session

    def apply_lora(
        self,
        session_id: str,
        layer: str,
        ciphertexts: Sequence[bytes],
        *,
        chunk_bytes: int = CHUNK_BYTES,
        more_layers: Sequence[str] = (),
        inline: bool | None = None,
    ) -> tuple[list[bytes], pb.ApplyLoraSummary]:
        """Apply a layer's delta: ``ApplyLoraInline`` (one message each way) when the
        ciphertexts total at most :data:`INLINE_MAX_BYTES`, else ``ApplyLora`` (streamed
        in chunks).

        Args:
            session_id: The session.
            layer: The adapted layer.
            ciphertexts: The input ciphertexts of ``layer``'s plan.
            chunk_bytes: Chunk size of a streamed call.
            more_layers: Further layers that read the same input, evaluated on the same
                ciphertexts in the same call (``ApplyLoraHeader.more_layers``).
            inline: Force (True) or refuse (False) ``ApplyLoraInline``; None: by size.

        Raises:
            TenSafeError: The status the runtime returned.
            IntegrityError: The response stream is out of order or has no summary.
        """
        if inline is None:
            inline = sum(len(blob) for blob in ciphertexts) <= INLINE_MAX_BYTES
        if inline:
            header = pb.ApplyLoraHeader(
                session_id=session_id,
                layer=layer,
                ciphertexts=len(ciphertexts),
                more_layers=list(more_layers),
            )
            request = pb.ApplyLoraInlineRequest(header=header, ciphertexts=ciphertexts)
            timeout = self._options.call_timeout_seconds
            response = self._attempt(lambda: self._stub.ApplyLoraInline(request, timeout=timeout))
            if not response.HasField("summary"):
                raise errors.IntegrityError("ApplyLoraInline response has no summary")
            return list(response.ciphertexts), response.summary
        return self.apply_lora_streamed(
            session_id, layer, ciphertexts, chunk_bytes=chunk_bytes, more_layers=more_layers
        )

    def apply_lora_streamed(
        self,
        session_id: str,
        layer: str,
        ciphertexts: Sequence[bytes],
        *,
        chunk_bytes: int = CHUNK_BYTES,
        more_layers: Sequence[str] = (),
    ) -> tuple[list[bytes], pb.ApplyLoraSummary]:
        """``ApplyLora``: stream ciphertexts in, collect the result chunks and the summary
        (``more_layers`` as in :meth:`apply_lora`).

        Raises:
            TenSafeError: The status the runtime returned.
            IntegrityError: The response stream is out of order or has no summary.
        """

        def requests() -> Iterator[pb.ApplyLoraRequest]:
            yield pb.ApplyLoraRequest(
                header=pb.ApplyLoraHeader(
                    session_id=session_id,
                    layer=layer,
                    ciphertexts=len(ciphertexts),
                    more_layers=list(more_layers),
                )
            )
            for index, blob in enumerate(ciphertexts):
                for start in range(0, len(blob), chunk_bytes):
                    end = start + chunk_bytes
                    yield pb.ApplyLoraRequest(
                        chunk=pb.CiphertextChunk(
                            index=index, data=blob[start:end], last=end >= len(blob)
                        )
                    )

        def run() -> tuple[list[bytes], pb.ApplyLoraSummary]:
            results: list[bytes] = []
            current = bytearray()
            summary: pb.ApplyLoraSummary | None = None
            for response in self._stub.ApplyLora(requests()):
                if response.WhichOneof("part") == "summary":
                    summary = response.summary
                    continue
                chunk = response.chunk
                if summary is not None or chunk.index != len(results):
                    raise errors.IntegrityError("ApplyLora response chunks out of order")
                current += chunk.data
                if chunk.last:
                    results.append(bytes(current))
                    current = bytearray()
            if summary is None or current:
                raise errors.IntegrityError("ApplyLora response ended without a summary")
            return results, summary

        # A stream cut by an outage is sent again from its start: the result depends
        # only on the session and the ciphertexts.
        return self._attempt(run)

    def close_session(self, session_id: str) -> None:
        """``CloseSession``."""
        request = pb.CloseSessionRequest(session_id=session_id)
        timeout = self._options.call_timeout_seconds
        self._attempt(lambda: self._stub.CloseSession(request, timeout=timeout), idempotent=False)

    def _attempt(self, call: Callable[[], Result], idempotent: bool = True) -> Result:
        return call_with_retry(
            call, policy=self._options.retry, idempotent=idempotent, sleep=self._sleep
        )


def open_he_runtime(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    auth_url: str | None = None,
    connection_file: str | os.PathLike[str] | None = None,
    options: ChannelOptions | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    client_cert_file: str | os.PathLike[str] | None = None,
    client_key_file: str | os.PathLike[str] | None = None,
) -> HeRuntimeRpc:
    """Connect to the HE runtime with an authenticated channel.

    Endpoints: ``base_url`` (else the connection file's ``he_runtime``) and ``auth_url``
    (else the connection file's ``auth``); the API key as in
    :func:`tensafe.client.auth.find_api_key`; TLS (``ca_file``, ``client_cert_file``,
    ``client_key_file``) as in :func:`tensafe.client.training.open_trainer`.

    Raises:
        FailedPrecondition: An endpoint is neither given nor in a connection file.
        Unauthenticated: No API key was found.
    """
    options = options or ChannelOptions()
    channel, auth_channel = authenticated_channels(
        "he_runtime",
        base_url=base_url,
        auth_url=auth_url,
        api_key=api_key,
        connection_file=connection_file,
        options=options,
        ca_file=ca_file,
        client_cert_file=client_cert_file,
        client_key_file=client_key_file,
    )
    return HeRuntimeRpc(channel, options=options, also_close=(auth_channel,))


@dataclasses.dataclass
class LayerStats:
    """What the HE calls of one layer cost so far.

    Attributes:
        calls: ApplyLora calls.
        tokens: Tokens sent.
        counts: SEAL operations the runtime performed.
        server_ms: Runtime evaluation time, summed.
        round_trip_ms: Wall time of the calls including encryption and decryption.
        reused_inputs: Calls that re-sent the previous call's ciphertexts (the same
            activations, e.g. k_proj and v_proj after q_proj) instead of encrypting.
        grouped_calls: Calls evaluated in one request with other layers that read the
            same input (:meth:`HeLoraSession.apply_layers`); their server and round-trip
            times are shares of that request's.
    """

    calls: int = 0
    tokens: int = 0
    counts: OpCounts = dataclasses.field(default_factory=OpCounts)
    server_ms: float = 0.0
    round_trip_ms: float = 0.0
    reused_inputs: int = 0
    grouped_calls: int = 0


def plan_spec(
    *,
    hidden_size: int,
    output_size: int,
    rank: int,
    alpha: float,
    tokens: int,
    params: CkksParams,
    packing: Packing | None,
    variant: Variant | None = None,
) -> pb.PlanSpec:
    """The contract's PlanSpec (``variant`` None: the compiler chooses)."""
    return pb.PlanSpec(
        hidden_size=hidden_size,
        output_size=output_size,
        rank=rank,
        alpha=alpha,
        tokens=tokens,
        parameters=pb.CkksParameters(
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_modulus_bits=list(params.coeff_modulus_bits),
            scale_bits=params.scale_bits,
        ),
        packing=_PACKING_TO_PROTO[packing] if packing is not None else pb.PACKING_UNSPECIFIED,
        variant=_VARIANT_TO_PROTO[variant] if variant is not None else pb.PLAN_VARIANT_UNSPECIFIED,
    )


class HeLoraSession:
    """Local CKKS keys plus an HE runtime session for one adapter.

    Build with :meth:`create`. The secret key never leaves this object.

    Args:
        rpc: The runtime connection.
        crypto: Holds the keys.
        session: The runtime's session.
        plan: The session plan (equal to the runtime's).
    """

    def __init__(
        self, rpc: HeRuntimeRpc, crypto: HeLoraClient, session: pb.Session, plan: Plan
    ) -> None:
        self._rpc = rpc
        self._crypto = crypto
        self.session = session
        self.plan = plan
        self.stats: dict[str, LayerStats] = {}
        """Per-layer cost so far."""
        self.verifier: DeltaVerifier | None = None
        """Set it (owning tenant: ``DeltaVerifier.from_opened``) to check sampled results
        against the plaintext adapter (:mod:`tensafe.client.he_verify`)."""
        self._plans: dict[tuple[int, int, int], Plan] = {}
        self._last_input: tuple[tuple[int, int, int], np.ndarray, list[bytes]] | None = None

    @classmethod
    def create(
        cls,
        rpc: HeRuntimeRpc,
        *,
        adapter_name: str,
        rank: int,
        alpha: float,
        hidden_size: int,
        output_size: int,
        tokens: int = 1,
        params: CkksParams | None = None,
        packing: Packing | None = None,
        adapter_version: int = 0,
        request_id: str | None = None,
        variant: Variant | None = None,
    ) -> HeLoraSession:
        """Make keys, compile the plan, upload the public material, open the session.

        Args:
            rpc: The runtime connection.
            adapter_name: The adapter the runtime applies.
            rank: The adapter's LoRA rank.
            alpha: The adapter's LoRA alpha.
            hidden_size: Largest input size of the adapted layers (the Galois keys of
                that plan cover every smaller layer).
            output_size: Largest output size of the adapted layers.
            tokens: Typical tokens per call; decides the packing when ``packing`` is None.
            params: CKKS parameters (default
                :func:`~tensafe.helora.params.compact_params`: two data primes, half
                the Galois-key bytes; a forced SERVER_BABY_STEPS variant needs
                :func:`~tensafe.helora.params.default_params`).
            packing: Force a packing.
            adapter_version: The adapter's version (0: latest).
            request_id: Idempotency key (a fresh one by default).
            variant: Force a variant of ``packing`` (e.g. SERVER_BABY_STEPS, the
                compiler-version-1 layout, for comparisons); None: the compiler's
                choice. Needs ``packing``.

        Raises:
            TenSafeError: The runtime refused (the status the runtime returned).
            FailedPrecondition: The runtime's plan differs from the local one.
        """
        params = params or compact_params()
        crypto = HeLoraClient(params)
        shapes: dict[str, Any] = {
            "hidden_size": hidden_size,
            "output_size": output_size,
            "rank": rank,
            "alpha": float(alpha),
            "tokens": tokens,
            "params": params,
        }
        if packing is None:
            if variant is not None:
                raise errors.InvalidArgument("variant", "needs packing to be given")
            plan, _ = choose_plan(**shapes)
        else:
            plan = compile_plan(packing=packing, variant=variant, **shapes)
        material = crypto.public_material(plan)
        header = pb.CreateSessionHeader(
            adapter_name=adapter_name,
            adapter_version=adapter_version,
            spec=plan_spec(packing=packing, variant=variant, **shapes),
            seal_parameters=material.parameters,
            galois_keys_size=len(material.galois_keys or b""),
            request_id=request_id or uuid.uuid4().hex,
        )
        session = rpc.create_session(header, material.galois_keys)
        runtime_plan = Plan.from_dict(json.loads(session.plan.plan_json))
        if runtime_plan != plan:
            rpc.close_session(session.id)
            raise errors.FailedPrecondition(
                "the runtime compiled another plan than this client", reason="PLAN_MISMATCH"
            )
        return cls(rpc, crypto, session, plan)

    @property
    def layers(self) -> list[str]:
        """Adapted module names the runtime serves for this session."""
        return list(self.session.layers)

    def apply(self, layer: str, activations: npt.ArrayLike, *, output_size: int) -> np.ndarray:
        """Compute ``layer``'s LoRA delta for activations, encrypted end to end.

        Args:
            layer: An adapted module name (one of :attr:`layers`).
            activations: x, shape [tokens, d].
            output_size: The layer's output size d_out.

        Returns:
            The decrypted delta, shape [tokens, d_out], float64.

        Raises:
            TenSafeError: The runtime refused.
            IntegrityError: The runtime reports other operations than the plan's (a
                consistency check, not proof), or, with :attr:`verifier` set, the delta
                fails its random projection check (``he result``).
        """
        return self.apply_layers([(layer, output_size)], activations)[0]

    def apply_layers(
        self, layers: Sequence[tuple[str, int]], activations: npt.ArrayLike
    ) -> list[np.ndarray]:
        """Compute the deltas of several layers that read the same activations.

        The activations are encrypted once and sent once, with every layer in the same
        request (``ApplyLoraHeader.more_layers``: a block's q, k and v projections, one
        round trip instead of three); in one ``ApplyLoraInline`` message when the
        ciphertexts and the estimated results fit :data:`INLINE_MAX_BYTES`, else
        streamed. When the layers' regions fit one ciphertext
        (:func:`~tensafe.helora.plan.shared_input_offsets`) the runtime evaluates them as
        one plan and each delta is sliced from its region.

        Args:
            layers: ``(layer, output size)`` pairs, distinct layers.
            activations: x, shape [tokens, d], the input of every one of them.

        Returns:
            The decrypted deltas in the order of ``layers``, each [tokens, d_out].

        Raises:
            As :meth:`apply`.
        """
        started = time.perf_counter()
        values = np.asarray(activations, dtype=np.float64)
        if values.ndim != 2:
            raise errors.InvalidArgument("activations", "must be a [tokens, d] matrix")
        if not layers:
            raise errors.InvalidArgument("layers", "must name at least one layer")
        if len({layer for layer, _ in layers}) != len(layers):
            raise errors.InvalidArgument("layers", "must be distinct")
        tokens = values.shape[0]
        plans = [self._call_plan(values.shape[1], size, tokens) for _, size in layers]
        ciphertexts, reused = self._encrypt(plans[0], values)
        names = [layer for layer, _ in layers]
        sizes = [size for _, size in layers]
        if len(layers) == 1:
            # Wrappers of apply_lora that predate more_layers keep working.
            results, summary = self._rpc.apply_lora(self.session.id, names[0], ciphertexts)
        else:
            results, summary = self._rpc.apply_lora(
                self.session.id,
                names[0],
                ciphertexts,
                more_layers=names[1:],
                inline=_fits_one_message(plans, ciphertexts),
            )
        # Layers sharing one ciphertext run as one plan (the runtime derives the same
        # layout); otherwise each layer's plan, results layer after layer.
        offsets = shared_input_offsets(plans[0], sizes)
        shared = (
            self._call_plan(values.shape[1], offsets[-1] + sizes[-1], tokens)
            if offsets is not None
            else None
        )
        run = [shared] if shared is not None else plans
        counts = OpCounts(
            rotations=summary.counts.rotations,
            key_switches=summary.counts.key_switches,
            multiply_plain=summary.counts.plaintext_multiplies,
            rescales=summary.counts.rescales,
            additions=summary.counts.additions,
        )
        planned = dataclasses.replace(
            sum((plan.counts for plan in run), OpCounts()), plaintext_encodes=0
        )
        if counts != planned:
            raise errors.IntegrityError(
                f"the runtime reports {counts} for {names!r}, the plans have {planned}"
            )
        expected = sum(plan.output_ciphertexts for plan in run)
        if len(results) != expected:
            raise errors.IntegrityError(
                f"the runtime returned {len(results)} ciphertexts, the plans {expected}"
            )
        deltas: list[np.ndarray] = []
        if shared is not None and offsets is not None:
            together = self._crypto.decrypt_delta(shared, results)
            for start, size in zip(offsets, sizes, strict=True):
                deltas.append(np.ascontiguousarray(together[:, start : start + size]))
        else:
            offset = 0
            for plan in plans:
                end = offset + plan.output_ciphertexts
                deltas.append(self._crypto.decrypt_delta(plan, results[offset:end]))
                offset = end
        if self.verifier is not None:
            for name, delta in zip(names, deltas, strict=True):
                self.verifier.check(name, values, delta)
        # The summary is per request: each layer gets a share of its time in proportion
        # to its plan's estimate; a shared ciphertext's counts go to the first layer.
        elapsed = (time.perf_counter() - started) * 1000.0
        total_estimate = sum(plan.estimated_server_ms for plan in plans)
        for index, plan in enumerate(plans):
            share = plan.estimated_server_ms / total_estimate
            stats = self.stats.setdefault(names[index], LayerStats())
            stats.calls += 1
            stats.tokens += plan.tokens
            if shared is None:
                stats.counts = stats.counts + dataclasses.replace(plan.counts, plaintext_encodes=0)
            elif index == 0:
                stats.counts = stats.counts + planned
            stats.server_ms += summary.server_ms * share
            stats.round_trip_ms += elapsed * share
            stats.reused_inputs += int(reused or index > 0)
            stats.grouped_calls += int(len(layers) > 1)
        return deltas

    def _encrypt(self, plan: Plan, values: np.ndarray) -> tuple[list[bytes], bool]:
        """Encrypt ``values`` for ``plan``, or re-send the previous call's ciphertexts.

        The layers of one block that read the same input (q, k and v projections) get
        the same activations in a row; their input ciphertexts depend only on the
        values and the plan's input layout (not on the layer's output size), so the
        first encryption serves them all. Re-sending a ciphertext tells the runtime only
        that the inputs are equal, which the model's structure already says.
        """
        layout = (plan.hidden_size, plan.tokens, plan.input_ciphertexts)
        cached = self._last_input
        if cached is not None and cached[0] == layout and np.array_equal(cached[1], values):
            return cached[2], True
        ciphertexts = self._crypto.encrypt_activations(plan, values)
        self._last_input = (layout, values.copy(), ciphertexts)
        return ciphertexts, False

    def _call_plan(self, hidden_size: int, output_size: int, tokens: int) -> Plan:
        """The plan of one call, with the session plan's packing and variant (as the
        runtime derives it); cached, since generation repeats the same few shapes."""
        key = (hidden_size, output_size, tokens)
        plan = self._plans.get(key)
        if plan is None:
            plan = compile_plan(
                hidden_size=hidden_size,
                output_size=output_size,
                rank=self.plan.rank,
                alpha=self.plan.alpha,
                tokens=tokens,
                params=self.plan.params,
                packing=self.plan.packing,
                variant=self.plan.variant,
            )
            if len(self._plans) >= 256:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def refresh(self) -> pb.Session:
        """``GetSession``: the session as the runtime holds it (keeps it alive)."""
        self.session = self._rpc.get_session(self.session.id)
        return self.session

    def close(self) -> None:
        """Close the runtime session; its keys are deleted there."""
        self._rpc.close_session(self.session.id)

    def __enter__(self) -> HeLoraSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fits_one_message(plans: Sequence[Plan], ciphertexts: Sequence[bytes]) -> bool:
    """Whether a call of every plan's layer on ``ciphertexts`` fits ApplyLoraInline.

    The results are estimated from the input ciphertexts' size: a result ciphertext has
    the same ring and fewer primes (output_primes of input_primes).
    """
    size = sum(len(blob) for blob in ciphertexts)
    per_input = size / len(ciphertexts)
    results = sum(
        plan.output_ciphertexts * per_input * plan.output_primes / plan.input_primes
        for plan in plans
    )
    return size <= INLINE_MAX_BYTES and results <= INLINE_MAX_BYTES


def linear_layers(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules whose last name component is a target (as PEFT)."""
    targets = set(target_modules)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


class HeLoraModel:
    """A local transformers model whose adapted layers get their LoRA delta from HE.

    Args:
        model: The base model (plaintext, on the client).
        session: An open session whose adapter adapts modules of ``model``.
        share_inputs: Ask for the layers that read one input tensor (a block's q, k and
            v projections) in one request, once the first forward pass has shown which
            they are (:class:`_InputSharing`); False: one request per layer.

    Raises:
        FailedPrecondition: A layer the session adapts is not an ``nn.Linear`` of
            ``model``.
    """

    def __init__(
        self, model: nn.Module, session: HeLoraSession, *, share_inputs: bool = True
    ) -> None:
        self.model = model
        self.session = session
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sharing = _InputSharing(enabled=share_inputs)
        modules = dict(model.named_modules())
        for layer in session.layers:
            module = modules.get(layer)
            if not isinstance(module, nn.Linear):
                self.remove_hooks()
                raise errors.FailedPrecondition(
                    f"the adapter adapts {layer!r}, which is not a linear layer of this model",
                    reason="ADAPTER_MISMATCH",
                )
            self._handles.append(module.register_forward_hook(self._hook(layer, module)))

    @classmethod
    def create(
        cls,
        model: nn.Module,
        rpc: HeRuntimeRpc,
        *,
        adapter_name: str,
        rank: int,
        alpha: float,
        target_modules: Sequence[str],
        tokens: int = 1,
        params: CkksParams | None = None,
        packing: Packing | None = None,
        adapter_version: int = 0,
        variant: Variant | None = None,
        share_inputs: bool = True,
    ) -> HeLoraModel:
        """Open a session for ``model``'s adapted layers and install the hooks.

        Args:
            model: The base model.
            rpc: The runtime connection.
            adapter_name: The adapter.
            rank: Its LoRA rank.
            alpha: Its LoRA alpha.
            target_modules: Its target module names (PEFT ``target_modules``).
            tokens: Typical tokens per call (1 for generation steps).
            params: CKKS parameters.
            packing: Force a packing.
            adapter_version: The adapter's version.
            variant: Force a variant of ``packing`` (see :meth:`HeLoraSession.create`).
            share_inputs: See the class (default True).

        Raises:
            InvalidArgument: No linear layer matches ``target_modules``.
        """
        layers = linear_layers(model, target_modules)
        if not layers:
            raise errors.InvalidArgument("target_modules", "match no linear layer of the model")
        session = HeLoraSession.create(
            rpc,
            adapter_name=adapter_name,
            rank=rank,
            alpha=alpha,
            hidden_size=max(module.in_features for module in layers.values()),
            output_size=max(module.out_features for module in layers.values()),
            tokens=tokens,
            params=params,
            packing=packing,
            adapter_version=adapter_version,
            variant=variant,
        )
        try:
            return cls(model, session, share_inputs=share_inputs)
        except BaseException:
            session.close()
            raise

    def _hook(self, layer: str, module: nn.Linear) -> Any:
        session, sharing = self.session, self._sharing
        out_features = {
            name: int(linear.out_features)
            for name, linear in self.model.named_modules()
            if isinstance(linear, nn.Linear)
        }

        def add_delta(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
            x = inputs[0]
            delta = sharing.take(layer, x)
            if delta is None:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu().numpy()
                group = sharing.group(layer)
                deltas = session.apply_layers([(name, out_features[name]) for name in group], flat)
                sharing.keep(group[1:], x, deltas[1:])
                delta = deltas[0]
            sharing.observe(layer, x)
            addend = torch.from_numpy(delta).to(dtype=output.dtype, device=output.device)
            return output + addend.reshape(output.shape)

        return add_delta

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with HE-LoRA (no gradients)."""
        with torch.no_grad():
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass with HE-LoRA (no gradients)."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def remove_hooks(self) -> None:
        """Detach the hooks; the model is the plain base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def close(self) -> None:
        """Detach the hooks and close the session."""
        self.remove_hooks()
        self.session.close()

    def __enter__(self) -> HeLoraModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _InputSharing:
    """Learns which adapted layers read the same input tensor, to ask for them together.

    A forward pass calls a block's q, k and v projections one after the other on the
    same ``hidden_states`` tensor. The first pass is observed (layers called in a row
    on the same tensor object form a group); from then on the group's first layer asks
    the runtime for every layer of the group in one request
    (:meth:`HeLoraSession.apply_layers`) and keeps the others' deltas, each used only
    if its layer is then called on that very tensor, unmodified (same object, same
    version counter). If not, the kept delta is dropped, the layer's delta is computed
    on its own input, and its group is never formed again: a delta is always computed
    from the layer's own input.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self._enabled = enabled
        self._groups: dict[str, tuple[str, ...]] = {}
        self._kept: dict[str, tuple[torch.Tensor, int, np.ndarray]] = {}
        self._unshared: set[str] = set()
        self._run: list[str] = []
        self._run_input: torch.Tensor | None = None

    def group(self, layer: str) -> tuple[str, ...]:
        """The layers to evaluate with ``layer`` (itself first)."""
        return self._groups.get(layer, (layer,))

    def keep(self, layers: Sequence[str], x: torch.Tensor, deltas: Sequence[np.ndarray]) -> None:
        """Keep the deltas of ``layers`` computed on ``x`` for their own calls."""
        for layer, delta in zip(layers, deltas, strict=True):
            self._kept[layer] = (x, x._version, delta)

    def take(self, layer: str, x: torch.Tensor) -> np.ndarray | None:
        """The delta kept for ``layer`` if it was computed on this very ``x``."""
        kept = self._kept.pop(layer, None)
        if kept is None:
            return None
        tensor, version, delta = kept
        if tensor is x and version == x._version:
            return delta
        # Another input than its group's: never group it again.
        self._unshared.add(layer)
        for first, group in list(self._groups.items()):
            if layer in group:
                del self._groups[first]
                for other in group:
                    self._kept.pop(other, None)
        return None

    def observe(self, layer: str, x: torch.Tensor) -> None:
        """Record that ``layer`` was called on ``x`` (learns the groups)."""
        if self._run_input is x and layer not in self._run:
            self._run.append(layer)
            return
        self._close_run()
        self._run, self._run_input = [layer], x

    def _close_run(self) -> None:
        if not self._enabled:
            return
        run = [layer for layer in self._run if layer not in self._unshared]
        grouped = {layer for group in self._groups.values() for layer in group}
        if len(run) > 1 and not grouped.intersection(run):
            self._groups[run[0]] = tuple(run)

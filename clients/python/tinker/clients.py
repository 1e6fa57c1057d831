"""``ServiceClient``, ``TrainingClient`` and ``SamplingClient``, shaped like Tinker's.

The method names, argument names and result types are Tinker's (see docs/sdk.md for
the list and the differences); the work is done by the TenSafe trainer over gRPC
(:mod:`tensafe.client.training`), with DP-SGD enforced and accounted on the server.

Ordering: a long call is *submitted* before the method returns (a short unary RPC that
returns the server's future id), so calls of one training client reach the server in
the order they were made, and the server applies them in that order. ``.result()``
then waits. The ``*_async`` variants submit the same way (so ``asyncio.gather`` keeps
call order too) and return the same futures, which are awaitable.

DP by default: ``create_lora_training_client`` makes a DP-SGD client unless
``private=False`` is passed explicitly; see :data:`DEFAULT_NOISE_MULTIPLIER` and the
other defaults below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import grpc

from tensafe.client.connection import connection_path
from tensafe.client.training import (
    ChannelOptions,
    TrainerRpc,
    new_request_id,
    open_trainer,
)
from tensafe.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker import serde, types
from tensafe.tinker.futures import APIFuture, CombinedFuture, MappedFuture, ServerFuture

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

CustomLossFn = Callable[
    [list[types.Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]
]
"""A ``forward_backward_custom`` loss: ``(data, logprobs) -> (loss, metrics)`` (Tinker's)."""

DEFAULT_NOISE_MULTIPLIER = 1.0
"""sigma of a DP client created without ``dp_noise_multiplier``/``target_epsilon``.
With client-supplied batches each step is a full Gaussian mechanism (no subsampling
amplification, DESIGN §8), so epsilon grows with every step; prefer
``target_epsilon`` + ``planned_steps`` to fix the total in advance."""

HIGH_EPSILON = 10.0
"""Above this epsilon the SDK warns (once per client, with the figure): a guarantee
that weak is rarely what a user of a privacy platform means to get."""


class PrivacyWarning(UserWarning):
    """A client's configuration or progress spends more privacy than is usually meant."""


DEFAULT_MAX_GRAD_NORM = 1.0
"""Per-example clipping norm C (Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016, use C of this order; LoRA gradients are small)."""

DEFAULT_DELTA = 1e-5
"""delta; keep it below 1/N for N training examples (Dwork & Roth, 2014, §2.3)."""

DEFAULT_ACCOUNTANT: types.Accountant = "rdp"
"""Renyi DP accountant (Mironov, CSF 2017), as in Opacus."""

BASE_MODELS_DIR_ENV = "TENSAFE_BASE_MODELS_DIR"
"""The trainer's base-models folder setting; on one machine the SDK reads the same
folder to find a base model's tokenizer."""

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CHECKPOINT_PATH = re.compile(
    r"^tensafe://training_clients/([^/]+)/checkpoints/[A-Za-z0-9._-]{1,64}$"
)


class _ClientIsItsOwnFuture:
    """Tinker 0.38's ``create_*`` return a future of the client (``.result()``, ``await``);
    TenSafe's create the client before returning, so the client stands for its own
    resolved future and code written either way runs."""

    def result(self, timeout: float | None = None) -> Self:
        """This client (already created; ``timeout`` has nothing to wait for)."""
        del timeout
        return self

    async def result_async(self, timeout: float | None = None) -> Self:
        """This client."""
        del timeout
        return self


class ServiceClient:
    """Entry point: creates training and sampling clients (Tinker's ``ServiceClient``).

    Endpoints and credentials: ``base_url`` (``host:port``, ``grpc://`` or ``grpcs://``)
    else the ``trainer`` entry of the connection file written by ``tensafe up``;
    ``api_key`` else ``$TENSAFE_API_KEY`` else the connection file's key; the key is
    exchanged for short-lived tokens at ``auth_url`` (else the connection file's
    ``auth``).

    Args:
        base_url: The Tinker API's URL (``http(s)://...``, printed by ``tensafe up``: the
            one address a user needs; it announces the trainer's and auth's gRPC
            endpoints, see :func:`discover_endpoints`), or the trainer's gRPC address.
        api_key: TenSafe API key.
        auth_url: Auth service address (only with a gRPC ``base_url``).
        connection_file: Connection file (default ``$TENSAFE_CONNECTION_FILE`` or
            ``.tensafe/connection.json``).
        base_models_dir: Local folder of base models, for ``get_tokenizer`` (default
            ``$TENSAFE_BASE_MODELS_DIR``, else the connection file's ``base_models_dir``).
        channel: An already authenticated channel to use instead (then ``base_url``,
            ``api_key`` and ``auth_url`` must not be given, and its message size
            limits are the caller's: see :func:`tensafe.client.training.make_channel`).
        options: Message size limits, timeouts and retries.
        ca_file: PEM CA bundle that verifies the services: TLS (default
            ``$TENSAFE_CA_FILE``, else the connection file's ``tls`` block).
        client_cert_file: PEM client certificate where the services require mutual TLS
            (default ``$TENSAFE_CLIENT_CERT_FILE``, else the connection file's).
        client_key_file: Its private key (default ``$TENSAFE_CLIENT_KEY_FILE``).
        user_metadata: Tinker's session metadata; accepted, not stored.
        display_name: Tinker's session name; accepted, not stored.
        project_id: Tinker's project; accepted, not used.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        auth_url: str | None = None,
        connection_file: str | os.PathLike[str] | None = None,
        base_models_dir: str | os.PathLike[str] | None = None,
        channel: grpc.Channel | None = None,
        options: ChannelOptions | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        client_cert_file: str | os.PathLike[str] | None = None,
        client_key_file: str | os.PathLike[str] | None = None,
        user_metadata: dict[str, str] | None = None,
        display_name: str | None = None,
        project_id: str | None = None,
    ) -> None:
        # A Tinker session's labels: accepted, not stored (TenSafe has no sessions).
        del user_metadata, display_name, project_id
        if channel is not None:
            if base_url or api_key or auth_url:
                raise InvalidArgument("channel", "give a channel or endpoints, not both")
            self._rpc = TrainerRpc(channel, options=options)
        else:
            if base_url is not None and base_url.startswith(("http://", "https://")):
                if auth_url:
                    raise InvalidArgument(
                        "auth_url", "not with a Tinker API base_url, which announces auth"
                    )
                base_url, auth_url = discover_endpoints(base_url)
            self._rpc = open_trainer(
                base_url=base_url,
                api_key=api_key,
                auth_url=auth_url,
                connection_file=connection_file,
                options=options,
                ca_file=ca_file,
                client_cert_file=client_cert_file,
                client_key_file=client_key_file,
            )
        self._connection_file = connection_file
        self._base_models_dir = Path(base_models_dir) if base_models_dir else None

    @property
    def rpc(self) -> TrainerRpc:
        """The gRPC layer (for calls outside Tinker's surface)."""
        return self._rpc

    def close(self) -> None:
        """Close the connection."""
        self._rpc.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """The base models this deployment can fine-tune."""
        return types.GetServerCapabilitiesResponse(
            supported_models=[
                types.SupportedModel(
                    model_name=model.name,
                    vocab_size=model.vocab_size,
                    max_context_length=model.max_context_length,
                )
                for model in self._rpc.list_base_models()
            ]
        )

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        """Async :meth:`get_server_capabilities`."""
        return await asyncio.to_thread(self.get_server_capabilities)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool | None = None,
        train_attn: bool | None = None,
        train_unembed: bool | None = None,
        *,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
        private: bool = True,
        dp_noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        planned_steps: int | None = None,
        max_grad_norm: float = DEFAULT_MAX_GRAD_NORM,
        delta: float = DEFAULT_DELTA,
        accountant: types.Accountant = DEFAULT_ACCOUNTANT,
        epsilon_budget: float | None = None,
        tokenizer_dir: str | os.PathLike[str] | None = None,
    ) -> TrainingClient:
        """Create a LoRA training client on a base model; DP-SGD unless ``private=False``.

        Args:
            base_model: A name from :meth:`get_server_capabilities`.
            rank: LoRA rank r.
            seed: Seed of the LoRA initialisation (``None``: drawn by the server).
            train_mlp: Also adapt the MLP projections (Llama-style names).
            train_attn: Adapt the attention projections (default when all three
                ``train_*`` are ``None``).
            train_unembed: Also adapt ``lm_head``.
            lora_alpha: Scaling alpha (delta = alpha/r * x A B); ``None`` means r.
            lora_dropout: Dropout on the LoRA input.
            target_modules: Explicit module names (instead of the ``train_*`` flags).
            private: False creates an explicitly non-private client (no clipping, no
                noise, epsilon reported as inf); no DP argument may be given then.
            dp_noise_multiplier: sigma; default :data:`DEFAULT_NOISE_MULTIPLIER` when
                neither this nor ``target_epsilon`` is given.
            target_epsilon: Solve sigma so that ``planned_steps`` steps spend this.
            planned_steps: Steps ``target_epsilon`` is spread over.
            max_grad_norm: Per-example clipping norm C.
            delta: delta.
            accountant: ``"rdp"`` or ``"pld"``.
            epsilon_budget: Steps that would take epsilon above this are refused with
                ``BudgetExhausted`` (default: ``target_epsilon`` if given, else none).
            tokenizer_dir: Folder holding this base model's tokenizer (default:
                ``<base_models_dir>/<base_model>``).

        Returns:
            The training client.

        Raises:
            InvalidArgument: Contradictory or out-of-range settings (checked by the
                server too); NotFound: an unknown base model.
        """
        if seed == 0:
            raise InvalidArgument("seed", "0 is reserved for 'drawn by the server'")
        modules = list(target_modules or [])
        flags = serde.lora_target_modules(
            train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
        )
        if modules and flags:
            raise InvalidArgument("target_modules", "give target_modules or train_* flags")
        lora = pb.LoraConfig(
            rank=rank,
            alpha=lora_alpha if lora_alpha is not None else 0.0,
            dropout=lora_dropout,
            target_modules=modules or flags,
            seed=seed or 0,
        )
        request = pb.CreateTrainingClientRequest(
            base_model=base_model, lora=lora, request_id=new_request_id()
        )
        if private:
            noise = dp_noise_multiplier
            if noise is None and target_epsilon is None:
                noise = DEFAULT_NOISE_MULTIPLIER
            request.dp.CopyFrom(
                serde.dp_config_to_proto(
                    dp_noise_multiplier=noise,
                    target_epsilon=target_epsilon,
                    planned_steps=planned_steps,
                    max_grad_norm=max_grad_norm,
                    delta=delta,
                    accountant=accountant,
                    epsilon_budget=epsilon_budget,
                )
            )
        else:
            given = {
                "dp_noise_multiplier": dp_noise_multiplier is not None,
                "target_epsilon": target_epsilon is not None,
                "planned_steps": planned_steps is not None,
                "max_grad_norm": max_grad_norm != DEFAULT_MAX_GRAD_NORM,
                "delta": delta != DEFAULT_DELTA,
                "accountant": accountant != DEFAULT_ACCOUNTANT,
                "epsilon_budget": epsilon_budget is not None,
            }
            for name, was_given in given.items():
                if was_given:
                    raise InvalidArgument(name, "a DP setting on a client with private=False")
        created = self._rpc.create_training_client(request)
        planned = max(target_epsilon or 0.0, epsilon_budget or 0.0)
        if private and planned > HIGH_EPSILON:
            warnings.warn(
                f"training client {created.id} is configured to spend up to epsilon "
                f"{planned:g} (above {HIGH_EPSILON:g}): a weak guarantee",
                PrivacyWarning,
                stacklevel=2,
            )
        return TrainingClient(
            self._rpc, created, tokenizer_dir=self._tokenizer_dir(base_model, tokenizer_dir)
        )

    async def create_lora_training_client_async(
        self, base_model: str, rank: int = 32, **kwargs: Any
    ) -> TrainingClient:
        """Async :meth:`create_lora_training_client` (same arguments)."""
        return await asyncio.to_thread(self.create_lora_training_client, base_model, rank, **kwargs)

    def get_training_client(
        self, model_id: types.ModelID, *, tokenizer_dir: str | os.PathLike[str] | None = None
    ) -> TrainingClient:
        """Attach to an existing training client by id (e.g. to resume a script)."""
        found = self._rpc.get_training_client(model_id)
        return TrainingClient(
            self._rpc, found, tokenizer_dir=self._tokenizer_dir(found.base_model, tokenizer_dir)
        )

    def create_training_client_from_state(
        self,
        path: str,
        *,
        tokenizer_dir: str | os.PathLike[str] | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new training client that continues a checkpoint written by ``save_state``.

        As in Tinker, a new client starts from the checkpoint's weights, with the saving
        client's base model, LoRA and DP settings. Privacy follows the weights: the new
        client's epsilon, budget and DP certificate cover every step the checkpoint's
        weights have seen (the server merges their lineage), so a new client never
        starts again at epsilon 0 on the same data. Unlike Tinker, the optimizer moments
        are restored too (as by :meth:`TrainingClient.load_state`).

        Args:
            path: ``tensafe://training_clients/<id>/checkpoints/<name>``.
            tokenizer_dir: As for :meth:`create_lora_training_client`.
            user_metadata: Accepted for Tinker compatibility; not stored.

        Returns:
            The new training client, restored to the checkpoint's step.

        Raises:
            InvalidArgument: A path of another form; NotFound: no such client or
                checkpoint for the caller.
        """
        del user_metadata
        match = _CHECKPOINT_PATH.match(path)
        if match is None:
            raise InvalidArgument(
                "path", "expected tensafe://training_clients/<id>/checkpoints/<name>"
            )
        source = self._rpc.get_training_client(match.group(1))
        request = pb.CreateTrainingClientRequest(
            base_model=source.base_model, request_id=new_request_id()
        )
        request.lora.CopyFrom(source.lora)
        if source.private:
            request.dp.CopyFrom(source.dp)
        created = self._rpc.create_training_client(request)
        client = TrainingClient(
            self._rpc,
            created,
            tokenizer_dir=self._tokenizer_dir(created.base_model, tokenizer_dir),
        )
        client.load_state(path).result()
        return client

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        *,
        tokenizer_dir: str | os.PathLike[str] | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """Same as :meth:`create_training_client_from_state` (which restores the
        optimizer moments already)."""
        return self.create_training_client_from_state(
            path, tokenizer_dir=tokenizer_dir, user_metadata=user_metadata
        )

    async def create_training_client_from_state_async(
        self, path: str, *, tokenizer_dir: str | os.PathLike[str] | None = None
    ) -> TrainingClient:
        """Async :meth:`create_training_client_from_state`."""
        return await asyncio.to_thread(
            self.create_training_client_from_state, path, tokenizer_dir=tokenizer_dir
        )

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        *,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A sampling client on weights saved with ``save_weights_for_sampler``.

        Args:
            model_path: The ``tensafe://`` path.
            base_model: Not supported: TenSafe samples from trained adapters only.
            record_stability_info: Accepted and not acted on: it only serves Tinker's
                ``stable_reinforce``, which the server refuses (docs/tinker.md).

        Raises:
            InvalidArgument: No ``model_path``, or a ``base_model``.
        """
        del record_stability_info
        if base_model is not None:
            raise InvalidArgument(
                "base_model", "sampling the bare base model is not offered; pass model_path"
            )
        if not model_path:
            raise InvalidArgument("model_path", "required")
        return SamplingClient(self._rpc, model_path=model_path)

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        *,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """Async :meth:`create_sampling_client`."""
        return self.create_sampling_client(
            model_path, base_model, record_stability_info=record_stability_info
        )

    def _tokenizer_dir(
        self, base_model: str, explicit: str | os.PathLike[str] | None
    ) -> Path | None:
        if explicit:
            return Path(explicit)
        root = self._base_models_dir
        if root is None and os.environ.get(BASE_MODELS_DIR_ENV):
            root = Path(os.environ[BASE_MODELS_DIR_ENV])
        if root is None:
            path = connection_path(self._connection_file)
            if path.exists():
                value = json.loads(path.read_text()).get("base_models_dir")
                root = Path(value) if isinstance(value, str) and value else None
        return root / base_model if root is not None else None


class TrainingClient(_ClientIsItsOwnFuture):
    """A LoRA training client on the server (Tinker's ``TrainingClient``).

    Made by :meth:`ServiceClient.create_lora_training_client`.

    Args:
        rpc: The trainer connection.
        training_client: The server's record of the client.
        tokenizer_dir: Where :meth:`get_tokenizer` loads the tokenizer from.
    """

    def __init__(
        self,
        rpc: TrainerRpc,
        training_client: pb.TrainingClient,
        *,
        tokenizer_dir: Path | None = None,
    ) -> None:
        self._rpc = rpc
        self._record = training_client
        self._tokenizer_dir = tokenizer_dir
        self._warned_high_epsilon = False
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def model_id(self) -> types.ModelID:
        """The training client's id."""
        return self._record.id

    @property
    def base_model(self) -> str:
        """The base model's name."""
        return self._record.base_model

    @property
    def private(self) -> bool:
        """Whether DP-SGD is enforced on this client."""
        return self._record.private

    def _submit(self, rpc: str, request: Any) -> Any:
        request.request_id = new_request_id()
        return self._rpc.submit(rpc, request)

    # -- training ------------------------------------------------------------------

    def forward_backward(
        self,
        data: Sequence[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward and backward pass; gradients accumulate until :meth:`optim_step`.

        On a DP client each example's gradient is clipped to ``max_grad_norm``; the
        noise is added once, at the optimizer step.

        Args:
            data: The batch.
            loss_fn: ``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo`` or
                ``dro``.
            loss_fn_config: Loss options: ppo/cispo clip thresholds, dro ``beta``.

        Returns:
            Future of per-datum outputs (``logprobs``, ...) and metrics.
        """
        request = pb.ForwardBackwardRequest(
            training_client_id=self.model_id,
            data=serde.datums_to_proto(data),
            loss_fn=loss_fn,
            loss_fn_config=loss_fn_config or {},
        )
        return ServerFuture(
            self._rpc,
            self._submit("ForwardBackward", request),
            pb.ForwardBackwardResult,
            serde.forward_backward_output_from_proto,
        )

    async def forward_backward_async(
        self,
        data: Sequence[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Async :meth:`forward_backward`."""
        return self.forward_backward(data, loss_fn, loss_fn_config)

    def forward(
        self,
        data: Sequence[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward pass only (loss and logprobs, no gradient)."""
        request = pb.ForwardRequest(
            training_client_id=self.model_id,
            data=serde.datums_to_proto(data),
            loss_fn=loss_fn,
            loss_fn_config=loss_fn_config or {},
        )
        return ServerFuture(
            self._rpc,
            self._submit("Forward", request),
            pb.ForwardBackwardResult,
            serde.forward_backward_output_from_proto,
        )

    async def forward_async(
        self,
        data: Sequence[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Async :meth:`forward`."""
        return self.forward(data, loss_fn, loss_fn_config)

    def forward_backward_custom(
        self, data: Sequence[types.Datum], loss_fn: CustomLossFn
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward and backward with a loss computed here, on the logprobs, as Tinker does.

        Like the official SDK: a ``forward`` gives each datum's ``logprobs``; ``loss_fn(data,
        logprobs)`` runs here in torch; its gradient ``g`` with respect to each datum's
        logprobs goes back as a ``cross_entropy`` forward_backward with ``weights = -g``
        (``-Σ_t w_t log p_t`` has exactly the gradient ``Σ_t g_t ∇log p_t``). Only
        ``target_tokens`` and ``weights`` are sent to the server.

        Under DP each datum's surrogate is its own linear loss, so its gradient is clipped
        exactly as any datum's. The guarantee needs a loss that is a sum of per-datum terms:
        if ``loss_fn`` couples data (a batch mean of a non-linear function, pairs as in DPO),
        one datum's weights depend on another's logprobs, which per-example clipping does not
        bound (docs/tinker.md).

        Unlike the SDK, this call blocks until the forward pass is done and the backward is
        submitted (the server then applies it before anything submitted later); the future
        returned is the backward's.

        Args:
            data: The batch; each datum needs ``target_tokens``.
            loss_fn: ``(data, logprobs) -> (loss, metrics)``, ``logprobs`` a list of float32
                tensors (one per datum, the shape of its ``target_tokens``); ``loss`` a
                torch scalar differentiable in them.

        Returns:
            Future of the backward's outputs; its ``loss:sum`` is the custom loss, and the
            surrogate's sum is ``surrogate_loss:sum``, as in the SDK.

        Raises:
            ValueError: A datum without ``target_tokens``, or a loss with no gradient for
                some datum's logprobs.
        """
        forward_data = [_surrogate_datum(datum, None) for datum in data]
        forward = self.forward(forward_data, "cross_entropy").result()
        logprobs = [
            output["logprobs"].to_torch().float().clone().requires_grad_(True)
            for output in forward.loss_fn_outputs
        ]
        loss, metrics = loss_fn(list(data), logprobs)
        custom_loss_sum = float(loss.detach().sum().item())
        loss.backward()  # type: ignore[no-untyped-call]
        backward_data = []
        for index, (datum, logprob) in enumerate(zip(data, logprobs, strict=True)):
            if logprob.grad is None:
                raise ValueError(f"the custom loss has no gradient for data[{index}]'s logprobs")
            backward_data.append(_surrogate_datum(datum, -logprob.grad))

        def relabel(output: types.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
            merged = dict(output.metrics)
            merged["surrogate_loss:sum"] = merged.pop("loss:sum", 0.0)
            merged.update(metrics)
            merged["loss:sum"] = custom_loss_sum
            return dataclasses.replace(output, metrics=merged)

        return MappedFuture(self.forward_backward(backward_data, "cross_entropy"), relabel)

    async def forward_backward_custom_async(
        self, data: Sequence[types.Datum], loss_fn: CustomLossFn
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Async :meth:`forward_backward_custom` (the forward pass runs in a thread)."""
        return await asyncio.to_thread(self.forward_backward_custom, data, loss_fn)

    def optim_step(self, adam_params: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        """One optimizer step (on a DP client: noise once, privacy charged).

        Raises (from ``.result()``):
            BudgetExhausted: The step would take epsilon over the client's budget; the
                server refused it before running it.
        """
        request = pb.OptimStepRequest(
            training_client_id=self.model_id, adam_params=serde.adam_params_to_proto(adam_params)
        )
        return ServerFuture(
            self._rpc,
            self._submit("OptimStep", request),
            pb.OptimStepResult,
            lambda result: self._watch_epsilon(serde.optim_step_response_from_proto(result)),
        )

    def _watch_epsilon(self, response: types.OptimStepResponse) -> types.OptimStepResponse:
        """Warn once when a step takes epsilon past :data:`HIGH_EPSILON` with no budget
        set (the default sigma spends about 13.8 in six client-batch steps)."""
        spent = response.privacy_spent
        if (
            spent is not None
            and spent.private
            and spent.epsilon_budget is None
            and spent.epsilon > HIGH_EPSILON
            and not self._warned_high_epsilon
        ):
            self._warned_high_epsilon = True
            warnings.warn(
                f"training client {self.model_id} has spent epsilon {spent.epsilon:.3g} "
                f"(delta {spent.delta:g}) after {spent.steps} DP step(s) and has no budget; "
                "set epsilon_budget, or target_epsilon with planned_steps, to bound it",
                PrivacyWarning,
                stacklevel=2,
            )
        return response

    async def optim_step_async(
        self, adam_params: types.AdamParams
    ) -> APIFuture[types.OptimStepResponse]:
        """Async :meth:`optim_step`."""
        return self.optim_step(adam_params)

    # -- checkpoints ---------------------------------------------------------------

    def save_state(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Save weights, optimizer moments and accountant state under ``name``
        (``ttl_seconds`` is accepted and not applied: TenSafe checkpoints go with their
        training client)."""
        del ttl_seconds
        _check_name("name", name)
        request = pb.SaveStateRequest(training_client_id=self.model_id, name=name)
        return ServerFuture(
            self._rpc,
            self._submit("SaveState", request),
            pb.SaveStateResult,
            lambda result: types.SaveWeightsResponse(path=result.path, step=result.step),
        )

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Async :meth:`save_state`."""
        return self.save_state(name, ttl_seconds)

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Restore a checkpoint of this client's lineage.

        Unlike Tinker's ``load_state`` (weights only) this always restores the optimizer
        moments and the accountant too: privacy spent can never be rolled back.
        """
        request = pb.LoadStateRequest(training_client_id=self.model_id, path=path)
        return ServerFuture(
            self._rpc,
            self._submit("LoadState", request),
            pb.LoadStateResult,
            lambda result: types.LoadWeightsResponse(path=path, step=result.step),
        )

    async def load_state_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Async :meth:`load_state`."""
        return self.load_state(path)

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Same as :meth:`load_state` (which restores the optimizer already)."""
        return self.load_state(path)

    async def load_state_with_optimizer_async(
        self, path: str
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Async :meth:`load_state_with_optimizer`."""
        return self.load_state(path)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Freeze the current weights for sampling under ``name`` (``ttl_seconds``: as
        for :meth:`save_state`)."""
        del ttl_seconds
        _check_name("name", name)
        request = pb.SaveWeightsForSamplerRequest(training_client_id=self.model_id, name=name)
        return ServerFuture(
            self._rpc,
            self._submit("SaveWeightsForSampler", request),
            pb.SaveWeightsForSamplerResult,
            lambda result: types.SaveWeightsForSamplerResponse(path=result.path),
        )

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Async :meth:`save_weights_for_sampler`."""
        return self.save_weights_for_sampler(name, ttl_seconds)

    def save_adapter(self, adapter_name: str) -> APIFuture[types.SaveAdapterResponse]:
        """Publish the current adapter to the registry (TenSafe addition).

        The trainer seals the adapter as a signed, encrypted TGSP package carrying the
        DP certificate from the client's privacy ledger, and publishes it as the next
        version of ``adapter_name`` in the caller's tenant.

        Args:
            adapter_name: Registry adapter name, ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``.
        """
        request = pb.SaveAdapterRequest(training_client_id=self.model_id, adapter_name=adapter_name)
        return ServerFuture(
            self._rpc,
            self._submit("SaveAdapter", request),
            pb.SaveAdapterResult,
            lambda result: types.SaveAdapterResponse(
                adapter_name=result.adapter_name,
                version=int(result.version),
                package_sha256=result.package_sha256,
            ),
        )

    async def save_adapter_async(self, adapter_name: str) -> APIFuture[types.SaveAdapterResponse]:
        """Async :meth:`save_adapter`."""
        return self.save_adapter(adapter_name)

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """Freeze the current weights and return a client that samples from them.

        Args:
            name: Name of the frozen weights (Tinker ignores it; TenSafe keeps it);
                ``None`` draws one.
            record_stability_info: Accepted and not acted on: it only serves Tinker's
                ``stable_reinforce``, which the server refuses (docs/tinker.md).
        """
        del record_stability_info
        return self._save_and_sample(name).result()

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """Async :meth:`save_weights_and_get_sampling_client`."""
        del record_stability_info
        return await self._save_and_sample(name)

    def _save_and_sample(self, name: str | None) -> APIFuture[SamplingClient]:
        saved = self.save_weights_for_sampler(name or f"sampler-{new_request_id()[:16]}")
        return MappedFuture(saved, lambda result: SamplingClient(self._rpc, model_path=result.path))

    def create_sampling_client(
        self, model_path: str, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """A sampling client on saved weights (``record_stability_info``: as for
        :meth:`save_weights_and_get_sampling_client`)."""
        del record_stability_info
        return SamplingClient(self._rpc, model_path=model_path)

    # -- information ---------------------------------------------------------------

    def get_info(self) -> types.GetInfoResponse:
        """The client's base model, rank, privacy mode and step count."""
        self._record = self._rpc.get_training_client(self.model_id)
        return types.GetInfoResponse(
            model_id=self.model_id,
            model_data=types.ModelData(
                model_name=self._record.base_model,
                lora_rank=self._record.lora.rank,
                private=self._record.private,
                step=self._record.step,
            ),
        )

    async def get_info_async(self) -> types.GetInfoResponse:
        """Async :meth:`get_info`."""
        return await asyncio.to_thread(self.get_info)

    def get_privacy_spent(self) -> types.PrivacySpent:
        """The epsilon spent so far at the client's delta (TenSafe addition)."""
        return serde.privacy_spent_from_proto(self._rpc.get_privacy_spent(self.model_id))

    async def get_privacy_spent_async(self) -> types.PrivacySpent:
        """Async :meth:`get_privacy_spent`."""
        return await asyncio.to_thread(self.get_privacy_spent)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, loaded with ``AutoTokenizer.from_pretrained``.

        Tinker downloads it from the Hugging Face Hub; TenSafe reads it from a local
        folder when one is configured (``tokenizer_dir``, else
        ``<base_models_dir>/<base_model>``; see :class:`ServiceClient`), else fetches the
        files from the trainer (``GetBaseModelTokenizer``) into a cache folder named by
        their digest (``$TENSAFE_TOKENIZER_CACHE``, default
        ``~/.cache/tensafe/tokenizers``), written once and reused.

        Raises:
            FailedPrecondition: The folder holds no tokenizer (or the base model has none).
        """
        if self._tokenizer is not None:
            return self._tokenizer
        folder = self._tokenizer_dir
        if folder is None:
            folder = _cached_tokenizer(self._rpc.base_model_tokenizer(self.base_model))
        if not folder.is_dir():
            raise FailedPrecondition(f"tokenizer folder {folder} does not exist")
        from tensafe.client.extras import require

        # Not in the slim install: a MissingExtra naming [trainer], not an ImportError.
        transformers = require("transformers", "TrainingClient.get_tokenizer()")
        try:
            tokenizer: PreTrainedTokenizerBase = transformers.AutoTokenizer.from_pretrained(
                str(folder)
            )
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"no tokenizer in {folder}: {exc}", reason="NO_TOKENIZER"
            ) from None
        self._tokenizer = tokenizer
        return tokenizer


class SamplingClient(_ClientIsItsOwnFuture):
    """Samples from frozen weights (Tinker's ``SamplingClient``).

    Args:
        rpc: The trainer connection.
        model_path: ``tensafe://`` path from ``save_weights_for_sampler``.
    """

    def __init__(self, rpc: TrainerRpc, *, model_path: str) -> None:
        self._rpc = rpc
        self.model_path = model_path

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[types.SampleResponse]:
        """Sample ``num_samples`` completions of ``prompt`` with their logprobs.

        Args:
            prompt: The prompt.
            num_samples: How many completions.
            sampling_params: Sampling parameters.
            include_prompt_logprobs: Also score the prompt (one extra server job).
            topk_prompt_logprobs: Not supported; must be 0.

        Returns:
            Future of the completions.
        """
        if topk_prompt_logprobs:
            raise InvalidArgument("topk_prompt_logprobs", "not supported; use 0")
        request = pb.SampleRequest(
            model_path=self.model_path,
            prompt=serde.model_input_to_proto(prompt),
            num_samples=num_samples,
            sampling_params=serde.sampling_params_to_proto(sampling_params),
            request_id=new_request_id(),
        )
        sampled: ServerFuture[pb.SampleResult] = ServerFuture(
            self._rpc, self._rpc.submit("Sample", request), pb.SampleResult, lambda m: m
        )
        future_id = sampled.future_id
        if not include_prompt_logprobs:
            return MappedFuture(
                sampled, lambda m: serde.sample_response_from_proto(m, future_id=future_id)
            )
        scored = self.compute_logprobs(prompt)

        def combine(results: list[Any]) -> types.SampleResponse:
            return serde.sample_response_from_proto(
                results[0], prompt_logprobs=results[1], future_id=future_id
            )

        return CombinedFuture([sampled, scored], combine)

    async def sample_async(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> types.SampleResponse:
        """Async :meth:`sample`; returns the response (as Tinker's ``sample_async``)."""
        future = self.sample(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs
        )
        return await future.result_async()

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        """Log-probability of each prompt token (``None`` for the first)."""
        request = pb.ComputeLogprobsRequest(
            model_path=self.model_path,
            sequences=[serde.model_input_to_proto(prompt)],
            request_id=new_request_id(),
        )

        def first(result: pb.ComputeLogprobsResult) -> list[float | None]:
            if len(result.sequences) != 1:
                raise InvalidArgument(
                    "sequences", f"server scored {len(result.sequences)} sequences, sent 1"
                )
            return serde.sequence_logprobs_from_proto(result.sequences[0])

        return ServerFuture(
            self._rpc,
            self._rpc.submit("ComputeLogprobs", request),
            pb.ComputeLogprobsResult,
            first,
        )

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> list[float | None]:
        """Async :meth:`compute_logprobs`; returns the logprobs."""
        return await self.compute_logprobs(prompt).result_async()


def _check_name(field: str, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(field, f"{name!r} must match [A-Za-z0-9._-]{{1,64}}")


def _surrogate_datum(datum: types.Datum, weights: torch.Tensor | None) -> types.Datum:
    """The datum as a ``cross_entropy`` one: its ``target_tokens`` and ``weights`` (zeros
    when ``None`` and the datum has none: a forward pass only needs the tokens)."""
    targets = datum.loss_fn_inputs.get("target_tokens")
    if targets is None:
        raise ValueError("forward_backward_custom needs target_tokens in every datum")
    if weights is not None:
        weight_data = types.TensorData.from_torch(weights.reshape(-1).float())
    else:
        weight_data = datum.loss_fn_inputs.get("weights") or types.TensorData(
            data=[0.0] * len(targets.data), dtype="float32"
        )
    return types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"target_tokens": targets, "weights": weight_data},
    )


TOKENIZER_CACHE_ENV = "TENSAFE_TOKENIZER_CACHE"
"""Where tokenizers fetched from the trainer are kept (default ~/.cache/tensafe/tokenizers)."""


def _cached_tokenizer(served: pb.GetBaseModelTokenizerResponse) -> Path:
    """The folder holding the served tokenizer files, written on first use.

    The folder is named by the server's digest of the files; it is filled in a temporary
    sibling and renamed into place, so a reader never sees a half-written tokenizer.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", served.sha256):
        raise FailedPrecondition("the trainer sent a tokenizer without a valid digest")
    root = Path(
        os.environ.get(TOKENIZER_CACHE_ENV) or Path.home() / ".cache" / "tensafe" / "tokenizers"
    )
    folder = root / served.sha256
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    for file in served.files:
        if Path(file.name).name != file.name or file.name in ("", ".", ".."):
            raise FailedPrecondition(f"the trainer sent a tokenizer file named {file.name!r}")
        (staging / file.name).write_bytes(file.content)
    try:
        staging.rename(folder)
    except OSError:
        # Another process put the same digest in place first: theirs is as good.
        shutil.rmtree(staging, ignore_errors=True)
    return folder


ENDPOINTS_ROUTE = "/api/v1/tensafe/endpoints"
"""The Tinker API's route announcing the gRPC endpoints behind it."""


def discover_endpoints(tinker_base_url: str, *, timeout: float = 10.0) -> tuple[str, str]:
    """The trainer's and auth's gRPC addresses, as the Tinker API at ``tinker_base_url``
    announces them (``GET /api/v1/tensafe/endpoints``, no credential involved).

    Raises:
        Unavailable: The Tinker API cannot be reached.
        FailedPrecondition: It answered something other than the two addresses.
    """
    import urllib.error
    import urllib.request

    url = tinker_base_url.rstrip("/") + ENDPOINTS_ROUTE
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"cannot reach the Tinker API at {url}: {exc}") from None
    except ValueError:
        raise FailedPrecondition(f"{url} did not answer JSON") from None
    trainer, auth = (
        body.get(key) if isinstance(body, dict) else None for key in ("trainer", "auth")
    )
    if not (isinstance(trainer, str) and trainer and isinstance(auth, str) and auth):
        raise FailedPrecondition(f"{url} did not announce the trainer and auth endpoints")
    return trainer, auth

"""The HTTP routes of the ``tinker`` SDK 0.38.0, each a thin translation: read the SDK's
body → call the trainer (or auth) with the caller's token → answer in the SDK's shape.

docs/tinker.md has the route table. Every id handed out is one the trainer already has
(or encodes one), so this layer holds no state and a restart loses nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import zstandard
from aiohttp import web

from tensafe.common.errors import InvalidArgument, TenSafeError, Unauthenticated
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker_api import errors, privacy, serde
from tensafe.tinker_api.backend import Backend, future_error
from tensafe.tinker_api.config import TinkerApiConfig
from tensafe.tinker_api.wire import tinker_public_pb2 as wire

log = logging.getLogger(__name__)

API = "/api/v1"
PROTOBUF = "application/x-protobuf"

# LoRA targets of the SDK's three switches, by module name (Llama/Qwen/Mistral names).
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_UNEMBED = ("lm_head",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def caller_token(request: web.Request) -> str:
    """The caller's credential: the SDK's ``X-API-Key`` (or ``Authorization: Bearer``)."""
    token = request.headers.get("X-API-Key", "").strip()
    if not token:
        bearer = request.headers.get("Authorization", "")
        token = bearer[len("Bearer ") :].strip() if bearer.startswith("Bearer ") else ""
    if not token:
        raise Unauthenticated(
            "no credential: send a TenSafe JWT as the SDK's API key (TINKER_CREDENTIAL_CMD="
            '"tensafe token")',
            reason="TOKEN_MISSING",
        )
    return token


class TinkerRoutes:
    """The route handlers.

    Args:
        config: The service's settings.
        backend: The trainer's and auth's stubs.
    """

    def __init__(self, config: TinkerApiConfig, backend: Backend) -> None:
        self._config = config
        self._backend = backend
        self._max_body = config.tinker_max_request_bytes

    def table(self) -> list[web.RouteDef]:
        """Every route served (anything else is answered by the not-served middleware)."""
        post = {
            "client/config": self.client_config,
            "client/dynamic_config": self.dynamic_config,
            "auth/token": self.auth_token,
            "create_session": self.create_session,
            "session_heartbeat": self.session_heartbeat,
            "sessions/{session_id}/finish": self.finish_session,
            "telemetry": self.telemetry,
            "create_model": self.create_model,
            "get_info": self.get_info,
            "forward_backward": self.forward_backward,
            "optim_step": self.optim_step,
            "save_weights": self.save_weights,
            "load_weights": self.load_weights,
            "save_weights_for_sampler": self.save_weights_for_sampler,
            "create_sampling_session": self.create_sampling_session,
            "asample": self.asample,
            "retrieve_future": self.retrieve_future,
            "cancel_future": self.cancel_future,
        }
        get = {
            "healthz": self.healthz,
            "tensafe/endpoints": self.endpoints,
            "get_server_capabilities": self.capabilities,
            "samplers/{sampler_id}": self.get_sampler,
        }
        return [web.post(f"{API}/{path}", handler) for path, handler in post.items()] + [
            web.get(f"{API}/{path}", handler, allow_head=False) for path, handler in get.items()
        ]

    # -- bodies ----------------------------------------------------------------------

    async def _bytes(self, request: web.Request) -> bytes:
        raw = await request.read()
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", "zstd"):
            raise InvalidArgument("Content-Encoding", f"{encoding!r} is not supported; use zstd")
        if encoding == "zstd":
            try:
                raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=self._max_body)
            except zstandard.ZstdError as error:
                raise InvalidArgument("body", f"is not valid zstd: {error}") from None
            if len(raw) > self._max_body:
                raise InvalidArgument("body", f"is larger than {self._max_body} bytes")
        return raw

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await self._bytes(request)
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument("body", f"is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("body", "must be a JSON object")
        return body

    # -- session, config, auth -------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness."""
        return _json({"status": "ok"})

    async def endpoints(self, request: web.Request) -> web.Response:
        """TenSafe's own route: the gRPC endpoints behind this front door, so that
        ``tensafe.tinker.ServiceClient(base_url=<this URL>, api_key=...)`` needs one
        address (docs/tinker.md). Addresses only: no credential is needed or given."""
        return _json(
            {
                "trainer": self._config.public_trainer_url or self._config.trainer_url,
                "auth": self._config.public_auth_url or self._config.auth_url,
                "tls": self._config.tls_ca_file is not None,
            }
        )

    async def client_config(self, request: web.Request) -> web.Response:
        """Feature flags: JWT exchange on (so TINKER_CREDENTIAL_CMD works), newer features
        off, forward_backward chunks in order."""
        return _json(
            {
                "pjwt_auth_enabled": True,
                "credential_default_source": "api_key",
                "parallel_fwdbwd_chunks": False,
                "proto_compress_fwdbwd": self._config.tinker_zstd_requests,
                "use_pyqwest_transport": False,
                "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False,
                "sample_join_sampling_session": False,
                "fwdbwd_max_chunk_bytes_count": self._max_body // 2,
            }
        )

    async def dynamic_config(self, request: web.Request) -> web.Response:
        """The SDK's periodic flags; explicit sampling cancel on."""
        return _json({"refresh_interval_sec": 300, "sample_cancel_enabled": True})

    async def auth_token(self, request: web.Request) -> web.Response:
        """The JWT the SDK sends from now on. A TenSafe JWT is returned as it is once the
        trainer accepted it; a TenSafe API key is exchanged at auth."""
        credential = caller_token(request)
        token = await self._backend.access_token(credential)
        if token == credential:
            await self._backend.list_base_models(token)
        return _json({"jwt": token})

    async def capabilities(self, request: web.Request) -> web.Response:
        """The base models (trainable and sampleable from saved weights)."""
        models = await self._backend.list_base_models(caller_token(request))
        return _json(
            {
                "supported_models": [
                    {
                        "model_name": m.name,
                        "max_context_length": m.max_context_length,
                        "trainable": True,
                        "sampleable": True,
                    }
                    for m in models
                ]
            }
        )

    async def create_session(self, request: web.Request) -> web.Response:
        """A session id; the credential is checked now so a revoked one fails at once."""
        await self._body(request)
        await self._backend.list_base_models(caller_token(request))
        return _json({"type": "create_session", "session_id": f"sess-{uuid.uuid4().hex}"})

    async def session_heartbeat(self, request: web.Request) -> web.Response:
        """Sessions hold nothing on this server; a heartbeat is acknowledged."""
        caller_token(request)
        return _json({"type": "session_heartbeat"})

    async def finish_session(self, request: web.Request) -> web.Response:
        """Acknowledged (training clients live on in the trainer, as on gRPC)."""
        caller_token(request)
        return _json({})

    async def telemetry(self, request: web.Request) -> web.Response:
        """Accepted and dropped: the SDK's telemetry may carry user data; it is not kept."""
        await request.read()
        return _json({"status": "accepted"})

    # -- training clients ------------------------------------------------------------

    async def create_model(self, request: web.Request) -> web.Response:
        """``create_lora_training_client``: a DP training client (docs/tinker.md)."""
        body = await self._body(request)
        token = caller_token(request)
        base_model = serde.field(body, "base_model", str)
        lora = body.get("lora_config") or {}
        if not isinstance(lora, dict):
            raise InvalidArgument("lora_config", "must be an object")
        rank = serde.field(lora, "rank", int)
        optimizer = body.get("optimizer_config") or {"type": "adamw"}
        if not isinstance(optimizer, dict) or optimizer.get("type") != "adamw":
            raise InvalidArgument("optimizer_config", "only the adamw optimizer is supported")
        user_metadata = body.get("user_metadata")
        if user_metadata is not None and not isinstance(user_metadata, dict):
            raise InvalidArgument("user_metadata", "must be an object")
        targets = await self._lora_targets(token, base_model, lora)
        message = pb.CreateTrainingClientRequest(
            base_model=base_model,
            lora=pb.LoraConfig(
                rank=rank, seed=serde.integer(lora, "seed", 0), target_modules=targets
            ),
            dp=privacy.dp_config(self._config, user_metadata),
        )
        message.request_id = serde.idempotency_key(
            "create_model",
            str(body.get("session_id", "")),
            body.get("model_seq_id"),
            message,
        )
        created = await self._backend.create_training_client(message, token)
        log.info(
            "tinker create_model %s on %s (private=%s)", created.id, base_model, created.private
        )
        return _json({"request_id": serde.CREATED_PREFIX + created.id, "model_id": created.id})

    async def _lora_targets(
        self, token: str, base_model: str, lora: Mapping[str, Any]
    ) -> list[str]:
        """The modules of the SDK's train_attn/train_mlp/train_unembed switches that the
        base model lets LoRA adapt."""
        models = {m.name: m for m in await self._backend.list_base_models(token)}
        if base_model not in models:
            raise InvalidArgument(
                "base_model", f"unknown base model {base_model!r}; known: {sorted(models)}"
            )
        wanted: list[str] = []
        for switch, names in (
            ("train_attn", _ATTENTION),
            ("train_mlp", _MLP),
            ("train_unembed", _UNEMBED),
        ):
            if lora.get(switch, True):
                wanted.extend(names)
        allowed = list(models[base_model].lora_target_modules)
        targets = [name for name in allowed if name in wanted]
        if not targets:
            raise InvalidArgument(
                "lora_config",
                f"none of the selected layers can be adapted on {base_model}; LoRA targets: "
                f"{allowed}",
            )
        return targets

    async def get_info(self, request: web.Request) -> web.Response:
        """Model info, plus the ``privacy`` block (ε spent)."""
        body = await self._body(request)
        token = caller_token(request)
        model_id = serde.field(body, "model_id", str)
        client = await self._backend.get_training_client(
            await self._client_id(token, model_id), token
        )
        spent = await self._backend.privacy_spent(client.id, token)
        return _json(
            {
                "type": "get_info",
                "model_id": model_id,
                "model_name": client.base_model,
                # tokenizer_id: the SDK's get_tokenizer() loads it with from_pretrained,
                # which HF_ENDPOINT=<this service> resolves on the Hub routes (hub.py).
                "model_data": {
                    "model_name": client.base_model,
                    "arch": None,
                    "tokenizer_id": client.base_model,
                },
                "is_lora": True,
                "lora_rank": client.lora.rank,
                "optimizer_config": {"type": "adamw"},
                "privacy": serde.privacy_json(spent),
            }
        )

    async def _client_id(self, token: str, model_id: str) -> str:
        """The TenSafe training client behind an SDK model id: itself, or for a client
        the SDK created from a checkpoint (it names those ``<session>:train:<n>``), the
        client the trainer made under the matching creation request id."""
        if serde.LOADED_MODEL_MARK not in model_id:
            return model_id
        found = await self._backend.get_training_client_by_request(
            serde.loaded_client_request_id(model_id), token
        )
        return found.id

    async def _submitted(
        self, token: str, message: Any, kind: str, model_id: str, seq_id: object
    ) -> str:
        message.request_id = serde.idempotency_key(kind, model_id, seq_id, message)
        return await self._backend.submit(message, token)

    async def forward_backward(self, request: web.Request) -> web.Response:
        """forward_backward / forward: a protobuf body (zstd when configured)."""
        token = caller_token(request)
        raw = await self._bytes(request)
        wire_request = wire.ForwardBackwardRequest()
        try:
            wire_request.ParseFromString(raw)
        except Exception as error:  # protobuf raises DecodeError subclasses
            raise InvalidArgument("body", f"is not a ForwardBackwardRequest: {error}") from None
        if not wire_request.model_id:
            raise InvalidArgument("model_id", "is required")
        if not wire_request.loss_fn:
            raise InvalidArgument("forward_backward_input.loss_fn", "is required")
        data = serde.datums(wire_request)
        if not data:
            raise InvalidArgument("forward_backward_input.data", "must hold at least one datum")
        config = serde.loss_fn_config(wire_request)
        message: pb.ForwardRequest | pb.ForwardBackwardRequest
        cls = pb.ForwardRequest if wire_request.forward_only else pb.ForwardBackwardRequest
        message = cls(
            training_client_id=await self._client_id(token, wire_request.model_id),
            data=data,
            loss_fn=wire_request.loss_fn,
            loss_fn_config=config,
        )
        kind = "forward" if wire_request.forward_only else "forward_backward"
        future_id = await self._submitted(
            token, message, kind, wire_request.model_id, wire_request.seq_id
        )
        return _json({"request_id": future_id, "model_id": wire_request.model_id})

    async def optim_step(self, request: web.Request) -> web.Response:
        """optim_step with AdamParams; the trainer adds the DP noise and charges ε."""
        body = await self._body(request)
        token = caller_token(request)
        model_id = serde.field(body, "model_id", str)
        if "optimizer_params" in body:
            raise InvalidArgument("optimizer_params", "only Adam (adam_params) is supported")
        adam = body.get("adam_params")
        if not isinstance(adam, dict):
            raise InvalidArgument("adam_params", "is required")
        if serde.number(adam, "grad_clip_norm", 0.0) != 0.0:
            raise InvalidArgument(
                "adam_params.grad_clip_norm",
                "must be 0: under DP every example's gradient is clipped to the training "
                "client's max_grad_norm (user_metadata tensafe.dp.max_grad_norm) instead",
            )
        message = pb.OptimStepRequest(
            training_client_id=await self._client_id(token, model_id),
            adam_params=pb.AdamParams(
                learning_rate=serde.field(adam, "learning_rate", float),
                beta1=serde.number(adam, "beta1", 0.9),
                beta2=serde.number(adam, "beta2", 0.95),
                eps=serde.number(adam, "eps", 1e-12),
                weight_decay=serde.number(adam, "weight_decay", 0.0),
            ),
        )
        future_id = await self._submitted(
            token, message, "optim_step", model_id, body.get("seq_id")
        )
        return _json({"request_id": future_id, "model_id": model_id})

    async def save_weights(self, request: web.Request) -> web.Response:
        """save_state: weights, optimizer and accountant state under a name."""
        body = await self._body(request)
        token = caller_token(request)
        model_id = serde.field(body, "model_id", str)
        seq_id = body.get("seq_id")
        name = serde.field(body, "path", str, required=False) or f"state-{seq_id}"
        message = pb.SaveStateRequest(
            training_client_id=await self._client_id(token, model_id), name=name
        )
        future_id = await self._submitted(token, message, "save_state", model_id, seq_id)
        return _json({"request_id": future_id, "model_id": model_id})

    async def load_weights(self, request: web.Request) -> web.Response:
        """load_state(_with_optimizer) into a training client (its privacy lineage takes
        on the checkpoint's); with ``session_id`` + ``model_seq_id`` instead of a
        ``model_id``, the SDK's create_training_client_from_state(_with_optimizer): a new
        client with the checkpoint client's base model, LoRA and DP settings, created
        under a request id derived from the model id the SDK gives it, then loaded."""
        body = await self._body(request)
        token = caller_token(request)
        path = serde.to_tensafe_path("path", serde.field(body, "path", str))
        if body.get("model_id") is None:
            model_id = serde.loaded_model_id(
                serde.field(body, "session_id", str), serde.field(body, "model_seq_id", int)
            )
            if body.get("base_model") is not None:
                raise InvalidArgument(
                    "base_model", "is taken from the checkpoint; overriding it is not supported"
                )
            source = await self._backend.get_training_client(
                serde.client_of_path("path", path), token
            )
            create = pb.CreateTrainingClientRequest(
                base_model=source.base_model,
                request_id=serde.loaded_client_request_id(model_id),
            )
            create.lora.CopyFrom(source.lora)
            if source.private:
                create.dp.CopyFrom(source.dp)
            created = await self._backend.create_training_client(create, token)
            log.info("tinker create-from-state %s as %s from %s", model_id, created.id, path)
            client_id = created.id
        else:
            model_id = serde.field(body, "model_id", str)
            client_id = await self._client_id(token, model_id)
        message = pb.LoadStateRequest(training_client_id=client_id, path=path)
        future_id = await self._submitted(
            token, message, "load_state", model_id, body.get("seq_id")
        )
        return _json({"request_id": future_id, "model_id": model_id})

    async def save_weights_for_sampler(self, request: web.Request) -> web.Response:
        """Freeze the weights for sampling, named or (for a sampling client) by seq id."""
        body = await self._body(request)
        token = caller_token(request)
        model_id = serde.field(body, "model_id", str)
        if body.get("kind", "snapshot") != "snapshot":
            raise InvalidArgument("kind", "only snapshot sampling clients are supported")
        seq_id = body.get("seq_id")
        name = serde.field(body, "path", str, required=False) or f"sampler-{seq_id}"
        message = pb.SaveWeightsForSamplerRequest(
            training_client_id=await self._client_id(token, model_id), name=name
        )
        future_id = await self._submitted(
            token, message, "save_weights_for_sampler", model_id, seq_id
        )
        return _json({"request_id": future_id, "model_id": model_id})

    # -- sampling --------------------------------------------------------------------

    async def _sampler_path(self, token: str, field_name: str, model_path: Any) -> tuple[str, str]:
        """The ``tensafe://`` path and base model of saved weights the caller owns."""
        if not isinstance(model_path, str) or not model_path:
            raise InvalidArgument(
                field_name,
                "is required: TenSafe samples from saved weights (save_weights_for_sampler), "
                "not from a bare base model",
            )
        path = serde.to_tensafe_path(field_name, model_path)
        client = await self._backend.get_training_client(
            serde.client_of_path(field_name, path), token
        )
        return path, client.base_model

    async def create_sampling_session(self, request: web.Request) -> web.Response:
        """A sampling session on saved weights (its id encodes their path)."""
        body = await self._body(request)
        path, _ = await self._sampler_path(
            caller_token(request), "model_path", body.get("model_path")
        )
        return _json(
            {
                "type": "create_sampling_session",
                "sampling_session_id": serde.sampling_session_id(path, uuid.uuid4().hex[:12]),
            }
        )

    async def get_sampler(self, request: web.Request) -> web.Response:
        """What a sampling session samples from."""
        session_id = request.match_info["sampler_id"]
        path = serde.path_of_sampling_session("sampler_id", session_id)
        _, base_model = await self._sampler_path(caller_token(request), "sampler_id", path)
        return _json(
            {
                "sampler_id": session_id,
                "base_model": base_model,
                "model_path": serde.to_tinker_path(path),
            }
        )

    async def asample(self, request: web.Request) -> web.Response:
        """Sample completions; the future's sequence ids are ``<future id>.<i>``."""
        body = await self._body(request)
        token = caller_token(request)
        # record_stability_info is accepted and not acted on: it only serves Tinker's
        # stable_reinforce loss, which the trainer refuses by name (docs/tinker.md).
        for unsupported in (
            "target_prompt_logprobs",
            "prompt_logprobs_last_n",
        ):
            if body.get(unsupported):
                raise InvalidArgument(unsupported, "is not supported by TenSafe's sampler")
        for count in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(count):
                raise InvalidArgument(count, "is not supported by TenSafe's sampler; send 0")
        if body.get("sampling_session_id"):
            model_path = serde.path_of_sampling_session(
                "sampling_session_id", body["sampling_session_id"]
            )
        else:
            model_path, _ = await self._sampler_path(token, "model_path", body.get("model_path"))
        num_samples = serde.field(body, "num_samples", int, required=False) or 1
        message = pb.SampleRequest(
            model_path=model_path,
            prompt=pb.ModelInput(
                chunks=[
                    pb.ModelInputChunk(
                        encoded_text=pb.EncodedTextChunk(
                            tokens=serde.tokens_of("prompt", body.get("prompt"))
                        )
                    )
                ]
            ),
            num_samples=num_samples,
            sampling_params=_sampling_params(body.get("sampling_params")),
        )
        scope = str(body.get("sampling_session_id") or model_path)
        future_id = await self._submitted(token, message, "sample", scope, body.get("seq_id"))
        if body.get("prompt_logprobs"):
            # compute_logprobs: the trainer scores the prompt in a second future; the
            # request id names both, so nothing needs remembering.
            scoring = pb.ComputeLogprobsRequest(model_path=model_path, sequences=[message.prompt])
            scoring_id = await self._submitted(
                token, scoring, "compute_logprobs", scope, body.get("seq_id")
            )
            return _json(
                {
                    "request_id": serde.paired_request_id(future_id, scoring_id),
                    "sample_sequence_ids": [f"{future_id}.{i}" for i in range(num_samples)],
                }
            )
        return _json(
            {
                "request_id": future_id,
                "sample_sequence_ids": [f"{future_id}.{i}" for i in range(num_samples)],
            }
        )

    # -- futures ---------------------------------------------------------------------

    async def retrieve_future(self, request: web.Request) -> web.Response:
        """A future's result; 408 try-again while pending; ``{"error"}`` when it failed."""
        body = await self._body(request)
        token = caller_token(request)
        request_id = serde.field(body, "request_id", str)
        if request_id.startswith(serde.CREATED_PREFIX):
            model_id = request_id[len(serde.CREATED_PREFIX) :]
            client = await self._backend.get_training_client(model_id, token)
            return _json({"type": "create_model", "model_id": client.id})
        paired = serde.split_paired_request_id(request_id)
        if paired is not None:
            return await self._retrieve_sample_with_prompt_logprobs(token, request_id, *paired)
        future = await self._backend.wait_future(
            request_id, token, self._config.tinker_retrieve_wait_seconds
        )
        if not _done(future):
            return _try_again(request_id)
        if future.status != common_pb2.FUTURE_STATUS_SUCCEEDED:
            code, message = future_error(future)
            return _json(errors.failed_future_body(code, message))
        proto = serde.proto_result(future.result)
        if proto is not None:
            return web.Response(body=proto, content_type=PROTOBUF)
        result = serde.json_result(future.result)
        if result is None:
            raise TenSafeError(f"future {request_id} has a result this API does not translate")
        return _json(result)

    async def _retrieve_sample_with_prompt_logprobs(
        self, token: str, request_id: str, sample_id: str, scoring_id: str
    ) -> web.Response:
        """Both futures of a sample with prompt logprobs, as one SampleResponse."""
        wait = self._config.tinker_retrieve_wait_seconds
        futures = []
        for future_id in (sample_id, scoring_id):
            future = await self._backend.wait_future(future_id, token, wait / 2)
            if not _done(future):
                return _try_again(request_id)
            if future.status != common_pb2.FUTURE_STATUS_SUCCEEDED:
                code, message = future_error(future)
                return _json(errors.failed_future_body(code, message))
            futures.append(future)
        sample, scores = pb.SampleResult(), pb.ComputeLogprobsResult()
        futures[0].result.Unpack(sample)
        futures[1].result.Unpack(scores)
        return web.Response(
            body=serde.sample_response(sample, prompt_logprobs=scores.sequences[0]),
            content_type=PROTOBUF,
        )

    async def cancel_future(self, request: web.Request) -> web.Response:
        """Cancel an abandoned sample."""
        body = await self._body(request)
        token = caller_token(request)
        request_id = serde.field(body, "request_id", str)
        for future_id in serde.split_paired_request_id(request_id) or (request_id,):
            await self._backend.cancel_future(future_id, token)
        return _json({})


def _done(future: common_pb2.Future) -> bool:
    return future.status not in (
        common_pb2.FUTURE_STATUS_PENDING,
        common_pb2.FUTURE_STATUS_RUNNING,
    )


def _try_again(request_id: str) -> web.Response:
    """408 try-again: the SDK retries at once (a 200 try-again would also log a warning)."""
    return _json(
        {"type": "try_again", "request_id": request_id, "queue_state": "active"}, status=408
    )


def _sampling_params(params: Any) -> pb.SamplingParams:
    """The SDK's ``SamplingParams`` as the trainer's."""
    if not isinstance(params, dict):
        raise InvalidArgument("sampling_params", "is required")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidArgument("sampling_params.max_tokens", "must be an integer >= 1")
    top_k = serde.integer(params, "top_k", -1)
    message = pb.SamplingParams(
        max_tokens=max_tokens,
        temperature=serde.number(params, "temperature", 1.0),
        top_k=0 if top_k < 0 else top_k,
        top_p=serde.number(params, "top_p", 1.0),
        seed=serde.integer(params, "seed", 0),
    )
    stop = params.get("stop")
    if isinstance(stop, str):
        message.stop.append(stop)
    elif isinstance(stop, list):
        for item in stop:
            if isinstance(item, str):
                message.stop.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                message.stop_tokens.add(tokens=[item])
            else:
                raise InvalidArgument("sampling_params.stop", "must hold strings or token ids")
    elif stop is not None:
        raise InvalidArgument("sampling_params.stop", "must be a string or a list")
    return message

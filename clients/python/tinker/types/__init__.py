"""Data types of the Tinker-compatible SDK (``tensafe.tinker.types``).

Names, fields, defaults and helper methods follow Tinker's public ``tinker.types``
(``Datum``, ``ModelInput.from_ints``, ``TensorData.from_numpy``/``to_torch``,
``AdamParams``, ``SamplingParams``, ``ForwardBackwardOutput.loss_fn_outputs`` as one dict
of ``TensorData`` per datum, ...), so code written against Tinker builds the same
objects. They are frozen dataclasses rather than pydantic models; construction is by
keyword as in Tinker. Differences are listed in docs/sdk.md.

TenSafe additions: :class:`PrivacySpent` (what a DP client has spent) and the
``step``/``privacy_spent`` fields of :class:`OptimStepResponse`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np

from tensafe.tinker.types.provenance_spans import (
    PromptProvenanceSpan,
    ProvenanceSpans,
    SampledProvenanceSpan,
)
from tensafe.tinker.types.tensor_data import TensorData, TensorDtype

LossFnType: TypeAlias = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
"""Loss functions the server implements."""

StopReason: TypeAlias = Literal["length", "stop"]
"""Why a sampled sequence ended: ``max_tokens`` reached, or a stop condition."""

ModelID: TypeAlias = str
"""Server-assigned id of a training client."""

Accountant: TypeAlias = Literal["rdp", "pld"]
"""Privacy accountant: Renyi DP or privacy loss distributions (Google dp-accounting)."""


@dataclasses.dataclass(frozen=True)
class EncodedTextChunk:
    """Token ids of one chunk of model input.

    Attributes:
        tokens: The token ids.
        type: Always ``"encoded_text"`` (Tinker's chunk discriminator).
    """

    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        """Number of tokens."""
        return len(self.tokens)


ModelInputChunk: TypeAlias = EncodedTextChunk
"""A chunk of model input; only text chunks exist in TenSafe (no images)."""


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """Model input as a list of chunks, concatenated (Tinker's ``ModelInput``).

    Attributes:
        chunks: The chunks.
    """

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        """One chunk of these token ids."""
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        """No tokens."""
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """All token ids, in order."""
        return [int(token) for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        """Total number of tokens."""
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """A new input with ``chunk`` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new input with one token added at the end."""
        return self.append(EncodedTextChunk(tokens=[int(token)]))


# Wire dtype of plain Python lists by loss-input name (as Tinker infers them).
_KEY_DTYPE: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
}

LossFnInputs: TypeAlias = Mapping[str, Any]
"""Loss inputs by name: ``TensorData``, numpy arrays, torch tensors, lists of numbers
or (for token ids) a ``ModelInput``; :class:`Datum` converts them to ``TensorData``."""


def to_tensor_data(key: str, value: Any) -> TensorData:
    """Convert one loss input to :class:`TensorData` the way Tinker's ``Datum`` does.

    Args:
        key: The input's name (decides the dtype of a plain list).
        value: ``TensorData``, numpy array, torch tensor, ``ModelInput`` or list.

    Returns:
        The tensor.

    Raises:
        TypeError: An unsupported value type.
        ValueError: A ragged or non-numeric list, or a list under an unknown name.
    """
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, ModelInput):
        return TensorData(data=value.to_ints(), dtype="int64", shape=[value.length])
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return TensorData.from_torch(value)
    if isinstance(value, list | tuple):
        if key not in _KEY_DTYPE:
            raise ValueError(
                f"loss input {key!r}: pass TensorData or an array for a list under this name"
            )
        array = np.asarray(value)
        if array.dtype.kind not in ("f", "i", "u", "b") and len(value) > 0:
            raise ValueError(f"loss input {key!r} must be a rectangular numeric array")
        wanted = np.int64 if _KEY_DTYPE[key] == "int64" else np.float32
        return TensorData.from_numpy(array.astype(wanted))
    raise TypeError(f"unsupported loss_fn_inputs value for {key!r}: {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Datum:
    """One training example: model input and the loss function's per-token inputs.

    ``cross_entropy`` takes ``target_tokens`` (int64) and ``weights`` (float32), one per
    input token; ``importance_sampling``, ``ppo``, ``cispo`` and ``dro`` take ``logprobs`` (the
    sampler's) and ``advantages``.

    Attributes:
        model_input: Input tokens.
        loss_fn_inputs: Converted to ``TensorData`` on construction.
        model_input_spans: Provenance of the input tokens (Tinker's; attach with
            :meth:`with_provenance`). Validated, not sent: only Tinker's unpublished
            ``stable_reinforce`` reads it, and TenSafe refuses that loss.
        loss_fn_input_spans: Provenance of the ``target_tokens`` rows; as above.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = dataclasses.field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    loss_fn_input_spans: ProvenanceSpans | None = None

    def __post_init__(self) -> None:
        converted = {key: to_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()}
        object.__setattr__(self, "loss_fn_inputs", converted)
        for name in ("model_input_spans", "loss_fn_input_spans"):
            for span in getattr(self, name) or ():
                if not isinstance(span, PromptProvenanceSpan | SampledProvenanceSpan):
                    raise TypeError(
                        f"{name} entries must be PromptProvenanceSpan or "
                        f"SampledProvenanceSpan, got {type(span).__name__}"
                    )
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")

    def with_provenance(
        self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans
    ) -> Datum:
        """A copy carrying provenance for both span-annotated fields (Tinker's method).

        Args:
            model_input: Runs tiling the input tokens.
            loss_fn_inputs: Runs tiling ``loss_fn_inputs["target_tokens"]`` (checked when
                it is 1-D).

        Raises:
            ValueError: The runs do not tile their field exactly.
        """
        _check_tiling("model_input", model_input, self.model_input.length)
        target_tokens = self.loss_fn_inputs.get("target_tokens")
        shape = None if target_tokens is None else target_tokens.shape
        if target_tokens is not None and (shape is None or len(shape) == 1):
            _check_tiling("loss_fn_inputs", loss_fn_inputs, len(target_tokens.data))
        return dataclasses.replace(
            self, model_input_spans=list(model_input), loss_fn_input_spans=list(loss_fn_inputs)
        )


def _check_tiling(argument: str, spans: ProvenanceSpans, expected_length: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected_length:
        raise ValueError(
            f"with_provenance {argument} spans cover {total} positions but the field has "
            f"{expected_length}; the runs must tile it exactly"
        )


LossFnOutput: TypeAlias = dict[str, TensorData]
"""Per-datum outputs of a loss function, e.g. ``logprobs`` and ``elementwise_loss``."""


@dataclasses.dataclass(frozen=True)
class ForwardBackwardOutput:
    """Result of ``forward_backward`` and ``forward``.

    Attributes:
        loss_fn_output_type: Name of the record type of ``loss_fn_outputs``.
        loss_fn_outputs: One dict per datum, in order.
        metrics: Scalar metrics, e.g. ``loss:sum`` and (DP) ``clipped_fraction``.
    """

    loss_fn_output_type: str
    loss_fn_outputs: list[LossFnOutput]
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class AdamParams:
    """Adam(W) hyper-parameters of one optimizer step (Tinker's defaults).

    Attributes:
        learning_rate: Step size, > 0.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Denominator term.
        weight_decay: Decoupled weight decay (AdamW), >= 0.
        grad_clip_norm: Tinker's global gradient clipping; must stay 0 here: a DP
            client clips per example to its ``max_grad_norm`` instead, and global
            clipping is not part of the server's contract.
    """

    learning_rate: float = 0.0001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class PrivacySpent:
    """Privacy spent by a training client (TenSafe addition).

    Attributes:
        epsilon: epsilon at ``delta`` of every DP step the client's weights have seen
            (checkpoints of other clients it loaded included); ``inf`` for a
            non-private client.
        delta: delta (the tightest of the client's and of the checkpoints' it loaded).
        accountant: ``"rdp"`` or ``"pld"``; ``None`` for a non-private client.
        steps: DP optimizer steps composed, inherited ones included.
        noise_multiplier: sigma (noise std = sigma * max_grad_norm).
        epsilon_budget: The budget that applies (the tightest of the client's and of
            the checkpoints' it loaded), or ``None`` when there is none.
        private: Whether DP-SGD is enforced.
        inherited_steps: Of ``steps``, those taken by the clients whose checkpoints
            were loaded.
        non_private_steps: Optimizer steps without DP the weights continue (epsilon
            does not cover their data).
    """

    epsilon: float
    delta: float
    accountant: Accountant | None
    steps: int
    noise_multiplier: float
    epsilon_budget: float | None
    private: bool
    inherited_steps: int = 0
    non_private_steps: int = 0


@dataclasses.dataclass(frozen=True)
class OptimStepResponse:
    """Result of ``optim_step``.

    Attributes:
        metrics: Scalar metrics, e.g. ``examples`` and ``noise_std``.
        step: The client's step count after this step (TenSafe addition).
        privacy_spent: Privacy spent after this step (TenSafe addition).
    """

    metrics: dict[str, float] | None = None
    step: int = 0
    privacy_spent: PrivacySpent | None = None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters (Tinker's fields and defaults).

    Attributes:
        max_tokens: Tokens to generate at most; required by the server (>= 1).
        seed: Seed of the sampler; ``None`` lets the server draw one.
        stop: A stop string, stop strings, or stop token ids.
        temperature: Softmax temperature, >= 0; 0 is greedy.
        top_k: Keep the k most likely tokens; -1 keeps all.
        top_p: Nucleus mass in (0, 1].
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | Sequence[str] | Sequence[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class SampledSequence:
    """One sampled completion.

    Attributes:
        stop_reason: ``"length"`` or ``"stop"``.
        tokens: Generated token ids.
        logprobs: Log-probability of each token under the distribution sampled from.
        sequence_id: Names this sequence (``<sample future id>.<index>``, as the Tinker
            API names it); Tinker's ``stable_reinforce`` provenance refers to it.
    """

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None


@dataclasses.dataclass(frozen=True)
class SampleResponse:
    """Result of ``SamplingClient.sample``.

    Attributes:
        sequences: ``num_samples`` sequences.
        type: Always ``"sample"``.
        prompt_logprobs: Per prompt token (``None`` for the first), when requested.
        topk_prompt_logprobs: Not produced by TenSafe (always ``None``).
    """

    sequences: Sequence[SampledSequence]
    type: Literal["sample"] = "sample"
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclasses.dataclass(frozen=True)
class SaveWeightsResponse:
    """Result of ``save_state``.

    Attributes:
        path: ``tensafe://`` path of the checkpoint (weights, optimizer, accountant).
        step: Step saved (TenSafe addition).
    """

    path: str
    step: int = 0


@dataclasses.dataclass(frozen=True)
class LoadWeightsResponse:
    """Result of ``load_state``.

    Attributes:
        path: The checkpoint that was loaded.
        step: Step restored (TenSafe addition).
    """

    path: str | None = None
    step: int = 0


@dataclasses.dataclass(frozen=True)
class SaveWeightsForSamplerResponse:
    """Result of ``save_weights_for_sampler``.

    Attributes:
        path: ``tensafe://`` path to sample from.
    """

    path: str


@dataclasses.dataclass(frozen=True)
class SaveAdapterResponse:
    """Result of ``save_adapter`` (TenSafe addition): the published registry version.

    Attributes:
        adapter_name: The registry adapter name.
        version: The version the registry assigned.
        package_sha256: SHA-256 (hex) of the signed, encrypted TGSP package.
    """

    adapter_name: str
    version: int
    package_sha256: str


@dataclasses.dataclass(frozen=True)
class SupportedModel:
    """A base model the server can fine-tune.

    Attributes:
        model_name: The name to pass as ``base_model``.
        vocab_size: Vocabulary size (TenSafe addition).
        max_context_length: Maximum context length (TenSafe addition).
    """

    model_name: str
    vocab_size: int = 0
    max_context_length: int = 0


@dataclasses.dataclass(frozen=True)
class GetServerCapabilitiesResponse:
    """Result of ``ServiceClient.get_server_capabilities``.

    Attributes:
        supported_models: The base models.
    """

    supported_models: list[SupportedModel]


@dataclasses.dataclass(frozen=True)
class ModelData:
    """What ``get_info`` reports about a training client's model.

    Attributes:
        model_name: Base model name.
        lora_rank: LoRA rank.
        private: Whether DP-SGD is enforced (TenSafe addition).
        step: Optimizer steps applied (TenSafe addition).
    """

    model_name: str
    lora_rank: int
    private: bool
    step: int


@dataclasses.dataclass(frozen=True)
class GetInfoResponse:
    """Result of ``TrainingClient.get_info``.

    Attributes:
        model_id: The training client's id.
        model_data: Its model.
    """

    model_id: ModelID
    model_data: ModelData


__all__ = [
    "Accountant",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "LoadWeightsResponse",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "ModelData",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepResponse",
    "PrivacySpent",
    "PromptProvenanceSpan",
    "ProvenanceSpans",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingParams",
    "SaveAdapterResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorDtype",
    "to_tensor_data",
]

"""Tinker-compatible Python SDK of TenSafe (``tensafe.tinker``).

Point a Tinker script at TenSafe by changing its import and base model::

    from tensafe import tinker
    from tensafe.tinker import types

    service_client = tinker.ServiceClient()  # endpoints from `tensafe up`
    training_client = service_client.create_lora_training_client(base_model="tiny-llama")
    ...

The surface follows Tinker's ``ServiceClient``/``TrainingClient``/``SamplingClient``
and ``tinker.types``; DP-SGD is on by default (see docs/sdk.md). Errors are the typed
errors of :mod:`tensafe.common.errors` (``BudgetExhausted``, ``NotFound``,
``InvalidArgument``, ...), re-exported here.
"""

from __future__ import annotations

from tensafe.common.errors import (
    AlreadyExists,
    BudgetExhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TenSafeError,
    Unauthenticated,
    Unavailable,
)
from tensafe.tinker import types
from tensafe.tinker.clients import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_NOISE_MULTIPLIER,
    HIGH_EPSILON,
    PrivacyWarning,
    SamplingClient,
    ServiceClient,
    TrainingClient,
)
from tensafe.tinker.futures import APIFuture, FutureCancelled
from tensafe.tinker.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    PrivacySpent,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__all__ = [
    "DEFAULT_ACCOUNTANT",
    "DEFAULT_DELTA",
    "DEFAULT_MAX_GRAD_NORM",
    "DEFAULT_NOISE_MULTIPLIER",
    "HIGH_EPSILON",
    "APIFuture",
    "AdamParams",
    "AlreadyExists",
    "BudgetExhausted",
    "Datum",
    "EncodedTextChunk",
    "FailedPrecondition",
    "ForwardBackwardOutput",
    "FutureCancelled",
    "InvalidArgument",
    "ModelInput",
    "NotFound",
    "OptimStepResponse",
    "PermissionDenied",
    "PrivacySpent",
    "PrivacyWarning",
    "ResourceExhausted",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TenSafeError",
    "TensorData",
    "TrainingClient",
    "Unauthenticated",
    "Unavailable",
    "types",
]

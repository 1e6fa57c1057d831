"""The TGSP manifest: what a package says about the adapter it seals.

The manifest is public (signed, not encrypted): ``inspect`` reads it without any key,
so nothing secret belongs in it. It is stored as canonical JSON (RFC 8785, see
:mod:`tensafe.tgsp.canonical`); docs/tgsp.md gives the schema member by member. Every
member is required (optional values are present as ``null``) and unknown members are
refused, so one manifest value has exactly one byte encoding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar, TypeAlias

from tensafe.common.errors import InvalidArgument
from tensafe.tgsp.canonical import JsonValue, canonical_json, parse_json_strictly

FORMAT_VERSION = 2
"""The TGSP format version this library writes (docs/tgsp.md §2: version 2 signs what
re-wrapping the data key does not change)."""

READABLE_FORMAT_VERSIONS = (1, 2)
"""The format versions this library reads."""

PAYLOAD_FORMAT = "safetensors"
"""The plaintext payload is one safetensors file."""

PAYLOAD_AEAD = "AES-256-GCM"
"""The payload cipher (NIST SP 800-38D with a 256-bit key)."""

MAX_TEXT_LENGTH = 256
"""Longest identifier (ids, versions, module names) a manifest may carry, in characters."""

MAX_PEFT_CONFIG_LENGTH = 64 * 1024
"""Longest verbatim PEFT adapter_config.json a manifest may carry, in characters."""

MIN_CHUNK_SIZE = 256
"""Smallest payload chunk a package may use (bounds per-chunk overhead on read)."""

MAX_CHUNK_SIZE = 64 * 1024 * 1024
"""Largest payload chunk a package may use (bounds a streaming reader's memory)."""

DEFAULT_CHUNK_SIZE = 1024 * 1024
"""Chunk size writers use unless told otherwise: 1 MiB (see docs/tgsp.md)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Unicode categories Cc (C0, DEL, C1 controls) and Cs (surrogates).
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ACCOUNTANT = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def check_text(value: object, field_name: str, *, max_length: int = MAX_TEXT_LENGTH) -> str:
    """Check that ``value`` is a non-empty string without control characters.

    Args:
        value: The value to check.
        field_name: Field path for the error message.
        max_length: Longest accepted length in characters.

    Returns:
        The string.

    Raises:
        InvalidArgument: It is not such a string.
    """
    if not isinstance(value, str):
        raise InvalidArgument(field_name, "must be a string")
    if not value:
        raise InvalidArgument(field_name, "must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(field_name, f"longer than {max_length} characters")
    if _CONTROL_OR_SURROGATE.search(value):
        raise InvalidArgument(field_name, "must not contain control characters or surrogates")
    return value


def check_sha256_hex(value: object, field_name: str) -> str:
    """Check that ``value`` is a SHA-256 digest as 64 lower-case hex digits.

    Args:
        value: The value to check.
        field_name: Field path for the error message.

    Returns:
        The digest string.

    Raises:
        InvalidArgument: It is not.
    """
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise InvalidArgument(field_name, "must be a SHA-256 digest as 64 lower-case hex digits")
    return value


def _check_number(
    value: object,
    field_name: str,
    *,
    minimum: float,
    maximum: float = math.inf,
    minimum_inclusive: bool = True,
    maximum_inclusive: bool = True,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field_name, "must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArgument(field_name, "must be finite")
    low_ok = number >= minimum if minimum_inclusive else number > minimum
    high_ok = number <= maximum if maximum_inclusive else number < maximum
    if not (low_ok and high_ok):
        low = "[" if minimum_inclusive else "("
        high = "]" if maximum_inclusive else ")"
        raise InvalidArgument(field_name, f"{number!r} is outside {low}{minimum}, {maximum}{high}")
    return number


def _check_int(value: object, field_name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field_name, "must be an integer")
    if value < minimum:
        raise InvalidArgument(field_name, f"must be at least {minimum}")
    return value


@dataclass(frozen=True, kw_only=True)
class AdapterRef:
    """Which adapter a package holds."""

    adapter_id: str
    """The adapter's id, unique within its tenant."""
    version: str
    """The adapter version this package is (the registry orders and resolves versions)."""

    def __post_init__(self) -> None:
        check_text(self.adapter_id, "adapter.id")
        check_text(self.version, "adapter.version")


@dataclass(frozen=True, kw_only=True)
class BaseModelRef:
    """The base model the adapter was trained on."""

    model_id: str
    """Name or path the base model is known by."""
    weights_sha256: str
    """SHA-256 (hex) identifying the base model's weights; the trainer defines how."""

    def __post_init__(self) -> None:
        check_text(self.model_id, "base_model.id", max_length=1024)
        check_sha256_hex(self.weights_sha256, "base_model.weights_sha256")


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """The LoRA configuration (Hu et al., 2021, "LoRA", arXiv:2106.09685).

    The adapted layer computes ``W x + (alpha / rank) * B A x``; TGSP v1 describes only
    that form, so PEFT configurations that change it (DoRA, rsLoRA, per-module rank or
    alpha patterns, LoRA biases, extra full modules) are refused rather than described
    wrongly.
    """

    rank: int
    """LoRA rank r (PEFT ``r``)."""
    alpha: float
    """LoRA alpha (PEFT ``lora_alpha``); the update is scaled by alpha / rank."""
    dropout: float
    """LoRA dropout probability during training (PEFT ``lora_dropout``)."""
    target_modules: tuple[str, ...]
    """Names of the adapted modules; kept sorted and without duplicates."""
    task_type: str | None = None
    """PEFT task type (e.g. ``CAUSAL_LM``), if known."""
    peft_adapter_config: str | None = None
    """A PEFT ``adapter_config.json`` kept verbatim (imported adapters), so that export
    writes back the same file; it must agree with the fields above."""

    _REFUSED_PEFT_OPTIONS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("use_dora", "DoRA"),
        ("use_rslora", "rank-stabilised LoRA"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "extra fully trained modules"),
    )

    def __post_init__(self) -> None:
        _check_int(self.rank, "lora.rank", minimum=1)
        _check_number(self.alpha, "lora.alpha", minimum=0.0, minimum_inclusive=False)
        _check_number(
            self.dropout, "lora.dropout", minimum=0.0, maximum=1.0, maximum_inclusive=False
        )
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, tuple):
            raise InvalidArgument("lora.target_modules", "must be a tuple of module names")
        if not self.target_modules:
            raise InvalidArgument("lora.target_modules", "must name at least one module")
        for index, module in enumerate(self.target_modules):
            check_text(module, f"lora.target_modules[{index}]")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise InvalidArgument("lora.target_modules", "has duplicates")
        # A set of modules: one spelling, sorted, so equal configs encode equally.
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.task_type is not None:
            check_text(self.task_type, "lora.task_type")
        if self.peft_adapter_config is not None:
            self._check_peft_config(self.peft_adapter_config)

    @classmethod
    def from_peft_adapter_config(cls, text: str) -> LoraSpec:
        """Build a spec from the text of a PEFT ``adapter_config.json``, kept verbatim.

        Args:
            text: The file's contents.

        Returns:
            The spec, with ``peft_adapter_config`` set to ``text``.

        Raises:
            InvalidArgument: The file is not a LoRA config TGSP v1 can describe.
        """
        config = _peft_config_object(text)
        target = config.get("target_modules")
        if isinstance(target, str):
            modules: tuple[str, ...] = (target,)
        elif isinstance(target, list) and all(isinstance(m, str) for m in target):
            modules = tuple(str(m) for m in target)
        else:
            raise InvalidArgument(
                "adapter_config.target_modules", "must be a module name or a list of them"
            )
        rank = config.get("r")
        alpha = config.get("lora_alpha")
        dropout = config.get("lora_dropout", 0.0)
        task_type = config.get("task_type")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise InvalidArgument("adapter_config.r", "must be an integer")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise InvalidArgument("adapter_config.lora_alpha", "must be a number")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise InvalidArgument("adapter_config.lora_dropout", "must be a number")
        if task_type is not None and not isinstance(task_type, str):
            raise InvalidArgument("adapter_config.task_type", "must be a string or null")
        return cls(
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout),
            target_modules=modules,
            task_type=task_type,
            peft_adapter_config=text,
        )

    def _check_peft_config(self, text: str) -> None:
        if not isinstance(text, str) or len(text) > MAX_PEFT_CONFIG_LENGTH:
            raise InvalidArgument(
                "lora.peft_adapter_config",
                f"must be a string of at most {MAX_PEFT_CONFIG_LENGTH} characters",
            )
        # json.loads refuses raw control characters inside strings, and a lone surrogate
        # fails the manifest's UTF-8 encoding, so the JSON parse is the text check here.
        config = _peft_config_object(text)
        if config.get("peft_type") != "LORA":
            raise InvalidArgument("adapter_config.peft_type", "must be 'LORA'")
        for option, what in self._REFUSED_PEFT_OPTIONS:
            if config.get(option):
                raise InvalidArgument(
                    f"adapter_config.{option}",
                    f"{what} is not supported: TGSP v1 describes plain LoRA only",
                )
        bias = config.get("bias", "none")
        if bias != "none":
            raise InvalidArgument("adapter_config.bias", "LoRA biases are not supported")
        target = config.get("target_modules")
        listed = [target] if isinstance(target, str) else target
        if not isinstance(listed, list) or sorted(set(map(str, listed))) != list(
            self.target_modules
        ):
            raise InvalidArgument("adapter_config.target_modules", "differs from lora fields")
        for option, value in (
            ("r", self.rank),
            ("lora_alpha", self.alpha),
            ("lora_dropout", self.dropout),
        ):
            given = config.get(option, 0.0 if option == "lora_dropout" else None)
            if isinstance(given, bool) or not isinstance(given, int | float) or given != value:
                raise InvalidArgument(f"adapter_config.{option}", "differs from lora fields")
        if config.get("task_type") != self.task_type:
            raise InvalidArgument("adapter_config.task_type", "differs from lora fields")

    def to_json(self) -> dict[str, JsonValue]:
        """Return the manifest's ``lora`` member."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "task_type": self.task_type,
            "peft_adapter_config": self.peft_adapter_config,
        }

    @classmethod
    def from_json(cls, value: JsonValue) -> LoraSpec:
        """Parse the manifest's ``lora`` member."""
        members = _Members(value, "lora")
        spec = cls(
            rank=_check_int(members.take("rank"), "lora.rank", minimum=1),
            alpha=_check_number(members.take("alpha"), "lora.alpha", minimum=0.0),
            dropout=_check_number(members.take("dropout"), "lora.dropout", minimum=0.0),
            target_modules=tuple(members.text_list("target_modules")),
            task_type=members.optional_text("task_type"),
            peft_adapter_config=members.optional_text(
                "peft_adapter_config", max_length=MAX_PEFT_CONFIG_LENGTH, multiline=True
            ),
        )
        members.done()
        return spec


def _peft_config_object(text: str) -> dict[str, JsonValue]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument("adapter_config", f"not valid JSON ({exc.msg})") from exc
    if not isinstance(config, dict):
        raise InvalidArgument("adapter_config", "must be a JSON object")
    return config


@dataclass(frozen=True, kw_only=True)
class PoissonSampling:
    """Batches drawn by the server with Poisson sampling; the accountant amplifies.

    Each example joins each step's batch independently with probability ``rate``
    (Abadi et al., 2016, "Deep Learning with Differential Privacy"; Mironov et al.,
    2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism").
    """

    rate: float
    """Sampling probability q of one example per step, in (0, 1]."""

    method: ClassVar[str] = "poisson"

    def __post_init__(self) -> None:
        _check_number(
            self.rate,
            "dp_certificate.sampling.rate",
            minimum=0.0,
            minimum_inclusive=False,
            maximum=1.0,
        )
        object.__setattr__(self, "rate", float(self.rate))


@dataclass(frozen=True, kw_only=True)
class ClientBatches:
    """Batches handed in by the client: the server cannot vouch for how they were drawn,
    so each step is accounted as a full Gaussian mechanism, without amplification."""

    method: ClassVar[str] = "client_batches"


Sampling: TypeAlias = PoissonSampling | ClientBatches
"""How the examples of each step were chosen."""


@dataclass(frozen=True, kw_only=True)
class StepGroup:
    """Steps of one mechanism in the privacy lineage of the weights.

    Weights that continued another training client's checkpoint carry that client's
    steps too (their epsilon composes every step the weights have seen); the certificate
    lists each (training client, sampling, noise multiplier) with its step count.
    """

    training_client_id: str
    """The training client that took these steps."""
    sampling: Sampling
    """How the batches of these steps were chosen."""
    noise_multiplier: float
    """The steps' sigma; positive."""
    steps: int
    """How many such steps; >= 1."""

    def __post_init__(self) -> None:
        path = "dp_certificate.history"
        check_text(self.training_client_id, f"{path}.training_client_id", max_length=128)
        if not isinstance(self.sampling, PoissonSampling | ClientBatches):
            raise InvalidArgument(f"{path}.sampling", "must be PoissonSampling or ClientBatches")
        _check_number(
            self.noise_multiplier, f"{path}.noise_multiplier", minimum=0.0, minimum_inclusive=False
        )
        _check_int(self.steps, f"{path}.steps", minimum=1)
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))


@dataclass(frozen=True, kw_only=True)
class DPGuarantee:
    """An (epsilon, delta) differential-privacy guarantee per example for the whole run."""

    epsilon: float
    """Privacy loss epsilon spent by the run (as reported by the accountant)."""
    delta: float
    """Failure probability delta, in [0, 1)."""
    accountant: str
    """Accountant that computed epsilon, e.g. ``rdp`` or ``pld`` (Google dp-accounting)."""
    noise_multiplier: float
    """Gaussian noise standard deviation divided by ``max_grad_norm``; positive."""
    max_grad_norm: float
    """Per-example gradient clipping norm C; positive."""
    sampling: Sampling
    """How each step's batch was chosen."""
    steps: int
    """Number of noisy optimizer steps taken."""
    assumptions: tuple[str, ...] = ()
    """Statements the guarantee rests on that the server could not enforce, e.g. that a
    client-supplied example appears at most once per step."""
    history: tuple[StepGroup, ...] = ()
    """Every mechanism the weights' lineage composed, grouped; their steps add up to
    ``steps``. Empty in packages written before lineage was recorded."""

    guarantee: ClassVar[str] = "differential_privacy"

    def __post_init__(self) -> None:
        path = "dp_certificate"
        _check_number(self.epsilon, f"{path}.epsilon", minimum=0.0)
        _check_number(
            self.delta, f"{path}.delta", minimum=0.0, maximum=1.0, maximum_inclusive=False
        )
        if not isinstance(self.accountant, str) or not _ACCOUNTANT.fullmatch(self.accountant):
            raise InvalidArgument(f"{path}.accountant", "must match [a-z][a-z0-9_.-]{0,63}")
        _check_number(
            self.noise_multiplier, f"{path}.noise_multiplier", minimum=0.0, minimum_inclusive=False
        )
        _check_number(
            self.max_grad_norm, f"{path}.max_grad_norm", minimum=0.0, minimum_inclusive=False
        )
        if not isinstance(self.sampling, PoissonSampling | ClientBatches):
            raise InvalidArgument(f"{path}.sampling", "must be PoissonSampling or ClientBatches")
        _check_int(self.steps, f"{path}.steps", minimum=0)
        if not isinstance(self.assumptions, tuple):
            raise InvalidArgument(f"{path}.assumptions", "must be a tuple of strings")
        for index, text in enumerate(self.assumptions):
            check_text(text, f"{path}.assumptions[{index}]", max_length=1024)
        if not isinstance(self.history, tuple) or not all(
            isinstance(group, StepGroup) for group in self.history
        ):
            raise InvalidArgument(f"{path}.history", "must be a tuple of StepGroup")
        if self.history and sum(group.steps for group in self.history) != self.steps:
            raise InvalidArgument(f"{path}.history", "step counts must add up to steps")
        for name in ("epsilon", "delta", "noise_multiplier", "max_grad_norm"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True, kw_only=True)
class NoDPGuarantee:
    """The package makes no differential-privacy claim, and says why."""

    reason: str
    """Why no guarantee is known (e.g. the adapter was imported)."""

    guarantee: ClassVar[str] = "none"
    IMPORTED_REASON: ClassVar[str] = (
        "imported adapter: how it was trained is not known, so no differential-privacy "
        "guarantee is known"
    )

    def __post_init__(self) -> None:
        check_text(self.reason, "dp_certificate.reason", max_length=1024)

    @classmethod
    def imported(cls) -> NoDPGuarantee:
        """Return the certificate every imported adapter carries."""
        return cls(reason=cls.IMPORTED_REASON)


DPCertificate: TypeAlias = DPGuarantee | NoDPGuarantee
"""What the package claims about differential privacy."""


def _sampling_to_json(sampling: Sampling) -> dict[str, JsonValue]:
    result: dict[str, JsonValue] = {"method": sampling.method}
    if isinstance(sampling, PoissonSampling):
        result["rate"] = sampling.rate
    return result


def _sampling_from_json(value: JsonValue, path: str) -> Sampling:
    members = _Members(value, path)
    method = members.take("method")
    sampling: Sampling
    if method == PoissonSampling.method:
        sampling = PoissonSampling(
            rate=_check_number(members.take("rate"), f"{path}.rate", minimum=0.0)
        )
    elif method == ClientBatches.method:
        sampling = ClientBatches()
    else:
        raise InvalidArgument(f"{path}.method", "must be 'poisson' or 'client_batches'")
    members.done()
    return sampling


def _certificate_to_json(certificate: DPCertificate) -> dict[str, JsonValue]:
    if isinstance(certificate, NoDPGuarantee):
        return {"guarantee": certificate.guarantee, "reason": certificate.reason}
    sampling = _sampling_to_json(certificate.sampling)
    result: dict[str, JsonValue] = {
        "guarantee": certificate.guarantee,
        "epsilon": certificate.epsilon,
        "delta": certificate.delta,
        "accountant": certificate.accountant,
        "noise_multiplier": certificate.noise_multiplier,
        "max_grad_norm": certificate.max_grad_norm,
        "sampling": sampling,
        "steps": certificate.steps,
        "assumptions": list(certificate.assumptions),
    }
    if certificate.history:
        # Written only when present, so packages without a lineage keep their bytes.
        result["history"] = [
            {
                "training_client_id": group.training_client_id,
                "sampling": _sampling_to_json(group.sampling),
                "noise_multiplier": group.noise_multiplier,
                "steps": group.steps,
            }
            for group in certificate.history
        ]
    return result


def _certificate_from_json(value: JsonValue) -> DPCertificate:
    members = _Members(value, "dp_certificate")
    guarantee = members.take("guarantee")
    if guarantee == NoDPGuarantee.guarantee:
        result: DPCertificate = NoDPGuarantee(reason=members.text("reason", max_length=1024))
        members.done()
        return result
    if guarantee != DPGuarantee.guarantee:
        raise InvalidArgument(
            "dp_certificate.guarantee", "must be 'differential_privacy' or 'none'"
        )
    sampling = _sampling_from_json(members.take("sampling"), "dp_certificate.sampling")
    result = DPGuarantee(
        epsilon=_check_number(members.take("epsilon"), "dp_certificate.epsilon", minimum=0.0),
        delta=_check_number(members.take("delta"), "dp_certificate.delta", minimum=0.0),
        accountant=members.text("accountant"),
        noise_multiplier=_check_number(
            members.take("noise_multiplier"), "dp_certificate.noise_multiplier", minimum=0.0
        ),
        max_grad_norm=_check_number(
            members.take("max_grad_norm"), "dp_certificate.max_grad_norm", minimum=0.0
        ),
        sampling=sampling,
        steps=_check_int(members.take("steps"), "dp_certificate.steps", minimum=0),
        assumptions=tuple(members.text_list("assumptions", max_length=1024, allow_empty=True)),
        history=_history_from_json(members),
    )
    members.done()
    return result


def _history_from_json(members: _Members) -> tuple[StepGroup, ...]:
    if "history" not in members.names:
        return ()
    value = members.take("history")
    path = "dp_certificate.history"
    if not isinstance(value, list) or not value:
        raise InvalidArgument(path, "must be a non-empty list")
    groups = []
    for index, entry in enumerate(value):
        group = _Members(entry, f"{path}[{index}]")
        groups.append(
            StepGroup(
                training_client_id=group.text("training_client_id", max_length=128),
                sampling=_sampling_from_json(group.take("sampling"), f"{path}[{index}].sampling"),
                noise_multiplier=_check_number(
                    group.take("noise_multiplier"), f"{path}[{index}].noise_multiplier", minimum=0.0
                ),
                steps=_check_int(group.take("steps"), f"{path}[{index}].steps", minimum=1),
            )
        )
        group.done()
    return tuple(groups)


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Who made the package, from what, and when."""

    tenant_id: str
    """The tenant that owns the adapter; its KEK wraps the data key."""
    training_client_id: str | None
    """The trainer's training client that produced the weights; None when imported."""
    code_version: str
    """Version of the code that produced the weights (package version or commit)."""
    created_at: datetime
    """When the package was written; timezone-aware, stored in UTC to the microsecond."""

    def __post_init__(self) -> None:
        check_text(self.tenant_id, "provenance.tenant_id")
        if self.training_client_id is not None:
            check_text(self.training_client_id, "provenance.training_client_id")
        check_text(self.code_version, "provenance.code_version")
        if not isinstance(self.created_at, datetime) or self.created_at.tzinfo is None:
            raise InvalidArgument("provenance.created_at", "must be a timezone-aware datetime")
        object.__setattr__(self, "created_at", self.created_at.astimezone(UTC))

    def to_json(self) -> dict[str, JsonValue]:
        """Return the manifest's ``provenance`` member."""
        return {
            "tenant_id": self.tenant_id,
            "training_client_id": self.training_client_id,
            "code_version": self.code_version,
            "created_at": self.created_at.strftime(_TIMESTAMP_FORMAT),
        }

    @classmethod
    def from_json(cls, value: JsonValue) -> Provenance:
        """Parse the manifest's ``provenance`` member."""
        members = _Members(value, "provenance")
        stamp = members.text("created_at")
        if not _TIMESTAMP.fullmatch(stamp):
            raise InvalidArgument(
                "provenance.created_at", "must be UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ"
            )
        try:
            created_at = datetime.strptime(stamp, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        except ValueError as exc:
            raise InvalidArgument("provenance.created_at", f"not a valid time: {exc}") from exc
        result = cls(
            tenant_id=members.text("tenant_id"),
            training_client_id=members.optional_text("training_client_id"),
            code_version=members.text("code_version"),
            created_at=created_at,
        )
        members.done()
        return result


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """One tensor of the payload: dtype and shape as safetensors states them, and the
    SHA-256 of its raw little-endian data bytes exactly as stored in the payload."""

    dtype: str
    """safetensors dtype name, e.g. ``F32`` or ``BF16``."""
    shape: tuple[int, ...]
    """Dimensions, outermost first."""
    sha256: str
    """Hex SHA-256 of the tensor's data bytes."""

    def __post_init__(self) -> None:
        check_text(self.dtype, "tensors.dtype", max_length=32)
        if not isinstance(self.shape, tuple):
            raise InvalidArgument("tensors.shape", "must be a tuple of integers")
        for dim in self.shape:
            _check_int(dim, "tensors.shape", minimum=0)
        check_sha256_hex(self.sha256, "tensors.sha256")


@dataclass(frozen=True, kw_only=True)
class PayloadInfo:
    """How the payload is encrypted: see docs/tgsp.md, "Payload encryption"."""

    chunk_size: int
    """Plaintext bytes per AEAD chunk; the last chunk may be shorter (or empty)."""
    plaintext_size: int
    """Length of the safetensors plaintext in bytes."""

    format: ClassVar[str] = PAYLOAD_FORMAT
    aead: ClassVar[str] = PAYLOAD_AEAD

    def __post_init__(self) -> None:
        _check_int(self.chunk_size, "payload.chunk_size", minimum=MIN_CHUNK_SIZE)
        if self.chunk_size > MAX_CHUNK_SIZE:
            raise InvalidArgument("payload.chunk_size", f"must be at most {MAX_CHUNK_SIZE}")
        _check_int(self.plaintext_size, "payload.plaintext_size", minimum=0)

    @property
    def chunk_count(self) -> int:
        """Number of AEAD chunks: ceil(plaintext_size / chunk_size), at least one."""
        return max(1, -(-self.plaintext_size // self.chunk_size))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a TGSP package states about its adapter, signed but not encrypted."""

    adapter: AdapterRef
    base_model: BaseModelRef
    lora: LoraSpec
    tensors: Mapping[str, TensorInfo]
    """Every tensor of the payload by name; exactly the payload's tensors."""
    dp_certificate: DPCertificate
    provenance: Provenance
    payload: PayloadInfo
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS or isinstance(
            self.format_version, bool
        ):
            raise InvalidArgument(
                "manifest.format_version",
                f"unsupported format version {self.format_version}; this library reads "
                f"{READABLE_FORMAT_VERSIONS}",
            )
        if not self.tensors:
            raise InvalidArgument("manifest.tensors", "must list at least one tensor")
        for name, info in self.tensors.items():
            check_text(name, "manifest.tensors", max_length=1024)
            if name == "__metadata__":
                raise InvalidArgument("manifest.tensors", "'__metadata__' is not a tensor name")
            if not isinstance(info, TensorInfo):
                raise InvalidArgument(f"manifest.tensors.{name}", "must be a TensorInfo")
        object.__setattr__(self, "tensors", dict(sorted(self.tensors.items())))

    @property
    def tenant_id(self) -> str:
        """The owning tenant (``provenance.tenant_id``)."""
        return self.provenance.tenant_id

    def to_json(self) -> dict[str, JsonValue]:
        """Return the manifest as a JSON object (see docs/tgsp.md for the schema)."""
        return {
            "format_version": self.format_version,
            "adapter": {"id": self.adapter.adapter_id, "version": self.adapter.version},
            "base_model": {
                "id": self.base_model.model_id,
                "weights_sha256": self.base_model.weights_sha256,
            },
            "lora": self.lora.to_json(),
            "tensors": {
                name: {"dtype": info.dtype, "shape": list(info.shape), "sha256": info.sha256}
                for name, info in self.tensors.items()
            },
            "dp_certificate": _certificate_to_json(self.dp_certificate),
            "provenance": self.provenance.to_json(),
            "payload": {
                "format": self.payload.format,
                "aead": self.payload.aead,
                "chunk_size": self.payload.chunk_size,
                "plaintext_size": self.payload.plaintext_size,
            },
        }

    def canonical_bytes(self) -> bytes:
        """Return the manifest's canonical JSON encoding, the bytes a package stores."""
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, value: JsonValue) -> Manifest:
        """Parse a manifest JSON object, refusing missing or unknown members.

        Args:
            value: The decoded JSON.

        Returns:
            The manifest.

        Raises:
            InvalidArgument: A member is missing, unknown, of the wrong type or invalid;
                the field path names it.
        """
        members = _Members(value, "manifest")
        format_version = members.take("format_version")
        if format_version not in READABLE_FORMAT_VERSIONS or isinstance(format_version, bool):
            raise InvalidArgument(
                "manifest.format_version",
                f"unsupported format version {format_version!r}; this library reads "
                f"{READABLE_FORMAT_VERSIONS}",
            )
        adapter = _Members(members.take("adapter"), "adapter")
        adapter_ref = AdapterRef(adapter_id=adapter.text("id"), version=adapter.text("version"))
        adapter.done()
        base = _Members(members.take("base_model"), "base_model")
        base_ref = BaseModelRef(
            model_id=base.text("id", max_length=1024),
            weights_sha256=check_sha256_hex(
                base.take("weights_sha256"), "base_model.weights_sha256"
            ),
        )
        base.done()
        tensors_value = members.take("tensors")
        if not isinstance(tensors_value, dict):
            raise InvalidArgument("tensors", "must be a JSON object")
        tensors: dict[str, TensorInfo] = {}
        for name, entry in tensors_value.items():
            tensor = _Members(entry, f"tensors.{name}")
            shape_value = tensor.take("shape")
            if not isinstance(shape_value, list):
                raise InvalidArgument(f"tensors.{name}.shape", "must be a list of integers")
            tensors[name] = TensorInfo(
                dtype=tensor.text("dtype", max_length=32),
                shape=tuple(_check_int(d, f"tensors.{name}.shape", minimum=0) for d in shape_value),
                sha256=check_sha256_hex(tensor.take("sha256"), f"tensors.{name}.sha256"),
            )
            tensor.done()
        payload = _Members(members.take("payload"), "payload")
        if payload.take("format") != PAYLOAD_FORMAT:
            raise InvalidArgument("payload.format", f"must be {PAYLOAD_FORMAT!r}")
        if payload.take("aead") != PAYLOAD_AEAD:
            raise InvalidArgument("payload.aead", f"must be {PAYLOAD_AEAD!r}")
        payload_info = PayloadInfo(
            chunk_size=_check_int(payload.take("chunk_size"), "payload.chunk_size", minimum=0),
            plaintext_size=_check_int(
                payload.take("plaintext_size"), "payload.plaintext_size", minimum=0
            ),
        )
        payload.done()
        manifest = cls(
            adapter=adapter_ref,
            base_model=base_ref,
            lora=LoraSpec.from_json(members.take("lora")),
            tensors=tensors,
            dp_certificate=_certificate_from_json(members.take("dp_certificate")),
            provenance=Provenance.from_json(members.take("provenance")),
            payload=payload_info,
            format_version=int(format_version),
        )
        members.done()
        return manifest

    @classmethod
    def from_canonical_bytes(cls, data: bytes | memoryview) -> Manifest:
        """Parse a manifest from the bytes a package stores.

        The bytes must be canonical JSON and must be exactly what :meth:`canonical_bytes`
        returns for the parsed manifest (no denormalised spelling, such as an unsorted
        ``target_modules`` list, is accepted).

        Args:
            data: The stored manifest bytes.

        Returns:
            The manifest.

        Raises:
            InvalidArgument: The bytes are not a valid canonical version-1 manifest.
        """
        value = parse_json_strictly(data, field="manifest")
        manifest = cls.from_json(value)
        # The manifest's own canonical encoding must be these very bytes: that makes
        # them canonical JSON and every member in the one normal form (one check, not
        # two re-encodings).
        if manifest.canonical_bytes() != bytes(data):
            raise InvalidArgument(
                "manifest", "not in canonical JSON form (RFC 8785) or not in normal form"
            )
        return manifest


class _Members:
    """Reads the members of one JSON object and refuses unknown ones at the end."""

    def __init__(self, value: JsonValue, path: str) -> None:
        if not isinstance(value, dict):
            raise InvalidArgument(path, "must be a JSON object")
        self._value = value
        self._path = path
        self._taken: set[str] = set()

    @property
    def names(self) -> frozenset[str]:
        """The members present."""
        return frozenset(self._value)

    def take(self, name: str) -> JsonValue:
        if name not in self._value:
            raise InvalidArgument(f"{self._path}.{name}", "is missing")
        self._taken.add(name)
        return self._value[name]

    def text(self, name: str, *, max_length: int = MAX_TEXT_LENGTH) -> str:
        return check_text(self.take(name), f"{self._path}.{name}", max_length=max_length)

    def optional_text(
        self, name: str, *, max_length: int = MAX_TEXT_LENGTH, multiline: bool = False
    ) -> str | None:
        value = self.take(name)
        if value is None:
            return None
        if multiline and isinstance(value, str):
            if len(value) > max_length:
                raise InvalidArgument(f"{self._path}.{name}", f"longer than {max_length}")
            return value
        return check_text(value, f"{self._path}.{name}", max_length=max_length)

    def text_list(
        self, name: str, *, max_length: int = MAX_TEXT_LENGTH, allow_empty: bool = False
    ) -> list[str]:
        value = self.take(name)
        path = f"{self._path}.{name}"
        if not isinstance(value, list):
            raise InvalidArgument(path, "must be a list of strings")
        if not value and not allow_empty:
            raise InvalidArgument(path, "must not be empty")
        return [check_text(v, f"{path}[{i}]", max_length=max_length) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self._value) - self._taken)
        if unknown:
            raise InvalidArgument(
                f"{self._path}.{unknown[0]}", f"unknown member in format version {FORMAT_VERSION}"
            )

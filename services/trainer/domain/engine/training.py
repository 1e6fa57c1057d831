"""The LoRA training engine: Tinker's forward_backward / optim_step with exact DP-SGD.

Plain Python and torch, no gRPC: the trainer worker drives one engine per resident
training client and checkpoints it with :meth:`LoraTrainingEngine.state_dict` after
every ForwardBackward and OptimStep (DESIGN §8, "Exactly-once with small state").

What one DP step protects (DESIGN §8). Every ``forward_backward`` call clips each
datum's gradient over all LoRA parameters to ``max_grad_norm`` and adds the clipped
gradients to an accumulator. ``optim_step`` adds Gaussian noise with standard deviation
``noise_multiplier * max_grad_norm`` to every coordinate of the accumulated sum once,
divides by the normalisation below and applies AdamW. The guarantee is per datum per
step; a datum given twice within one step has twice the sensitivity.

Normalisation. The noised sum is divided by ``expected_batch_size`` when the caller
passes it, and otherwise by the number of data accumulated in the step:

- Server-drawn Poisson batches must pass ``expected_batch_size = q · N``. The actual
  batch size is private under Poisson sampling, so dividing by it would leak it; Opacus
  divides by the expected batch size for the same reason (``DPOptimizer``,
  ``expected_batch_size``). An empty Poisson batch is a valid step: ``optim_step``
  applies the noise-only update ``noise / expected_batch_size`` without running the
  model (a batch of zero sequences is not a model input).
- Client-supplied batches default to the number of data in the step, which the client
  chose and already knows; the accountant composes one full Gaussian mechanism per
  step for them (no amplification).

Non-DP mode (``dp=None``) is explicit: plain backward of the summed loss and AdamW on
the same normalised sum, so a DP step with zero noise and a clipping bound no example
reaches equals the non-DP step.

Noise randomness (:mod:`.noise`, docs/privacy.md "Noise"). The noise of a step is
AES-256-CTR keystream under a fresh 32-byte key from ``os.urandom``, turned into
N(0, 1) by float64 Box–Muller with an exact tail (no bound on |z| but float64's range;
torch's float32 ``randn`` stops at 5.77), added in float64 and snapped to a power-of-two
grid of about 2^-20 of the noise std against floating-point attacks (Mironov, 2012).

Thread safety: an engine is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from tensafe.common.errors import FailedPrecondition, InvalidArgument

from .base import SharedBase
from .clipping import (
    LoraActivationTap,
    clip_per_example,
    clip_per_example_jointly,
    per_example_gradients,
)
from .config import AdamConfig, DpConfig, EngineOptions, LoraConfig, LossConfig, NormMethod
from .losses import (
    LossFn,
    PaddedBatch,
    PerTokenValues,
    TokenSequence,
    check_distinct,
    datum_digests,
    loss_config_from_options,
    per_token_loss,
    token_logprobs,
    validate_batch,
    validate_token_sequences,
)
from .noise import add_gaussian_noise_
from .state import decode_state, encode_state

# The adapter name in the parameter names of checkpoints and gradients (peft's default
# name), whatever the adapter's name on its shared base.
ADAPTER_NAME = "default"

_LORA_PREFIX = "lora/"
_EXP_AVG_PREFIX = "adam_exp_avg/"
_EXP_AVG_SQ_PREFIX = "adam_exp_avg_sq/"
_ACCUMULATOR_PREFIX = "accumulator/"


@dataclass(frozen=True)
class DatumOutput:
    """Per-datum output of ``forward_backward`` (Tinker's ``loss_fn_outputs``)."""

    logprobs: list[float]
    """Learner log-probability of each target token (length N)."""
    loss: float
    """The datum's loss, summed over its tokens."""


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Result of one ``forward_backward`` call."""

    outputs: list[DatumOutput]
    """One entry per datum, in request order."""
    metrics: dict[str, float]
    """``loss:sum`` (over data) and ``tokens:sum`` (positions in the batch)."""


@dataclass(frozen=True)
class OptimStepResult:
    """Result of one ``optim_step``."""

    step: int
    """Number of optimizer steps applied so far, including this one."""
    metrics: dict[str, float]
    """``learning_rate``, ``divisor`` (the normalisation) and ``noise_std`` (standard
    deviation of the noise in the normalised gradient; 0 without DP)."""


@dataclass(frozen=True)
class ForwardBackwardCall:
    """The arguments of one :meth:`LoraTrainingEngine.forward_backward` call, for
    :func:`forward_backward_jointly`."""

    batch: Sequence[TokenSequence]
    loss_fn: str | LossFn
    loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]]
    loss_fn_config: Mapping[str, float] | None = None
    refuse_duplicates: bool = True


@dataclass(frozen=True)
class _PreparedCall:
    loss_kind: LossFn
    loss_config: LossConfig
    padded: PaddedBatch
    digests: list[str]


class LoraTrainingEngine:
    """A base model with one trainable LoRA adapter, AdamW and optional DP-SGD.

    The engine's own state is its adapter, its AdamW moments and its gradient
    accumulator; the base model is a :class:`~.base.SharedBase` that other engines may
    share (each engine is one peft adapter on it, activated for each call). Engines on
    one base are used by one thread at a time.

    Args:
        base_model: The shared base, or a local Hugging Face model directory
            (``from_pretrained``) to load a float32 CPU base of this engine's own.
        lora: The adapter.
        dp: DP-SGD parameters, or ``None`` for explicit non-private training.
        seed: Seeds the adapter's initialisation and its dropout masks (derived per
            step and call, so a resumed engine draws the same masks). It does not seed
            the DP noise.
        loss: PPO clip range.
        options: Engine settings (per-example norm method, inference chunk size).

    Raises:
        NotFound: ``base_model`` is not a model directory.
        FailedPrecondition: The model cannot be loaded.
        InvalidArgument: ``lora.target_modules`` names no layer of the model.
    """

    def __init__(
        self,
        base_model: SharedBase | Path | str,
        *,
        lora: LoraConfig,
        dp: DpConfig | None,
        seed: int,
        loss: LossConfig | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self._lora = lora
        self._dp = dp
        self._seed = seed
        self._loss_config = loss if loss is not None else LossConfig()
        self._options = options if options is not None else EngineOptions()

        self._base = base_model if isinstance(base_model, SharedBase) else SharedBase(base_model)
        self._adapter, self._model = self._base.add_adapter(lora, seed)
        try:
            self._base.activate(self._adapter)
            layers = self._base.factor_layers(self._adapter, label=ADAPTER_NAME)
            self._parameters: dict[str, torch.Tensor] = {
                name: linear.weight for linear, name in layers.items()
            }
            self._tap = LoraActivationTap(layers)
        except BaseException:
            self._base.remove_adapter(self._adapter)
            raise
        self._device = self._base.device
        self._vocab_size = self._base.vocab_size
        self._max_length = self._base.max_length

        # Hyper-parameters are written into the parameter group from each step's
        # AdamConfig; the value given here is never used for an update.
        self._optimizer = torch.optim.AdamW(list(self._parameters.values()), lr=1.0)
        self._accumulator = {
            name: torch.zeros_like(parameter) for name, parameter in self._parameters.items()
        }
        self._accumulated_examples = 0
        self._micro_batches = 0
        self._step_digests: dict[str, str] = {}
        """Digest of every datum accumulated in the step in progress -> where it came
        from (``"call C, data[I]"``), to refuse a datum given twice in one step."""
        self._step = 0

    # ------------------------------------------------------------------ properties

    @property
    def step(self) -> int:
        """Optimizer steps applied so far."""
        return self._step

    @property
    def dp(self) -> DpConfig | None:
        """DP-SGD parameters, ``None`` in non-DP mode."""
        return self._dp

    @property
    def lora(self) -> LoraConfig:
        """The adapter configuration."""
        return self._lora

    @property
    def model(self) -> PeftModel:
        """The shared peft model with this engine's adapter active (for sampling; train
        it only through this engine). Another engine's call switches the adapter."""
        self._base.activate(self._adapter)
        return self._model

    @property
    def base(self) -> SharedBase:
        """The (possibly shared) base model."""
        return self._base

    @property
    def base_model_dir(self) -> Path:
        """The base model's directory."""
        return self._base.model_dir

    def resident_bytes(self) -> int:
        """Bytes this engine holds beyond the shared base: the adapter, the gradient
        accumulator and the two AdamW moments (counted before Adam allocates them)."""
        adapter = sum(p.numel() * p.element_size() for p in self._parameters.values())
        return 4 * adapter

    @property
    def vocab_size(self) -> int:
        """Token ids must be below this."""
        return self._vocab_size

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the model accepts."""
        return self._max_length

    @property
    def accumulated_examples(self) -> int:
        """Data accumulated since the last optimizer step."""
        return self._accumulated_examples

    @property
    def parameter_names(self) -> list[str]:
        """Names of the trainable LoRA weights in ``model.named_parameters()``."""
        return list(self._parameters)

    # ------------------------------------------------------------------ training

    def forward_backward(
        self,
        batch: Sequence[TokenSequence],
        loss_fn: str | LossFn,
        loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]],
        loss_fn_config: Mapping[str, float] | None = None,
        *,
        refuse_duplicates: bool = True,
    ) -> ForwardBackwardResult:
        """Compute the loss and add this batch's gradient to the step's accumulator.

        With DP every datum's gradient is clipped to ``max_grad_norm`` first (exactly,
        from one backward pass; see :mod:`.clipping`). Several calls before one
        ``optim_step`` belong to the same step.

        Args:
            batch: One ``model_input`` token sequence per datum (variable lengths).
            loss_fn: ``cross_entropy``, ``importance_sampling`` or ``ppo``.
            loss_fn_inputs: One mapping per datum: ``target_tokens`` and ``weights``
                for cross-entropy; ``target_tokens``, ``logprobs`` (sampler) and
                ``advantages`` for the RL losses; each of the datum's length.
            loss_fn_config: Per-call loss options (Tinker's names): for ``ppo``,
                ``clip_low_threshold`` and ``clip_high_threshold``; see
                :func:`.losses.loss_config_from_options`.
            refuse_duplicates: Under DP, refuse a datum identical to another of the
                same optimizer step (this call or an earlier one): its sensitivity
                would be a multiple of ``max_grad_norm``. Server-drawn batches pass
                False: two records of a dataset are two data even when equal.

        Returns:
            Per-datum target log-probabilities and losses, and batch metrics. These are
            functions of each datum alone, fit to return to the client that sent the
            data; for server-held datasets they are private and must stay server-side.

        Raises:
            InvalidArgument: A malformed request, or inputs that make a datum's loss
                non-finite; the field names the culprit. The engine is unchanged.
        """
        call = self._prepare(
            ForwardBackwardCall(
                batch, loss_fn, loss_fn_inputs, loss_fn_config, refuse_duplicates=refuse_duplicates
            )
        )
        loss_kind, loss_config, padded = call.loss_kind, call.loss_config, call.padded
        self._base.activate(self._adapter)
        self._base.set_training(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._dropout_seed())
            if self._dp is None:
                target_logprobs, example_losses = self._forward(padded, loss_kind, loss_config)
                _check_finite_losses(example_losses)
                grads = torch.autograd.grad(example_losses.sum(), list(self._parameters.values()))
                update = dict(zip(self._parameters, grads, strict=True))
            else:
                with self._tap.capture(self._options.norm_method) as record:
                    target_logprobs, example_losses = self._forward(padded, loss_kind, loss_config)
                _check_finite_losses(example_losses)
                clipped = clip_per_example(
                    example_losses.sum(), record, max_grad_norm=self._dp.max_grad_norm
                )
                update = clipped.clipped_sum
        _check_finite_update(update)
        self._accumulate(call, update)
        return _result(padded, target_logprobs, example_losses)

    def _prepare(self, call: ForwardBackwardCall) -> _PreparedCall:
        """Validate a ForwardBackward call without changing anything."""
        loss_kind = LossFn.parse(call.loss_fn)
        loss_config = loss_config_from_options(
            loss_kind, call.loss_fn_config or {}, self._loss_config
        )
        padded = validate_batch(
            call.batch,
            loss_kind,
            call.loss_fn_inputs,
            vocab_size=self._vocab_size,
            max_length=self._max_length,
        )
        digests: list[str] = []
        if self._dp is not None and call.refuse_duplicates:
            digests = datum_digests(call.batch, loss_kind, call.loss_fn_inputs)
            self._check_distinct(digests)
        return _PreparedCall(loss_kind, loss_config, self._on_device(padded), digests)

    def _accumulate(self, call: _PreparedCall, update: Mapping[str, torch.Tensor]) -> None:
        """Add a validated, computed call to the step: the only place it changes."""
        with torch.no_grad():
            for name, value in update.items():
                self._accumulator[name].add_(value)
        self._accumulated_examples += len(call.padded.lengths)
        self._micro_batches += 1
        for index, digest in enumerate(call.digests):
            self._step_digests[digest] = f"call {self._micro_batches}, data[{index}]"

    def _check_distinct(self, digests: list[str]) -> None:
        check_distinct(digests)
        for index, digest in enumerate(digests):
            if digest in self._step_digests:
                raise InvalidArgument(
                    f"data[{index}]",
                    f"is identical to a datum of an earlier ForwardBackward of this "
                    f"optimizer step ({self._step_digests[digest]}): under DP a datum may "
                    "appear once per step",
                    reason="DUPLICATE_DATUM",
                )

    def forward(
        self,
        batch: Sequence[TokenSequence],
        loss_fn: str | LossFn,
        loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]],
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardResult:
        """Compute per-datum log-probabilities and losses without any gradient.

        Tinker's ``forward``: the same request and result as :meth:`forward_backward`,
        evaluated with dropout off; the engine's state does not change.

        Args:
            batch: As for :meth:`forward_backward`.
            loss_fn: As for :meth:`forward_backward`.
            loss_fn_inputs: As for :meth:`forward_backward`.
            loss_fn_config: As for :meth:`forward_backward`.

        Returns:
            Per-datum target log-probabilities and losses, and batch metrics.

        Raises:
            InvalidArgument: As for :meth:`forward_backward`.
        """
        call = self._evaluation(batch, loss_fn, loss_fn_inputs, loss_fn_config)
        loss_kind, loss_config, padded = call.loss_kind, call.loss_config, call.padded
        with torch.no_grad():
            target_logprobs, example_losses = self._forward(padded, loss_kind, loss_config)
        _check_finite_losses(example_losses)
        return _result(padded, target_logprobs, example_losses)

    def _evaluation(
        self,
        batch: Sequence[TokenSequence],
        loss_fn: str | LossFn,
        loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]],
        loss_fn_config: Mapping[str, float] | None,
    ) -> _PreparedCall:
        """Validate a call that changes nothing and put this adapter in eval mode
        (dropout off) for it: :meth:`forward` and :meth:`per_example_gradients`."""
        call = self._prepare(
            ForwardBackwardCall(
                batch, loss_fn, loss_fn_inputs, loss_fn_config, refuse_duplicates=False
            )
        )
        self._base.activate(self._adapter)
        self._base.set_training(False)
        return call

    def per_example_gradients(
        self,
        batch: Sequence[TokenSequence],
        loss_fn: str | LossFn,
        loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]],
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each datum's unclipped LoRA gradient at the current weights; nothing changes.

        The privacy audit's white-box auditor (:mod:`tensafe.trainer.domain.audit`) uses it to
        know, in every step, the direction in which a canary datum pushes the gradient
        sum; the canary itself enters the step through :meth:`forward_backward` like any
        datum. The same forward pass and loss as :meth:`forward_backward`, with dropout
        off; no accumulator, counter or dropout stream is touched. Private under DP:
        never for a client.

        Args:
            batch: As for :meth:`forward_backward`.
            loss_fn: As for :meth:`forward_backward`.
            loss_fn_inputs: As for :meth:`forward_backward`.
            loss_fn_config: As for :meth:`forward_backward`.

        Returns:
            Parameter name (:attr:`parameter_names`) to ``[B, *parameter.shape]``.

        Raises:
            InvalidArgument: As for :meth:`forward_backward`.
        """
        call = self._evaluation(batch, loss_fn, loss_fn_inputs, loss_fn_config)
        loss_kind, loss_config, padded = call.loss_kind, call.loss_config, call.padded
        with torch.enable_grad(), self._tap.capture(NormMethod.DIRECT) as record:
            _, example_losses = self._forward(padded, loss_kind, loss_config)
        _check_finite_losses(example_losses)
        return per_example_gradients(example_losses.sum(), record)

    def optim_step(
        self,
        adam: AdamConfig,
        *,
        expected_batch_size: float | None = None,
        noisy_sum_observer: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
    ) -> OptimStepResult:
        """Apply one AdamW step to the accumulated gradient (noised once under DP).

        Args:
            adam: This step's AdamW hyper-parameters.
            expected_batch_size: The divisor of the (noised) gradient sum. Required for
                server-drawn Poisson batches (``q · N``) and for a step with no data;
                ``None`` divides by the number of data accumulated in the step.
            noisy_sum_observer: Called once with the noised clipped-gradient sum (before
                the division), the output of the step's Gaussian mechanism; the privacy
                audit scores white-box canaries on it. It must not modify the tensors.

        Returns:
            The new step number and metrics.

        Raises:
            InvalidArgument: ``expected_batch_size`` is not positive and finite.
            FailedPrecondition: No data was accumulated and no
                ``expected_batch_size`` was given.
        """
        if expected_batch_size is not None and (
            isinstance(expected_batch_size, bool)
            or not isinstance(expected_batch_size, int | float)
            or not math.isfinite(expected_batch_size)
            or expected_batch_size <= 0
        ):
            raise InvalidArgument("expected_batch_size", "must be positive and finite")
        if expected_batch_size is None and self._accumulated_examples == 0:
            raise FailedPrecondition(
                "no data was accumulated since the last step; pass expected_batch_size "
                "to apply an empty sampled batch"
            )
        divisor = float(
            expected_batch_size if expected_batch_size is not None else self._accumulated_examples
        )

        gradients = {name: total.clone() for name, total in self._accumulator.items()}
        noise_std = 0.0
        if self._dp is not None and self._dp.noise_std > 0:
            noise_std = self._dp.noise_std
            if self._device.type == "cpu":
                add_gaussian_noise_(list(gradients.values()), noise_std)
            else:
                # The sampler works on CPU float64 (see .noise); the noised values are
                # moved back to the device.
                on_cpu = {name: value.cpu().contiguous() for name, value in gradients.items()}
                add_gaussian_noise_(list(on_cpu.values()), noise_std)
                for name, value in on_cpu.items():
                    gradients[name].copy_(value)

        if noisy_sum_observer is not None:
            noisy_sum_observer(gradients)

        beta1, beta2 = adam.betas
        for group in self._optimizer.param_groups:
            group["lr"] = adam.learning_rate
            group["betas"] = (beta1, beta2)
            group["eps"] = adam.eps
            group["weight_decay"] = adam.weight_decay
        for name, parameter in self._parameters.items():
            parameter.grad = gradients[name].div_(divisor)
        self._optimizer.step()
        for parameter in self._parameters.values():
            parameter.grad = None

        for total in self._accumulator.values():
            total.zero_()
        self._accumulated_examples = 0
        self._micro_batches = 0
        self._step_digests.clear()
        self._step += 1
        return OptimStepResult(
            step=self._step,
            metrics={
                "learning_rate": adam.learning_rate,
                "divisor": divisor,
                "noise_std": noise_std / divisor,
            },
        )

    # ------------------------------------------------------------------ inference

    def compute_logprobs(self, sequences: Sequence[TokenSequence]) -> list[list[float]]:
        """Per-token log-probabilities of sequences under the current adapter.

        Temperature 1, dropout off, no gradient.

        Args:
            sequences: Token sequences of length >= 1.

        Returns:
            For a sequence ``s`` of length n, a list of n - 1 floats whose entry
            ``t - 1`` is ``log p(s[t] | s[:t])``; aligned with Tinker's
            ``target_tokens = s[1:]``.

        Raises:
            InvalidArgument: Empty list, empty or too long sequences, ids outside the
                vocabulary; the field is ``sequences[i]``.
        """
        tensors = validate_token_sequences(
            sequences, field="sequences", vocab_size=self._vocab_size, max_length=self._max_length
        )
        self._base.activate(self._adapter)
        self._base.set_training(False)
        results: list[list[float]] = []
        chunk = self._options.logprob_batch_size
        with torch.no_grad():
            for start in range(0, len(tensors), chunk):
                part = tensors[start : start + chunk]
                input_ids = nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=0)
                attention_mask = nn.utils.rnn.pad_sequence(
                    [torch.ones_like(t) for t in part], batch_first=True, padding_value=0
                )
                input_ids = input_ids.to(self._device)
                logits = self._model(
                    input_ids=input_ids,
                    attention_mask=attention_mask.to(self._device),
                    use_cache=False,
                ).logits.float()
                targets = torch.roll(input_ids, shifts=-1, dims=1)
                logprobs = token_logprobs(logits, targets)
                results.extend(
                    logprobs[row, : tokens.numel() - 1].tolist() for row, tokens in enumerate(part)
                )
        return results

    # ------------------------------------------------------------------ state

    def pending_gradient_sum(self) -> dict[str, torch.Tensor]:
        """A copy of the accumulated (clipped, un-noised) gradient sum of this step.

        Private data under DP: for checkpoints and tests, never for a client.

        Returns:
            Parameter name to tensor.
        """
        return {name: total.clone() for name, total in self._accumulator.items()}

    def state_dict(self) -> bytes:
        """Serialise everything needed to resume exactly: adapter, AdamW moments, step
        counters and the accumulated gradient sum of the step in progress.

        Returns:
            safetensors bytes (see :mod:`.state`); under 1 MB for an r=8 adapter of the
            tiny model. Under DP the accumulator is private: store it like training data.
        """
        tensors: dict[str, torch.Tensor] = {}
        adam_steps = 0
        for name, parameter in self._parameters.items():
            tensors[_LORA_PREFIX + name] = parameter.detach()
            tensors[_ACCUMULATOR_PREFIX + name] = self._accumulator[name]
            moments = self._optimizer.state.get(parameter)
            if moments:
                tensors[_EXP_AVG_PREFIX + name] = moments["exp_avg"]
                tensors[_EXP_AVG_SQ_PREFIX + name] = moments["exp_avg_sq"]
                adam_steps = int(moments["step"])
        metadata = {
            "step": str(self._step),
            "adam_steps": str(adam_steps),
            "accumulated_examples": str(self._accumulated_examples),
            "micro_batches": str(self._micro_batches),
            "step_digests": json.dumps(self._step_digests, sort_keys=True),
            "lora": json.dumps(asdict(self._lora), sort_keys=True),
            "dp": json.dumps(asdict(self._dp) if self._dp is not None else None, sort_keys=True),
        }
        return encode_state(tensors, metadata)

    def load_state(self, data: bytes) -> None:
        """Restore a checkpoint written by :meth:`state_dict` of a like-configured engine.

        Args:
            data: The checkpoint bytes.

        Raises:
            InvalidArgument: ``state`` is corrupt, or was written for another adapter
                configuration, DP mode or model; the engine is unchanged.
        """
        tensors, metadata = decode_state(data)
        if metadata.get("lora") != json.dumps(asdict(self._lora), sort_keys=True):
            raise InvalidArgument("state", "written for a different LoRA configuration")
        dp_json = json.dumps(asdict(self._dp) if self._dp is not None else None, sort_keys=True)
        try:
            step = int(metadata["step"])
            adam_steps = int(metadata["adam_steps"])
            accumulated = int(metadata["accumulated_examples"])
            micro_batches = int(metadata["micro_batches"])
        except (KeyError, ValueError) as error:
            raise InvalidArgument("state", f"missing or bad counter ({error})") from error
        if min(step, adam_steps, accumulated, micro_batches) < 0:
            raise InvalidArgument("state", "negative counter")
        if metadata.get("dp") != dp_json and accumulated:
            # Weights and moments carry over between DP settings (the privacy ledger
            # follows them); a half-accumulated step clipped under other settings does not.
            raise InvalidArgument("state", "written mid-step under a different DP configuration")
        try:
            # States written before duplicates were tracked have none.
            step_digests = json.loads(metadata.get("step_digests", "{}"))
        except json.JSONDecodeError as error:
            raise InvalidArgument("state", f"bad step_digests ({error})") from error
        if not isinstance(step_digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in step_digests.items()
        ):
            raise InvalidArgument("state", "bad step_digests")

        expected = {_LORA_PREFIX + n for n in self._parameters} | {
            _ACCUMULATOR_PREFIX + n for n in self._parameters
        }
        if adam_steps > 0:
            expected |= {_EXP_AVG_PREFIX + n for n in self._parameters}
            expected |= {_EXP_AVG_SQ_PREFIX + n for n in self._parameters}
        if set(tensors) != expected:
            raise InvalidArgument("state", "tensor names do not match this engine's adapter")
        for key, tensor in tensors.items():
            name = key.split("/", 1)[1]
            reference = self._parameters[name]
            if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
                raise InvalidArgument("state", f"{key} has shape {tuple(tensor.shape)}")
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidArgument("state", f"{key} holds non-finite values")

        # Validated: apply.
        with torch.no_grad():
            for name, parameter in self._parameters.items():
                parameter.copy_(tensors[_LORA_PREFIX + name])
                self._accumulator[name].copy_(tensors[_ACCUMULATOR_PREFIX + name])
        optimizer_state = self._optimizer.state_dict()
        restored: dict[int, dict[str, torch.Tensor]] = {}
        if adam_steps > 0:
            for index, name in enumerate(self._parameters):
                restored[index] = {
                    "step": torch.tensor(float(adam_steps)),
                    "exp_avg": tensors[_EXP_AVG_PREFIX + name].to(self._device, copy=True),
                    "exp_avg_sq": tensors[_EXP_AVG_SQ_PREFIX + name].to(self._device, copy=True),
                }
        optimizer_state["state"] = restored
        self._optimizer.load_state_dict(optimizer_state)
        self._step = step
        self._accumulated_examples = accumulated
        self._micro_batches = micro_batches
        self._step_digests = dict(step_digests)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter weights as ``peft`` saves them (``adapter_model.safetensors``).

        Returns:
            Names like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
            mapped to detached, contiguous CPU copies.
        """
        state = get_peft_model_state_dict(self._model, adapter_name=self._adapter)
        return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}

    def adapter_config(self) -> dict[str, object]:
        """The adapter's peft configuration as JSON-compatible data
        (``adapter_config.json``), for packaging next to :meth:`adapter_tensors`.

        Returns:
            The peft ``LoraConfig`` as a dictionary.
        """
        config = self._model.peft_config[self._adapter].to_dict()
        encoded = json.dumps(config, default=_json_default, sort_keys=True)
        decoded: dict[str, object] = json.loads(encoded)
        return decoded

    def close(self) -> None:
        """Remove the engine's hooks and its adapter from the base (freeing them); the
        engine must not be used afterwards. The base stays loaded."""
        self._tap.close()
        self._base.remove_adapter(self._adapter)

    # ------------------------------------------------------------------ internals

    def _forward(
        self, padded: PaddedBatch, loss_fn: LossFn, loss_config: LossConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # float(): a bf16/fp16 base's logits are scored in float32 (a no-op for fp32).
        logits = self._model(
            input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False
        ).logits.float()
        target_logprobs = token_logprobs(logits, padded.target_tokens)
        losses = per_token_loss(loss_fn, target_logprobs, padded, loss_config)
        return target_logprobs, losses.sum(dim=1)

    def _on_device(self, padded: PaddedBatch) -> PaddedBatch:
        if self._device.type == "cpu":
            return padded
        return replace(
            padded,
            input_ids=padded.input_ids.to(self._device),
            attention_mask=padded.attention_mask.to(self._device),
            target_tokens=padded.target_tokens.to(self._device),
            float_inputs={k: v.to(self._device) for k, v in padded.float_inputs.items()},
        )

    def _dropout_seed(self) -> int:
        material = f"{self._seed}:{self._step}:{self._micro_batches}".encode()
        return int.from_bytes(hashlib.sha256(material).digest()[:8], "little")


def forward_backward_jointly(
    calls: Sequence[tuple[LoraTrainingEngine, ForwardBackwardCall]],
) -> list[ForwardBackwardResult]:
    """ForwardBackward of several engines on one shared base in one forward/backward.

    The rows of every call run through one model pass, each row through its own
    engine's adapter (peft's mixed-adapter batch, ``adapter_names=``: each LoRA layer
    applies each adapter to its own rows only, Punica/S-LoRA's gather by adapter). A
    row's gradient therefore reaches only its own adapter's factors; each engine's
    activation tap records its own rows, and :func:`.clipping.clip_per_example_jointly`
    clips them per example and sums them per engine from the one backward pass. The
    clipped sum of one engine never includes a row of another; each engine's
    accumulator, counters and duplicate check change exactly as
    :meth:`LoraTrainingEngine.forward_backward` would change them, and its noise and
    optimizer step stay its own (:meth:`LoraTrainingEngine.optim_step`). Results agree
    with separate calls to float32 round-off (padding to the longest row of the joint
    batch and the larger matrix products change the order of floating-point sums).

    Conditions (otherwise ``ValueError``): at least one call; distinct engines on the
    same :class:`~.base.SharedBase`; every engine under DP with LoRA dropout 0 (peft
    runs mixed-adapter batches in eval mode only, and a per-row dropout stream would
    not match the engine's own).

    Args:
        calls: Each engine with its call.

    Returns:
        Each call's result, in order.

    Raises:
        InvalidArgument: A call is invalid (as for ``forward_backward``, its field
            names the culprit); no engine changes.
        ValueError: The conditions above are not met.
    """
    if not calls:
        raise ValueError("no calls")
    engines = [engine for engine, _ in calls]
    base = engines[0].base
    if len({id(engine) for engine in engines}) != len(engines):
        raise ValueError("an engine appears twice")
    for engine in engines:
        if engine.base is not base:
            raise ValueError("the engines do not share one base")
        if engine.dp is None or engine.lora.dropout != 0:
            raise ValueError("joint calls need DP engines with LoRA dropout 0")
    prepared = [engine._prepare(call) for engine, call in calls]

    width = max(int(call.padded.input_ids.shape[1]) for call in prepared)
    input_ids = torch.cat([_pad_to(call.padded.input_ids, width) for call in prepared])
    attention_mask = torch.cat([_pad_to(call.padded.attention_mask, width) for call in prepared])
    adapter_names = [
        engine._adapter
        for engine, call in zip(engines, prepared, strict=True)
        for _ in call.padded.lengths
    ]
    model = base.train_together([engine._adapter for engine in engines])
    base.set_training(False)
    with contextlib.ExitStack() as stack:
        records = [
            stack.enter_context(engine._tap.capture(engine._options.norm_method))
            for engine in engines
        ]
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            adapter_names=adapter_names,
        ).logits.float()
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    start = 0
    for call in prepared:
        rows = len(call.padded.lengths)
        own = logits[start : start + rows, : call.padded.input_ids.shape[1]]
        target_logprobs = token_logprobs(own, call.padded.target_tokens)
        losses = per_token_loss(call.loss_kind, target_logprobs, call.padded, call.loss_config)
        example_losses = losses.sum(dim=1)
        _check_finite_losses(example_losses)
        outputs.append((target_logprobs, example_losses))
        start += rows
    total = torch.stack([losses.sum() for _, losses in outputs]).sum()
    bounds = []
    for engine in engines:
        assert engine.dp is not None
        bounds.append(engine.dp.max_grad_norm)
    clipped = clip_per_example_jointly(total, list(zip(records, bounds, strict=True)))
    for result in clipped:
        _check_finite_update(result.clipped_sum)

    # Everything is validated and computed: only now do the engines change.
    for engine, call, result in zip(engines, prepared, clipped, strict=True):
        engine._accumulate(call, result.clipped_sum)
    return [
        _result(call.padded, target_logprobs, example_losses)
        for call, (target_logprobs, example_losses) in zip(prepared, outputs, strict=True)
    ]


def _pad_to(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad ``[B, T]`` with zeros to ``[B, width]`` (pad tokens are masked out)."""
    return nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def _check_finite_update(update: Mapping[str, torch.Tensor]) -> None:
    for value in update.values():
        if not bool(torch.isfinite(value).all()):
            raise InvalidArgument("loss_fn_inputs", "the batch gives a non-finite gradient")


def _result(
    padded: PaddedBatch, target_logprobs: torch.Tensor, example_losses: torch.Tensor
) -> ForwardBackwardResult:
    logprobs = target_logprobs.detach()
    losses = example_losses.detach()
    outputs = [
        DatumOutput(logprobs=logprobs[index, :length].tolist(), loss=float(losses[index]))
        for index, length in enumerate(padded.lengths)
    ]
    metrics = {"loss:sum": float(losses.sum()), "tokens:sum": float(sum(padded.lengths))}
    return ForwardBackwardResult(outputs=outputs, metrics=metrics)


def _check_finite_losses(example_losses: torch.Tensor) -> None:
    finite = torch.isfinite(example_losses.detach())
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise InvalidArgument(f"loss_fn_inputs[{index}]", "the datum's loss is not finite")


def _json_default(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)

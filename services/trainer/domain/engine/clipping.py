"""Exact per-example clipping for LoRA layers from one backward pass ("book-keeping").

For a linear layer ``z = a Wᵀ`` applied to the tokens of example ``i`` (input
``a_i: [T, in]``, output gradient ``g_i = ∂L_i/∂z_i: [T, out]``), the per-example weight
gradient is ``G_i = g_iᵀ a_i`` (a sum of per-token outer products). Every LoRA update
``B A dropout(x)`` consists of two such layers, ``lora_A: in -> r`` and
``lora_B: r -> out``, and their weights are the only trainable parameters. So:

1. A forward hook on each ``lora_A``/``lora_B`` records its actual input (for
   ``lora_A`` that is the output of the LoRA dropout, i.e. what the weight really saw)
   and puts a gradient hook on its output.
2. One ``torch.autograd.grad`` of the summed loss (with respect to the ``lora_A``
   outputs; every ``lora_B`` output lies on the way) runs the backward pass once. As it
   produces each layer's ``g`` (examples are independent rows of the batch, so the
   gradient of the sum restricted to row ``i`` is ``∂L_i/∂z_i``), the layer's hook turns
   ``(a, g)`` into per-example norms and releases both. No parameter gradient is formed.
3. Per-example norms ``‖G_i‖_F`` come either directly (forming ``G_i``, small because
   one side is the rank r) or from Gram matrices,
   ``‖G_i‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)`` (Goodfellow, 2015, "Efficient per-example
   gradient computations"; Li et al., 2022, "ghost clipping"), summed over all layers.
4. With clip factors ``w_i = min(1, C / (‖G_i‖ + 1e-6))`` (the Opacus formula) the
   clipped sum of every layer is ``Σ_i w_i G_i``, one contraction
   (Bu et al., 2023, "Differentially Private Optimization on Large Model at Small
   Cost", the book-keeping technique).

The result equals materialising every per-example gradient, clipping and summing, to
float32 round-off, at about the cost and memory of one ordinary backward pass.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import NormMethod, choose_norm_method

# Added to the per-example norm before dividing, exactly as Opacus does
# (opacus.optimizers.optimizer.DPOptimizer.clip_and_accumulate), so that clip factors
# agree with Opacus bit for bit in the common case and never divide by zero.
CLIP_NORM_EPSILON = 1e-6


@dataclass(frozen=True)
class ClippedGradient:
    """Result of per-example clipping over all LoRA parameters of one batch."""

    clipped_sum: dict[str, torch.Tensor]
    """``Σ_i w_i G_i`` per parameter name."""
    per_example_norms: torch.Tensor
    """``[B]`` unclipped per-example gradient norms over all LoRA parameters. Private:
    never report them to a client."""
    clip_factors: torch.Tensor
    """``[B]`` the factors ``w_i``."""


@dataclass
class _LayerRecord:
    """One LoRA layer call of a recorded forward pass, filled in by the backward hook."""

    parameter_name: str
    method: NormMethod
    activations: torch.Tensor | None
    """The layer input ``[B, T, in]`` until the backward hook has used it."""
    example_grads: torch.Tensor | None = None
    """DIRECT: ``G_i`` as ``[B, out, in]`` or, when ``out > in``, ``[B, in, out]``."""
    output_grad: torch.Tensor | None = None
    """GRAM: ``g_i`` as ``[B, T, out]`` (the clipped sum needs it again)."""
    squared_norms: torch.Tensor | None = None
    in_features: int = 0
    out_features: int = 0


@dataclass
class LoraForwardRecord:
    """What :meth:`LoraActivationTap.capture` recorded of one forward pass.

    Pass it to :func:`clip_per_example` once; the gradient hooks it installed act only
    during that call, so other backward passes over the same graph are unaffected.
    """

    norm_method: NormMethod
    layers: list[_LayerRecord] = field(default_factory=list)
    requested_outputs: list[torch.Tensor] = field(default_factory=list)
    """Outputs of layers fed by something other than a recorded layer (the lora_A
    calls): the gradient targets of the single backward pass. A lora_B output lies on
    the path to its lora_A output, so its hook fires without being requested and its
    wide gradient is never returned and kept."""
    recorded_outputs: dict[int, weakref.ref[torch.Tensor]] = field(default_factory=dict)
    """Weak references to recorded outputs by ``id``: a layer whose input *is* one of
    them (same live object) is fed by a recorded layer. Addresses would not do: a freed
    output's memory is reused by later tensors."""
    batch_size: int = 0
    armed: bool = False
    consumed: bool = False

    def on_output_grad(self, layer: _LayerRecord, grad: torch.Tensor) -> None:
        """Gradient hook: turn one layer's ``(a_i, g_i)`` into norms right away."""
        if not self.armed:
            return
        activations = layer.activations
        if activations is None:
            raise RuntimeError(f"output gradient of {layer.parameter_name} arrived twice")
        activations = activations.reshape(self.batch_size, -1, activations.shape[-1])
        grad = grad.reshape(self.batch_size, -1, grad.shape[-1])
        in_features, out_features = activations.shape[2], grad.shape[2]
        layer.in_features, layer.out_features = in_features, out_features
        if layer.method is NormMethod.AUTO:
            layer.method = choose_norm_method(
                tokens=activations.shape[1], in_features=in_features, out_features=out_features
            )
        if layer.method is NormMethod.DIRECT:
            # G_i = g_iᵀ a_i, kept for the clipped sum; a_i and g_i are released now.
            # CPU batched matmuls are several times faster when the larger of (in, out)
            # is the result's last dimension, so the wider side goes last.
            if out_features > in_features:
                example_grads = torch.bmm(activations.transpose(1, 2), grad)
            else:
                example_grads = torch.bmm(grad.transpose(1, 2), activations)
            layer.squared_norms = example_grads.pow(2).sum(dim=(1, 2))
            layer.example_grads = example_grads
            layer.activations = None
        else:
            activation_gram = torch.bmm(activations, activations.transpose(1, 2))
            grad_gram = torch.bmm(grad, grad.transpose(1, 2))
            layer.squared_norms = (activation_gram * grad_gram).sum(dim=(1, 2))
            layer.activations = activations
            layer.output_grad = grad


class LoraActivationTap:
    """Forward hooks on LoRA linear layers that record a forward pass on demand.

    The hooks are installed once and do nothing outside :meth:`capture`, so inference
    and non-DP training pay one Python call per layer.

    Args:
        layers: The LoRA linear layers (``lora_A[adapter]``, ``lora_B[adapter]``) mapped
            to the name of their weight in ``model.named_parameters()``. They must have
            no bias (a LoRA factor never has one).

    Raises:
        ValueError: A layer has a bias.
    """

    def __init__(self, layers: Mapping[nn.Linear, str]) -> None:
        self._names: dict[nn.Module, str] = {}
        self._handles: list[RemovableHandle] = []
        self._record: LoraForwardRecord | None = None
        for layer, name in layers.items():
            if layer.bias is not None:
                raise ValueError(f"LoRA layer {name} has a bias; per-example clipping needs none")
            self._names[layer] = name
            self._handles.append(layer.register_forward_hook(self._on_forward))

    def _on_forward(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object
    ) -> None:
        record = self._record
        if record is None:
            return
        name = self._names[module]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"LoRA layer {name} returned {type(output).__name__}")
        activations = inputs[0].detach()
        if not record.layers:
            record.batch_size = activations.shape[0]
        layer = _LayerRecord(
            parameter_name=name, method=record.norm_method, activations=activations
        )
        record.layers.append(layer)
        # A gradient hook, not a kept reference: the output (wide for lora_B) is freed
        # as in an ordinary forward pass; the hook still fires in the backward pass. It
        # holds the record weakly: record -> requested output -> its autograd node ->
        # hook -> record would otherwise be a cycle through C++ that is never collected.
        record_ref = weakref.ref(record)

        def hook(grad: torch.Tensor) -> None:
            owner = record_ref()
            if owner is not None:
                owner.on_output_grad(layer, grad)

        output.register_hook(hook)  # type: ignore[no-untyped-call]  # untyped in torch
        producer = record.recorded_outputs.get(id(inputs[0]))
        if producer is None or producer() is not inputs[0]:
            record.requested_outputs.append(output)
        record.recorded_outputs[id(output)] = weakref.ref(output)

    @contextlib.contextmanager
    def capture(self, norm_method: NormMethod = NormMethod.AUTO) -> Iterator[LoraForwardRecord]:
        """Record every hooked layer call of the enclosed forward pass.

        Args:
            norm_method: How :func:`clip_per_example` computes per-layer norms.

        Yields:
            The record, to pass to :func:`clip_per_example`.

        Raises:
            RuntimeError: A capture is already in progress.
        """
        if self._record is not None:
            raise RuntimeError("a LoRA activation capture is already in progress")
        record = LoraForwardRecord(norm_method=norm_method)
        self._record = record
        try:
            yield record
        finally:
            self._record = None

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _clipped_layer_sum(layer: _LayerRecord, clip_factors: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i G_i`` in the weight's ``[out, in]`` layout."""
    out_features, in_features = layer.out_features, layer.in_features
    if layer.example_grads is not None:
        # One matrix-vector product over the flattened G_i.
        flat = clip_factors @ layer.example_grads.reshape(clip_factors.shape[0], -1)
        if out_features > in_features:
            return flat.view(in_features, out_features).T.contiguous()
        return flat.view(out_features, in_features)
    if layer.activations is None or layer.output_grad is None:
        raise RuntimeError(f"{layer.parameter_name} received no output gradient")
    weighted = (layer.output_grad * clip_factors.view(-1, 1, 1)).reshape(-1, out_features)
    tokens_by_in = layer.activations.reshape(-1, in_features)
    if out_features > in_features:
        return (tokens_by_in.T @ weighted).T.contiguous()
    return weighted.T @ tokens_by_in


def clip_factors_of(norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    """The per-example clip factors ``w_i = min(1, C / (‖G_i‖ + 1e-6))`` (Opacus's formula).

    The one place the factor is computed (:func:`clip_per_example`). The privacy
    audit's tests replace it to build a mechanism without clipping.

    Args:
        norms: ``[B]`` per-example gradient norms over all LoRA parameters.
        max_grad_norm: Clipping bound C.

    Returns:
        ``[B]`` factors in (0, 1].
    """
    return (max_grad_norm / (norms + CLIP_NORM_EPSILON)).clamp(max=1.0)


def _backward(loss: torch.Tensor, records: Sequence[LoraForwardRecord]) -> list[list[_LayerRecord]]:
    """The single backward pass of recorded forward passes; the hooks fill the layers.

    Several records (one per adapter of a multi-adapter batch) share the one pass.

    Raises:
        RuntimeError: As for :func:`clip_per_example`.
    """
    requested: list[torch.Tensor] = []
    for record in records:
        if record.consumed:
            raise RuntimeError("this forward record was already used for clipping")
        record.consumed = True
        if not record.layers:
            raise RuntimeError("no LoRA layer ran in the forward pass")
        names = [layer.parameter_name for layer in record.layers]
        if len(set(names)) != len(names):
            raise RuntimeError("a LoRA layer ran more than once in one forward pass")
        requested += record.requested_outputs
        record.requested_outputs = []
        record.recorded_outputs = {}
    for record in records:
        record.armed = True
    try:
        # The single backward pass; the hooks do the per-layer work.
        torch.autograd.grad(loss, requested)
    finally:
        for record in records:
            record.armed = False
    del requested
    result = []
    for record in records:
        for layer in record.layers:
            if layer.squared_norms is None:
                raise RuntimeError(f"{layer.parameter_name} received no output gradient")
        result.append(record.layers)
        record.layers = []
    return result


def _clip(layers: list[_LayerRecord], *, max_grad_norm: float) -> ClippedGradient:
    squared_norms: torch.Tensor | None = None
    for layer in layers:
        assert layer.squared_norms is not None
        squared_norms = (
            layer.squared_norms.float()
            if squared_norms is None
            else squared_norms + layer.squared_norms
        )
    assert squared_norms is not None  # _backward refuses a record without layers
    norms = squared_norms.sqrt()
    clip_factors = clip_factors_of(norms, max_grad_norm=max_grad_norm)
    clipped_sum = {
        layer.parameter_name: _clipped_layer_sum(layer, clip_factors) for layer in layers
    }
    return ClippedGradient(
        clipped_sum=clipped_sum, per_example_norms=norms, clip_factors=clip_factors
    )


def clip_per_example(
    loss: torch.Tensor, record: LoraForwardRecord, *, max_grad_norm: float
) -> ClippedGradient:
    """Clip every example's LoRA gradient to ``max_grad_norm`` and sum, in one backward.

    Args:
        loss: Scalar sum of the per-example losses of the batch whose forward pass
            ``record`` recorded.
        record: The record; consumed (a second call raises).
        max_grad_norm: Clipping bound C.

    Returns:
        The clipped sum per parameter, the per-example norms and the clip factors.

    Raises:
        RuntimeError: No LoRA layer ran, a layer ran more than once in the forward pass
            (its per-example gradient would not factor per call), a layer received no
            gradient, or the record was already used.
    """
    return _clip(_backward(loss, [record])[0], max_grad_norm=max_grad_norm)


def clip_per_example_jointly(
    loss: torch.Tensor, records: Sequence[tuple[LoraForwardRecord, float]]
) -> list[ClippedGradient]:
    """:func:`clip_per_example` for a batch whose rows ran through different adapters.

    Each record holds the layers of one adapter, which saw only that adapter's rows (a
    row's gradient reaches only its own adapter's factors), so each clipped sum covers
    exactly its own rows; the one backward pass serves them all.

    Args:
        loss: Scalar sum of the per-example losses of every row.
        records: Each adapter's record (consumed) with its clipping bound.

    Returns:
        One result per record, in order.

    Raises:
        RuntimeError: As for :func:`clip_per_example`.
    """
    layers = _backward(loss, [record for record, _ in records])
    return [
        _clip(record_layers, max_grad_norm=bound)
        for record_layers, (_, bound) in zip(layers, records, strict=True)
    ]


def per_example_gradients(loss: torch.Tensor, record: LoraForwardRecord) -> dict[str, torch.Tensor]:
    """Every example's unclipped LoRA gradient, materialised, from one backward pass.

    The same hooks and backward pass as :func:`clip_per_example`, for a record captured
    with :attr:`~.config.NormMethod.DIRECT` (which forms ``G_i``). Memory is
    ``B × (LoRA parameters)`` floats: for inspecting a few data (the privacy audit's
    white-box scores), not for training.

    Args:
        loss: Scalar sum of the per-example losses of the recorded batch.
        record: The record, captured with ``NormMethod.DIRECT``; consumed.

    Returns:
        Parameter name to ``[B, *weight.shape]`` (the weight's ``[out, in]`` layout).

    Raises:
        RuntimeError: As for :func:`clip_per_example`, or the record was not captured
            with ``NormMethod.DIRECT``.
    """
    if record.norm_method is not NormMethod.DIRECT:
        raise RuntimeError("per-example gradients need a record captured with DIRECT")
    gradients: dict[str, torch.Tensor] = {}
    for layer in _backward(loss, [record])[0]:
        example_grads = layer.example_grads
        if example_grads is None:
            raise RuntimeError(f"{layer.parameter_name} formed no per-example gradient")
        if layer.out_features > layer.in_features:
            # Stored as [B, in, out] (see on_output_grad); the weight is [out, in].
            example_grads = example_grads.transpose(1, 2)
        gradients[layer.parameter_name] = example_grads.contiguous()
    return gradients


def lora_linear_layers(
    model: nn.Module, adapter_name: str, *, label: str | None = None
) -> dict[nn.Linear, str]:
    """Find the ``lora_A``/``lora_B`` linear layers of one peft LoRA adapter.

    Args:
        model: A peft-wrapped model.
        adapter_name: The adapter (peft's default is ``"default"``).
        label: The adapter name written into the returned names (default
            ``adapter_name``). Engines sharing a base (:mod:`.base`) each have their own
            adapter name but label their factors alike, so checkpoints and gradients
            carry the same names whichever adapter slot a client occupies.

    Returns:
        Each factor's linear layer mapped to the name of its weight in
        ``model.named_parameters()``.

    Raises:
        RuntimeError: A factor is not a plain linear layer (e.g. an embedding or
            convolution LoRA), for which this module's clipping does not apply.
    """
    return factor_linear_layers(model.named_modules(), adapter_name, label=label)


def factor_linear_layers(
    modules: Iterable[tuple[str, object]], adapter_name: str, *, label: str | None = None
) -> dict[nn.Linear, str]:
    """:func:`lora_linear_layers` over named modules already found (e.g. a cached list
    of a model's LoRA layers, which does not grow with the adapters on it)."""
    layers: dict[nn.Linear, str] = {}
    for module_name, module in modules:
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        for factor in ("lora_A", "lora_B"):
            linear = getattr(module, factor)[adapter_name]
            if not isinstance(linear, nn.Linear):
                raise RuntimeError(f"{module_name}.{factor} is not a linear layer")
            layers[linear] = f"{module_name}.{factor}.{label or adapter_name}.weight"
    return layers

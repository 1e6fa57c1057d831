"""One frozen base model shared by the LoRA adapters of many training clients.

A worker loads each base model once (DESIGN §9, "One base, many adapters"): a
:class:`SharedBase` holds the frozen weights, in the configured dtype on the configured
device, wrapped once by peft; every resident training client is one named peft adapter
on it (``add_adapter`` / ``set_adapter`` / ``delete_adapter``). A client's own state is
its adapter, its AdamW moments, its gradient accumulator and its accountant — a few MB
for the tiny model's r=8 adapter, ~270 MB for a 7B model's r=16 adapter with Adam —
against ~28 GB per fp32 copy of a 7B base.

Only one adapter is active at a time: :meth:`SharedBase.activate` makes the trainable
parameters exactly that adapter's ``lora_A``/``lora_B`` weights (per-example clipping
covers those and nothing else) and makes it the adapter every LoRA layer runs. A
shared base is used by one thread at a time (the worker runs one job at a time);
switching never reloads the base, and its cost does not grow with the number of
adapters on the base: peft's ``set_adapter`` walks every module and flips
``requires_grad`` on every adapter's weights (~31 ms per switch with 64 adapters on the
bench model, plus ~14 ms to re-check the trainable set and ~18 ms for ``train()``'s walk
over every adapter's modules, against a 37 ms step), so after a change of the adapter
set the whole model is normalised once, over cached lists, and later switches only
turn off the previous adapter's factors and turn on the next one's, and set the
active adapter where peft keeps it (see :meth:`SharedBase.activate`). Adding and
removing an adapter do not grow with the adapters either (:meth:`SharedBase.add_adapter`,
:meth:`SharedBase.remove_adapter`): peft's ``add_adapter``/``delete_adapter`` walk every
module and parameter of every adapter on the base (~400 ms to add the 130th adapter on
the bench model), so once the modules an adapter targets are LoRA layers, a new adapter
goes into them by peft's own per-layer step and an old one leaves them by peft's own
per-layer ``delete_adapter``, over the cached layers.

Adapter factors stay float32 whatever the base dtype (peft computes the LoRA branch in
the factors' dtype and casts back), so clipping, noise and AdamW run in float32 and a
checkpoint loads on any base dtype.
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from tensafe.common.errors import FailedPrecondition, InvalidArgument, NotFound

from .clipping import factor_linear_layers
from .config import LoraConfig


class BaseDtype(enum.Enum):
    """The dtype the frozen base weights are held in."""

    FLOAT32 = "fp32"
    BFLOAT16 = "bf16"
    FLOAT16 = "fp16"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype."""
        return {
            BaseDtype.FLOAT32: torch.float32,
            BaseDtype.BFLOAT16: torch.bfloat16,
            BaseDtype.FLOAT16: torch.float16,
        }[self]


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
"""The device settings accepted: ``auto`` (the first CUDA device when there is one,
else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""


def resolve_device(setting: str) -> torch.device:
    """The torch device a device setting names.

    Args:
        setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The device.

    Raises:
        InvalidArgument: The setting is none of those.
        FailedPrecondition: A CUDA device is asked for and torch sees none (or not
            that index).
    """
    if not DEVICE_PATTERN.fullmatch(setting):
        raise InvalidArgument("device", f"{setting!r} is not auto, cpu, cuda or cuda:N")
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {setting} asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FailedPrecondition(
                f"device {setting} asked for, but torch sees {torch.cuda.device_count()}"
            )
    return device


@dataclass(frozen=True)
class BasePlacement:
    """Where and how a base model is held."""

    dtype: BaseDtype = BaseDtype.FLOAT32
    """The base weights' dtype (adapters stay float32)."""
    device: torch.device = torch.device("cpu")
    """The device of the base and of every adapter, activation and optimizer state."""


class SharedBase:
    """One frozen base model and the peft adapters of the clients that share it.

    Args:
        model_dir: A local Hugging Face model directory (``from_pretrained``).
        placement: The dtype and device.

    Raises:
        NotFound: ``model_dir`` is not a model directory.
        FailedPrecondition: The model cannot be loaded.
    """

    def __init__(self, model_dir: Path | str, placement: BasePlacement | None = None) -> None:
        self._dir = Path(model_dir)
        self._placement = placement if placement is not None else BasePlacement()
        base = _load_base_model(self._dir, self._placement)
        self._base: PreTrainedModel = base
        self._module_keys = [key for key, _ in base.named_modules() if key]
        """The base's modules, in the order peft's ``inject_adapter`` visits them."""
        self._linear_names = {
            name.rsplit(".", 1)[-1]
            for name, module in base.named_modules()
            if isinstance(module, nn.Linear)
        }
        self.base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        """Bytes of the base weights."""
        config = base.config
        self.vocab_size = int(config.vocab_size)
        """Token ids must be below this."""
        self.max_length = int(getattr(config, "max_position_embeddings", 0) or 0)
        """Longest sequence the model accepts."""
        if self.max_length <= 0:
            raise FailedPrecondition("base model config has no max_position_embeddings")
        self._model: PeftModel | None = None
        self._factors: dict[str, list[torch.Tensor]] = {}
        """Adapter name -> its factor weights (the trainable set when active)."""
        self._active: str | None = None
        self._next_index = 0
        # Cached walks of the peft model, taken again after an adapter is added or removed.
        self._parameters: list[torch.Tensor] = []
        self._tuner_layers: list[tuple[str, BaseTunerLayer]] = []
        """The LoRA layers with their names in the peft model."""
        self._trainable: list[torch.Tensor] | None = None
        """Exactly the parameters with requires_grad set; None: unknown (normalise)."""
        self._training: bool | None = None
        """The mode of every module no adapter owns; None: unknown (new modules)."""
        self._shared_modules: list[nn.Module] = []
        """Every module of the model that no adapter owns (the base, the LoRA layers)."""
        self._owned: dict[str, list[nn.Module]] = {}
        """Each adapter's own modules (its factors and dropout in every LoRA layer)."""
        self._modes: dict[str, bool] = {}
        """The mode each adapter's own modules are in (absent: unknown)."""
        self._in_use: list[str] = []
        """The adapters the model runs now (one, or a joint pass's)."""
        self._plain_modes = True
        """Whether every module's ``train`` only sets ``training`` (mode by attribute)."""

    @property
    def model_dir(self) -> Path:
        """The base model's directory."""
        return self._dir

    @property
    def device(self) -> torch.device:
        """Where the base, the adapters and their states live."""
        return self._placement.device

    @property
    def adapters(self) -> int:
        """Adapters currently on this base."""
        return len(self._factors)

    def add_adapter(self, lora: LoraConfig, seed: int) -> tuple[str, PeftModel]:
        """Add a freshly initialised adapter (not active yet).

        The initialisation depends only on ``lora`` and ``seed``: the first adapter
        (``get_peft_model``) and any later one (``add_adapter``) draw the same weights,
        so a client's adapter does not depend on who else shares the base.

        Args:
            lora: The adapter.
            seed: Seeds the initialisation; the process's RNG state is left alone.

        Returns:
            The adapter's name on this base and the shared peft model.

        Raises:
            InvalidArgument: ``lora.target_modules`` names no linear layer of the model.
        """
        missing = [name for name in lora.target_modules if name not in self._linear_names]
        if missing:
            raise InvalidArgument(
                "lora.target_modules", f"no linear layer named {', '.join(missing)} in the model"
            )
        peft_config = PeftLoraConfig(
            r=lora.rank,
            # peft annotates lora_alpha as int but only divides by it; a float alpha is
            # what the TenSafe contract allows.
            lora_alpha=lora.alpha,  # type: ignore[arg-type]
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # peft's default name while it is free (a base of one engine looks like any
        # single-adapter peft model); a numbered one otherwise.
        name = "default"
        if name in self._factors:
            name = f"client{self._next_index}"
            self._next_index += 1
        in_place = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self._model is None:
                self._model = get_peft_model(self._base, peft_config, adapter_name=name)
            else:
                in_place = self._add_to_lora_layers(name, peft_config)
                if not in_place:
                    self._model.add_adapter(name, peft_config)
        model = self._model
        if not in_place:
            self._tuner_layers = [
                (key, module)
                for key, module in model.named_modules()
                if isinstance(module, BaseTunerLayer)
            ]
        layers = self.factor_layers(name)
        for linear in layers:
            # Float32 factors on the base's device whatever the base dtype: the clipped
            # sums, the noise and AdamW stay exact (see the module docstring). (``to``
            # converts in place: the parameter objects stay the same.)
            linear.to(device=self.device, dtype=torch.float32)
        self._factors[name] = [linear.weight for linear in layers]
        if in_place:
            self._added(name)
        else:
            self._changed()
        return name, model

    def _add_to_lora_layers(self, name: str, config: PeftLoraConfig) -> bool:
        """Add adapter ``name`` to the LoRA layers already in place, as peft's
        ``inject_adapter`` does, without its walks.

        When every module ``config`` targets is a LoRA layer already, what
        ``inject_adapter`` changes in the model is one ``_create_and_replace`` per
        targeted module, in the order of ``named_modules``, with these arguments (each
        calls the layer's ``update_layer``, which draws the new factors); the rest of it
        (a snapshot and restore of every parameter's ``requires_grad``, a ``set_adapter``
        and a trainable-set pass over every adapter on the base) is what
        :meth:`activate` does exactly, later. So the weights drawn, the modules made and
        the peft config recorded are those of ``add_adapter``
        (tests/trainer_engine/test_shared_base.py compares the two).

        Returns:
            Whether the adapter was added; False, with nothing changed, when a module
            ``config`` targets is not a LoRA layer yet (peft's ``add_adapter`` wraps it).
        """
        model = self._require_model()
        tuner: Any = model.base_model  # peft's LoraModel (typed as a module)
        targets = [
            key for key in self._module_keys if tuner._check_target_module_exists(config, key)
        ]
        modules = [self._base.get_submodule(key) for key in targets]
        layers = [module for module in modules if isinstance(module, LoraLayer)]
        if not targets or len(layers) < len(modules):
            return False
        model.peft_config[name] = config
        try:
            tuner._check_new_adapter_config(config)
            for key, layer in zip(targets, layers, strict=True):
                parent, _, target_name = key.rpartition(".")
                tuner._create_and_replace(
                    config,
                    name,
                    layer,
                    target_name,
                    self._base.get_submodule(parent),
                    current_key=key,
                )
        except BaseException:
            del model.peft_config[name]
            for layer in layers:
                layer.delete_adapter(name)  # (a no-op where it was not added yet)
            raise
        return True

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter the shared model runs and trains: its factors, and
        nothing else, require gradients; every LoRA layer runs it.

        The first switch after the adapter set changed sets ``requires_grad`` on every
        parameter explicitly (whatever peft's own ``add_adapter``/``delete_adapter``
        marked trainable); later switches change only the previous and the next
        adapter's factors, so the trainable set stays exact by construction
        (tests/trainer_engine/test_shared_base.py checks it against a full scan and the
        active adapters against peft's ``set_adapter`` after many switches).
        """
        if self._active == name:
            return
        model = self._require_model()
        self._make_trainable(self._factors[name])
        # Where peft 0.21's set_adapter keeps the active adapter (peft is pinned): the
        # model, its tuner and each LoRA layer (``BaseTunerLayer.set_adapter`` sets
        # ``_active_adapter`` after flipping requires_grad on all of the layer's adapters,
        # which is the part that grows with the number of adapters).
        tuner: Any = model.base_model  # peft's LoraModel (typed as a module)
        model.active_adapter = name
        tuner.active_adapter = name
        for _, layer in self._tuner_layers:
            layer._active_adapter = [name]
        self._active = name
        self._use([name])

    def set_training(self, training: bool) -> None:
        """Put the model as it runs now in training (dropout on) or evaluation mode.

        ``nn.Module.train`` walks every adapter's modules (~16 ms with 134 adapters on
        the bench model, and a joint pass runs in evaluation mode between training
        passes), so once the modes are known only the modules no adapter owns and the
        adapters in use change; an idle adapter's modules take the mode when it is
        next used (:meth:`activate`, :meth:`train_together`). Where a module's
        ``train`` does more than set ``training``, every call walks the whole model.
        """
        if self._training is None or not self._plain_modes:
            if self._training is not training:
                self._require_model().train(training)
                self._modes = dict.fromkeys(self._owned, training)
                self._training = training
            return
        if self._training is not training:
            for module in self._shared_modules:
                module.training = training
            self._training = training
        for name in self._in_use:
            self._sync_mode(name)

    def _use(self, names: list[str]) -> None:
        """``names`` are the adapters the model runs; their modules take its mode."""
        self._in_use = names
        for name in names:
            self._sync_mode(name)

    def _sync_mode(self, name: str) -> None:
        """Put adapter ``name``'s own modules in the model's mode if they are not."""
        if self._training is not None and self._modes.get(name) is not self._training:
            for module in self._owned[name]:
                if self._plain_modes:
                    module.training = self._training
                else:
                    module.train(self._training)
            self._modes[name] = self._training

    def train_together(self, names: Sequence[str]) -> PeftModel:
        """Make exactly the factors of ``names`` trainable, for one forward/backward
        whose rows each run through their own adapter (peft's ``adapter_names=``).

        The next :meth:`activate` returns to a single active adapter.

        Args:
            names: Adapters on this base.

        Returns:
            The shared peft model.
        """
        model = self._require_model()
        self._make_trainable([p for name in names for p in self._factors[name]])
        self._active = None
        self._use(list(names))
        return model

    def _make_trainable(self, parameters: list[torch.Tensor]) -> None:
        """Exactly ``parameters`` require gradients: every parameter set explicitly when
        the trainable set is unknown, else only the previous set and the new one."""
        if self._trainable is None:
            wanted = {id(p) for p in parameters}
            for parameter in self._parameters:
                parameter.requires_grad_(id(parameter) in wanted)
        else:
            for parameter in self._trainable:
                parameter.requires_grad_(False)
            for parameter in parameters:
                parameter.requires_grad_(True)
        self._trainable = parameters

    def trainable_parameter_ids(self) -> set[int]:
        """Ids of the parameters that require gradients, by a full scan (for checks)."""
        return {id(p) for p in self._require_model().parameters() if p.requires_grad}

    def factor_ids(self, name: str) -> set[int]:
        """Ids of an adapter's factor weights."""
        return {id(p) for p in self._factors[name]}

    def factor_layers(self, name: str, *, label: str | None = None) -> dict[nn.Linear, str]:
        """An adapter's ``lora_A``/``lora_B`` layers and their weights' names (see
        :func:`.clipping.lora_linear_layers`, here over the cached LoRA layers)."""
        return factor_linear_layers(self._tuner_layers, name, label=label)

    def _changed(self) -> None:
        """New modules were wrapped: walk the model again; the next switch normalises
        the trainable set and the next :meth:`set_training` every module's mode."""
        model = self._require_model()
        self._parameters = list(model.parameters())
        self._owned = {name: self._adapter_modules(name) for name in self._factors}
        owned = {id(module) for modules in self._owned.values() for module in modules}
        modules = list(model.modules())
        self._shared_modules = [module for module in modules if id(module) not in owned]
        self._plain_modes = all(_train_sets_only_the_mode(module) for module in modules)
        self._trainable = None
        self._training = None
        self._modes = {}
        self._in_use = []
        self._active = None

    def _adapter_modules(self, name: str) -> list[nn.Module]:
        """An adapter's own modules (and theirs) in every LoRA layer: its factors, its
        dropout."""
        modules: list[nn.Module] = []
        for _, layer in self._tuner_layers:
            for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
                container = getattr(layer, attribute, None)
                if isinstance(container, nn.ModuleDict) and name in container:
                    modules += container[name].modules()
        return modules

    def _added(self, name: str) -> None:
        """``name`` went into existing LoRA layers: its parameters join the cached list,
        its modules take the model's mode when used, and the next switch normalises
        (peft's per-layer step re-applies each layer's active adapter's
        ``requires_grad``)."""
        modules = self._adapter_modules(name)
        self._owned[name] = modules
        self._parameters += [p for module in modules for p in module.parameters(recurse=False)]
        self._plain_modes = self._plain_modes and all(map(_train_sets_only_the_mode, modules))
        self._trainable = None
        self._active = None

    def remove_adapter(self, name: str) -> None:
        """Delete an adapter and free its weights; the base stays loaded.

        What peft's ``delete_adapter`` does for a LoRA model without auxiliary modules
        (TenSafe's adapters save no other module), over the cached LoRA layers: the
        config goes, every layer deletes the adapter (peft's ``BaseTunerLayer``
        ``delete_adapter``), and the active adapter moves as peft moves it.
        """
        if name not in self._factors:
            return
        del self._factors[name]
        model = self._require_model()
        tuner: Any = model.base_model  # peft's LoraModel (typed as a module)
        gone = {id(p) for module in self._owned.pop(name) for p in module.parameters()}
        self._modes.pop(name, None)
        self._in_use = [used for used in self._in_use if used != name]
        del model.peft_config[name]
        remaining: list[str] | None = None
        with warnings.catch_warnings():
            # peft warns when the deleted adapter was the active one; the next
            # activate() sets the active adapter explicitly.
            warnings.simplefilter("ignore", UserWarning)
            for _, layer in self._tuner_layers:
                layer.delete_adapter(name)
                if remaining is None:
                    remaining = list(layer.active_adapters)
        if name in tuner.active_adapters:
            tuner.active_adapter = remaining or []
            if remaining is not None and len(remaining) == 1:
                model.active_adapter = remaining[0]
        self._parameters = [p for p in self._parameters if id(p) not in gone]
        self._trainable = None
        self._active = None

    def _require_model(self) -> PeftModel:
        if self._model is None:
            raise RuntimeError("no adapter was added to this base")
        return self._model


def _train_sets_only_the_mode(module: nn.Module) -> bool:
    """Whether ``module.train(mode)`` does nothing but set ``training`` on it and its
    children (transformers' ``PreTrainedModel.train`` also re-casts hub kernels, when
    the model uses them)."""
    train = type(module).train
    if train is nn.Module.train:
        return True
    return (
        isinstance(module, PreTrainedModel)
        and train is PreTrainedModel.train
        and not getattr(module, "use_kernels", False)
    )


class BaseModelPool:
    """The shared bases of one worker: each base model directory loaded once.

    Args:
        placement: The dtype and device every base is held in.
    """

    def __init__(self, placement: BasePlacement | None = None) -> None:
        self._placement = placement if placement is not None else BasePlacement()
        self._bases: dict[Path, SharedBase] = {}
        self.loads = 0
        """Base models loaded so far (one per directory unless it failed)."""

    def __contains__(self, model_dir: object) -> bool:
        return isinstance(model_dir, Path | str) and Path(model_dir) in self._bases

    def get(self, model_dir: Path | str) -> SharedBase:
        """The shared base of ``model_dir``, loading it the first time.

        Raises:
            NotFound: ``model_dir`` is not a model directory.
            FailedPrecondition: The model cannot be loaded.
        """
        path = Path(model_dir)
        base = self._bases.get(path)
        if base is None:
            base = SharedBase(path, self._placement)
            self._bases[path] = base
            self.loads += 1
        return base

    def resident_bytes(self) -> int:
        """Bytes of the loaded base weights."""
        return sum(base.base_bytes for base in self._bases.values())


def _load_base_model(model_dir: Path, placement: BasePlacement) -> PreTrainedModel:
    if not (model_dir / "config.json").is_file():
        raise NotFound(f"base model directory {model_dir} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="eager", dtype=placement.dtype.torch_dtype
        )
    except (OSError, ValueError) as error:
        raise FailedPrecondition(f"cannot load base model from {model_dir}: {error}") from error
    if not isinstance(model, PreTrainedModel):
        raise FailedPrecondition(f"{model_dir} did not load as a transformers model")
    nn.Module.to(model, placement.device)  # (transformers types its own .to narrowly)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model

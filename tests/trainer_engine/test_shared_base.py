"""Many engines on one shared base model (DESIGN §9): one base in memory, each engine
exactly as if it had the base to itself."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from tensafe.trainer.domain.engine.base import BaseDtype, BaseModelPool, BasePlacement, SharedBase
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.domain.engine.state import decode_state, encode_state
from tensafe.trainer.domain.engine.training import (
    ForwardBackwardCall,
    LoraTrainingEngine,
    forward_backward_jointly,
)

from .conftest import cross_entropy_batch

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj"))
OTHER_LORA = LoraConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("k_proj", "o_proj"))
# Noise 0 so that runs compare bit for bit (the noise key is fresh per step); the
# clipping bound is small enough that every example is clipped.
DP = DpConfig(noise_multiplier=0.0, max_grad_norm=0.05)
ADAM = AdamConfig(learning_rate=5e-2)


def _train(
    engine: LoraTrainingEngine, sequences: list[list[int]], *, steps: int, offset: int = 0
) -> list[float]:
    """``steps`` steps of two ForwardBackward calls each; returns the losses."""
    losses = []
    for step in range(steps):
        for call in range(2):
            start = offset + 4 * (2 * step + call)
            batch, inputs = cross_entropy_batch(sequences[start : start + 4])
            result = engine.forward_backward(batch, "cross_entropy", inputs)
            losses.append(result.metrics["loss:sum"])
        engine.optim_step(ADAM)
    return losses


def _interleaved(
    first: LoraTrainingEngine, second: LoraTrainingEngine, sequences: list[list[int]]
) -> tuple[list[float], list[float]]:
    """Both engines trained call by call in turn (each call switches the adapter)."""
    first_losses: list[float] = []
    second_losses: list[float] = []
    for step in range(3):
        first_losses += _train_one_call_each(first, second, sequences, step, second_losses)
    return first_losses, second_losses


def _train_one_call_each(
    first: LoraTrainingEngine,
    second: LoraTrainingEngine,
    sequences: list[list[int]],
    step: int,
    second_losses: list[float],
) -> list[float]:
    losses = []
    for call in range(2):
        start = 4 * (2 * step + call)
        batch, inputs = cross_entropy_batch(sequences[start : start + 4])
        losses.append(first.forward_backward(batch, "cross_entropy", inputs).metrics["loss:sum"])
        batch, inputs = cross_entropy_batch(sequences[20 + start : 24 + start])
        second_losses.append(
            second.forward_backward(batch, "cross_entropy", inputs).metrics["loss:sum"]
        )
    first.optim_step(ADAM)
    second.optim_step(ADAM)
    return losses


def test_engines_share_one_base_and_train_as_if_alone(
    tiny_model_dir: Path, corpus_sequences: list[list[int]]
) -> None:
    pool = BaseModelPool()
    base = pool.get(tiny_model_dir)
    assert pool.get(tiny_model_dir) is base
    first = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=3)
    second = LoraTrainingEngine(base, lora=OTHER_LORA, dp=None, seed=4)
    alone_first = LoraTrainingEngine(tiny_model_dir, lora=LORA, dp=DP, seed=3)
    alone_second = LoraTrainingEngine(tiny_model_dir, lora=OTHER_LORA, dp=None, seed=4)
    try:
        assert pool.loads == 1 and base.adapters == 2
        # One copy of the base weights: both engines' models hold the same tensors.
        shared = dict(first.model.named_parameters())
        weight = "base_model.model.model.layers.0.mlp.up_proj.weight"
        assert shared[weight].data_ptr() == dict(second.model.named_parameters())[weight].data_ptr()
        assert (
            shared[weight].data_ptr()
            != dict(alone_first.model.named_parameters())[weight].data_ptr()
        )
        # Checkpoint names do not depend on the adapter's slot on the base.
        assert first.parameter_names == alone_first.parameter_names

        first_losses, second_losses = _interleaved(first, second, corpus_sequences)
        alone_first_losses = _train(alone_first, corpus_sequences, steps=3)
        alone_second_losses = _train(alone_second, corpus_sequences, steps=3, offset=20)

        assert first_losses == alone_first_losses
        assert second_losses == alone_second_losses
        assert first.state_dict() == alone_first.state_dict()
        assert second.state_dict() == alone_second.state_dict()
        # Training moved both adapters (a run that trained nothing would also agree).
        assert first_losses[-1] != first_losses[1]
        probe = [corpus_sequences[40][:12]]
        assert first.compute_logprobs(probe) == alone_first.compute_logprobs(probe)
        assert second.compute_logprobs(probe) == alone_second.compute_logprobs(probe)
        assert first.compute_logprobs(probe) != second.compute_logprobs(probe)
    finally:
        for engine in (first, second, alone_first, alone_second):
            engine.close()
    assert base.adapters == 0


def test_only_the_active_adapter_is_trainable(tiny_model_dir: Path) -> None:
    base = SharedBase(tiny_model_dir)
    first = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=1)
    second = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=2)
    try:
        for engine in (first, second, first):
            model = engine.model  # activates the engine's adapter
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            factors = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
            assert trainable == factors and len(trainable) == len(engine.parameter_names)
            adapter = "default" if engine is first else "client0"
            assert all(f".{adapter}." in n for n in trainable)
    finally:
        first.close()
        second.close()


def test_switching_adapters_leaves_the_model_as_peft_set_adapter_does(
    tiny_model_dir: Path, corpus_sequences: list[list[int]]
) -> None:
    """The incremental switch (only the previous and the next adapter's factors change)
    ends, after every kind of change, where peft's own full ``set_adapter`` ends: the
    same trainable set (exactly the active factors, by a full scan), the same active
    adapter in every LoRA layer, and every module the model runs in the mode of the
    last call (the other adapters' modules take it when they are next used)."""
    base = SharedBase(tiny_model_dir)
    engines = [
        # OTHER_LORA has no dropout: engines 0 and 2 can share a joint pass.
        LoraTrainingEngine(base, lora=OTHER_LORA if i % 2 == 0 else LORA, dp=DP, seed=i)
        for i in range(3)
    ]
    batch, inputs = cross_entropy_batch(corpus_sequences[:4])

    def running(*names: str) -> list[torch.nn.Module]:
        """The modules a pass of adapters ``names`` runs: all but the others' own."""
        model = base._require_model()
        idle = {
            id(module)
            for container in model.modules()
            if isinstance(container, torch.nn.ModuleDict)
            for adapter, entry in container.items()
            if adapter not in names
            for module in entry.modules()
        }
        modules = [m for m in model.modules() if id(m) not in idle]
        assert len(modules) < len(list(model.modules()))
        return modules

    def check(engine: LoraTrainingEngine, *, training: bool) -> None:
        model = engine._model
        name = engine._adapter
        assert base.trainable_parameter_ids() == base.factor_ids(name)
        layers = [m for m in model.modules() if hasattr(m, "_active_adapter")]
        active = [list(m.active_adapters) for m in layers]
        assert active == [[name]] * len(layers) and model.active_adapter == name
        assert all(m.training is training for m in running(name))
        model.set_adapter(name)  # peft's full switch changes nothing
        assert base.trainable_parameter_ids() == base.factor_ids(name)
        assert [list(m.active_adapters) for m in layers] == active

    try:
        for engine in [*engines, engines[0], engines[2], engines[1]]:
            engine.forward_backward(batch, "cross_entropy", inputs)
            check(engine, training=True)
            engine.optim_step(ADAM)  # (a datum may appear once per step)
        engines[1].forward(batch, "cross_entropy", inputs)
        check(engines[1], training=False)
        # Two clients' rows in one pass (in evaluation mode), then back to one adapter.
        forward_backward_jointly(
            [
                (engine, ForwardBackwardCall(batch, "cross_entropy", inputs))
                for engine in (engines[0], engines[2])
            ]
        )
        joint = running(engines[0]._adapter, engines[2]._adapter)
        assert not any(m.training for m in joint)
        engines[1].forward_backward(batch, "cross_entropy", inputs)
        check(engines[1], training=True)
        for engine in engines:
            engine.optim_step(ADAM)
        # An adapter added after a forward (evaluation mode): its new modules are in
        # evaluation mode too.
        engines[1].forward(batch, "cross_entropy", inputs)
        engines.append(LoraTrainingEngine(base, lora=LORA, dp=DP, seed=7))
        engines[-1].forward(batch, "cross_entropy", inputs)
        check(engines[-1], training=False)
        # An adapter added after a joint pass (peft's per-layer step turns on the factors
        # of each layer's active adapter, the last single one's, not in the joint set):
        # normalised.
        forward_backward_jointly(
            [
                (engine, ForwardBackwardCall(batch, "cross_entropy", inputs))
                for engine in (engines[0], engines[2])
            ]
        )
        engines.append(LoraTrainingEngine(base, lora=LORA, dp=DP, seed=8))
        check(engines[-1], training=False)  # (a joint pass runs in evaluation mode)
        engines[0].optim_step(ADAM)
        engines[2].optim_step(ADAM)
        # One removed: normalised again.
        engines.pop(0).close()
        for engine in [engines[-1], *engines]:
            engine.forward_backward(batch, "cross_entropy", inputs)
            check(engine, training=True)
            engine.optim_step(ADAM)
    finally:
        for engine in engines:
            engine.close()


def _peft_state(base: SharedBase) -> tuple[dict[str, torch.Tensor], dict[str, object], list[str]]:
    """What peft holds for the adapters on a base: every tensor by name, every adapter's
    config, and each LoRA layer's per-adapter settings and module types."""
    model = base._require_model()
    configs = {name: config.to_dict() for name, config in model.peft_config.items()}
    layers = []
    for key, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            settings = {
                attribute: getattr(layer, attribute) for attribute in ("r", "lora_alpha", "scaling")
            }
            dropout = {name: repr(module) for name, module in layer.lora_dropout.items()}
            layers.append(f"{key} {type(layer).__name__} {settings} {dropout}")
    return model.state_dict(), configs, layers


@pytest.mark.parametrize("dtype", [BaseDtype.FLOAT32, BaseDtype.BFLOAT16])
def test_adapters_added_and_removed_in_place_are_peft_add_and_delete_adapter(
    tiny_model_dir: Path,
    corpus_sequences: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
    dtype: BaseDtype,
) -> None:
    """An adapter added to the LoRA layers already in place (and one removed from them)
    leaves the model exactly where peft's own ``add_adapter`` (``delete_adapter``)
    leaves it: the same factors drawn, the same modules and settings, the same configs,
    and the same logits for every adapter."""
    placement = BasePlacement(dtype=dtype)
    ours = SharedBase(tiny_model_dir, placement)
    peft_own = SharedBase(tiny_model_dir, placement)
    wider = LoraConfig(
        rank=8, alpha=4.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    # A first adapter on q/v, then: the same targets (in place), new targets (peft wraps
    # k/o), another rank on the wrapped modules (in place), all four (in place).
    configs = [
        (LORA, 1),
        (LORA, 2),
        (OTHER_LORA, 3),
        (LoraConfig(rank=6, alpha=3.0), 4),
        (wider, 5),
    ]
    in_place = []
    real_add = SharedBase._add_to_lora_layers

    def add_and_record(self: SharedBase, name: str, config: object) -> bool:
        added = real_add(self, name, config)  # type: ignore[arg-type]
        in_place.append(added)
        return added

    monkeypatch.setattr(SharedBase, "_add_to_lora_layers", add_and_record)
    names = [ours.add_adapter(lora, seed)[0] for lora, seed in configs]
    assert in_place == [True, False, True, True]
    ours.remove_adapter(names[1])
    names.append(ours.add_adapter(LORA, 6)[0])
    assert in_place[-1] is True
    ours.remove_adapter(names[0])

    monkeypatch.setattr(SharedBase, "_add_to_lora_layers", lambda *_: False)
    reference = [peft_own.add_adapter(lora, seed)[0] for lora, seed in configs]
    peft_own._require_model().delete_adapter(reference[1])
    reference.append(peft_own.add_adapter(LORA, 6)[0])
    peft_own._require_model().delete_adapter(reference[0])
    assert reference == names

    state, peft_configs, layers = _peft_state(ours)
    expected_state, expected_configs, expected_layers = _peft_state(peft_own)
    assert peft_configs == expected_configs and layers == expected_layers
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[key], expected_state[key]) for key in state)
    assert len(layers) == 8 and len(peft_configs) == 4  # 2 blocks x q/k/v/o; 4 adapters

    batch = torch.tensor([corpus_sequences[0][:12]])
    for name in names[2:]:
        ours.activate(name)
        peft_own._require_model().set_adapter(name)
        with torch.no_grad():
            logits = ours._require_model()(batch).logits
            assert torch.equal(logits, peft_own._require_model()(batch).logits)
    ours.activate(names[2])
    assert ours.trainable_parameter_ids() == ours.factor_ids(names[2])


def test_a_closed_engine_frees_its_adapter_and_a_new_one_starts_fresh(
    tiny_model_dir: Path, corpus_sequences: list[list[int]]
) -> None:
    base = SharedBase(tiny_model_dir)
    engine = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=3)
    initial = engine.state_dict()
    _train(engine, corpus_sequences, steps=1)
    trained = engine.state_dict()
    factor = weakref.ref(next(iter(engine._parameters.values())))
    engine.close()
    del engine
    gc.collect()
    assert base.adapters == 0
    assert factor() is None  # nothing on the base keeps the closed adapter's weights

    again = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=3)
    try:
        # The closed engine's factors are gone from the shared model.
        factors = [n for n, _ in again.model.named_parameters() if ".lora_" in n]
        assert len(factors) == len(again.parameter_names)
        assert again.state_dict() == initial != trained
        again.load_state(trained)
        assert again.state_dict() == trained
    finally:
        again.close()


def test_resident_bytes_count_adapter_accumulator_and_moments(tiny_model_dir: Path) -> None:
    engine = LoraTrainingEngine(tiny_model_dir, lora=LORA, dp=DP, seed=1)
    try:
        adapter = sum(t.numel() * 4 for t in engine.adapter_tensors().values())
        assert engine.resident_bytes() == 4 * adapter
        assert engine.base.base_bytes > 50 * adapter
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", [BaseDtype.BFLOAT16, BaseDtype.FLOAT16])
def test_a_half_precision_base_trains_float32_adapters(
    tiny_model_dir: Path, corpus_sequences: list[list[int]], dtype: BaseDtype
) -> None:
    base = SharedBase(tiny_model_dir, BasePlacement(dtype=dtype))
    half = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=3)
    full = LoraTrainingEngine(tiny_model_dir, lora=LORA, dp=DP, seed=3)
    try:
        model_dtypes = {p.dtype for n, p in half.model.named_parameters() if ".lora_" not in n}
        assert model_dtypes == {dtype.torch_dtype}
        half_losses = _train(half, corpus_sequences, steps=2)
        full_losses = _train(full, corpus_sequences, steps=2)
        for ours, reference in zip(half_losses, full_losses, strict=True):
            assert ours == pytest.approx(reference, rel=0.05)
        # The adapter state loads into a float32 base unchanged.
        full.load_state(half.state_dict())
        assert full.state_dict() == half.state_dict()
        assert all(t.dtype == torch.float32 for t in half.adapter_tensors().values())
    finally:
        half.close()
        full.close()


def test_a_joint_step_gives_each_client_the_update_it_gets_alone(
    tiny_model_dir: Path, corpus_sequences: list[list[int]]
) -> None:
    """Three clients' ForwardBackward calls in one forward/backward (each row through its
    own adapter): each client's clipped sum, outputs and next step equal its own call
    alone, so no client's clipped sum includes another client's row."""
    configs = [
        (LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), 0.05, 11),
        (LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), 0.5, 12),
        (LoraConfig(rank=2, alpha=4.0, target_modules=("k_proj", "o_proj")), 0.05, 13),
    ]
    base = SharedBase(tiny_model_dir)
    joint = [
        LoraTrainingEngine(
            base, lora=lora, dp=DpConfig(noise_multiplier=0.0, max_grad_norm=bound), seed=seed
        )
        for lora, bound, seed in configs
    ]
    alone = [
        LoraTrainingEngine(
            tiny_model_dir,
            lora=lora,
            dp=DpConfig(noise_multiplier=0.0, max_grad_norm=bound),
            seed=seed,
        )
        for lora, bound, seed in configs
    ]
    try:
        for engine in (*joint, *alone):
            _randomise(engine)
        for step in range(2):
            calls = []
            for index in range(3):
                # Different batch sizes and lengths per client.
                start = 12 * index + 6 * step
                batch, inputs = cross_entropy_batch(corpus_sequences[start : start + 2 + index])
                calls.append(ForwardBackwardCall(batch, "cross_entropy", inputs))
            results = forward_backward_jointly(list(zip(joint, calls, strict=True)))
            for engine, partner, call, result in zip(joint, alone, calls, results, strict=True):
                reference = partner.forward_backward(call.batch, call.loss_fn, call.loss_fn_inputs)
                assert [o.loss for o in result.outputs] == pytest.approx(
                    [o.loss for o in reference.outputs], rel=1e-5
                )
                assert engine.accumulated_examples == partner.accumulated_examples
                ours, theirs = engine.pending_gradient_sum(), partner.pending_gradient_sum()
                assert set(ours) == set(theirs)
                for name in ours:
                    torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
                assert any(bool(t.abs().sum() > 0) for t in ours.values())
            for engine, partner in zip(joint, alone, strict=True):
                engine.optim_step(ADAM)
                partner.optim_step(ADAM)
        for engine, partner in zip(joint, alone, strict=True):
            mine, theirs = engine.adapter_tensors(), partner.adapter_tensors()
            for name in mine:
                torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6)
        # After a joint call, a single call trains only its own adapter again.
        batch, inputs = cross_entropy_batch(corpus_sequences[40:42])
        joint[0].forward_backward(batch, "cross_entropy", inputs)
        alone[0].forward_backward(batch, "cross_entropy", inputs)
        for name, value in joint[0].pending_gradient_sum().items():
            torch.testing.assert_close(
                value, alone[0].pending_gradient_sum()[name], rtol=1e-5, atol=1e-7
            )
    finally:
        for engine in (*joint, *alone):
            engine.close()


def test_a_joint_step_refuses_what_it_cannot_do_exactly(tiny_model_dir: Path) -> None:
    base = SharedBase(tiny_model_dir)
    with_dropout = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=1)
    without_dropout = LoraTrainingEngine(base, lora=OTHER_LORA, dp=DP, seed=1)
    non_private = LoraTrainingEngine(base, lora=OTHER_LORA, dp=None, seed=1)
    other_base = LoraTrainingEngine(tiny_model_dir, lora=OTHER_LORA, dp=DP, seed=1)
    call = ForwardBackwardCall([[1, 2, 3]], "cross_entropy", [{"target_tokens": [2, 3, 4]}])
    try:
        with pytest.raises(ValueError, match="dropout"):
            forward_backward_jointly([(with_dropout, call)])
        with pytest.raises(ValueError, match="DP engines"):
            forward_backward_jointly([(non_private, call)])
        with pytest.raises(ValueError, match="share one base"):
            forward_backward_jointly([(without_dropout, call), (other_base, call)])
        with pytest.raises(ValueError, match="twice"):
            forward_backward_jointly([(without_dropout, call), (without_dropout, call)])
        assert without_dropout.accumulated_examples == 0
    finally:
        for engine in (with_dropout, without_dropout, non_private, other_base):
            engine.close()


def _randomise(engine: LoraTrainingEngine) -> None:
    """Non-zero factors (peft starts B at zero), seeded by parameter name only, so an
    engine and its reference start equal; set through the engine's own state."""
    tensors, metadata = decode_state(engine.state_dict())
    for index, name in enumerate(sorted(n for n in tensors if n.startswith("lora/"))):
        generator = torch.Generator().manual_seed(index)
        tensors[name] = torch.randn(tensors[name].shape, generator=generator) * 0.2
    del metadata["format"]
    engine.load_state(encode_state(tensors, metadata))

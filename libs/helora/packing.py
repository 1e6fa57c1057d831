"""Slot layouts of a :class:`~tensafe.helora.plan.Plan`, in plain numpy.

These functions say where every number sits in the CKKS slots. The client uses the
activation layouts to encode and to decode; the executor uses the weight layouts to
build its plaintexts. Keeping both in one module is what makes the client encode
exactly as the runtime evaluates.

Rotation convention (SEAL ``rotate_vector``): rotating a slot vector ``v`` by ``k`` gives
``w[i] = v[(i + k) mod S]``, i.e. ``numpy.roll(v, -k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tensafe.common.errors import InvalidArgument
from tensafe.helora.plan import Packing, Plan

FloatArray = npt.NDArray[np.float64]
SlotArray = npt.NDArray[np.float64] | npt.NDArray[np.complex128]


def check_activations(plan: Plan, activations: npt.ArrayLike) -> FloatArray:
    """Validate activations against a plan and return them as float64.

    Raises:
        InvalidArgument: Wrong shape, non-finite values, or a value beyond the plan's
            activation bound (which the runtime's fixed-point scales rely on).
    """
    array = np.asarray(activations, dtype=np.float64)
    expected = (plan.tokens, plan.hidden_size)
    if array.shape != expected:
        raise InvalidArgument("activations", f"shape {array.shape} != plan's {expected}")
    if not np.all(np.isfinite(array)):
        raise InvalidArgument("activations", "contains NaN or infinity")
    peak = float(np.max(np.abs(array))) if array.size else 0.0
    if peak > plan.activation_bound:
        raise InvalidArgument(
            "activations",
            f"max |x| = {peak:.6g} exceeds the plan's activation_bound "
            f"{plan.activation_bound:.6g}; compile the plan with a larger bound",
        )
    return array


def activation_slots(plan: Plan, activations: FloatArray) -> list[SlotArray]:
    """Return the slot vectors to encrypt, one per input ciphertext, in plan order.

    PER_TOKEN: unit j holds token j (or tokens 2j and 2j+1 as real and imaginary
    parts), zero-padded to the block length and tiled across all slots; with
    ``plan.input_copies`` = n1 > 1 (client-side baby steps) unit j is n1 consecutive
    ciphertexts, that vector rotated left by 0, 1, ..., n1 - 1 slots, which is exactly
    what the runtime's baby-step rotations would have made (the tiling makes a rotation
    of the slot vector a cyclic rotation within every block).
    BATCH_FIRST: ciphertext ``g * d + i`` holds feature i of token group g, tokens in
    slots (the second half of a complex group in the imaginary parts).
    """
    slots = plan.slot_count
    per_unit = plan.tokens_per_unit
    padded = np.zeros((plan.units * per_unit, plan.hidden_size), dtype=np.float64)
    padded[: plan.tokens] = activations
    if plan.packing is Packing.PER_TOKEN:
        block = np.zeros((padded.shape[0], plan.block_length), dtype=np.float64)
        block[:, : plan.hidden_size] = padded
        tiled = np.tile(block, (1, slots // plan.block_length))
        units: list[SlotArray] = (
            list(tiled[0::2] + 1j * tiled[1::2]) if plan.complex_packing else list(tiled)
        )
        return [np.roll(unit, -step) for unit in units for step in range(plan.input_copies)]
    vectors: list[SlotArray] = []
    for group in range(plan.units):
        rows = padded[group * per_unit : (group + 1) * per_unit]
        columns = rows[:slots].T + 1j * rows[slots:].T if plan.complex_packing else rows.T
        vectors.extend(np.ascontiguousarray(columns))
    return vectors


def output_values(plan: Plan, slot_vectors: Sequence[SlotArray]) -> FloatArray:
    """Unpack decoded result slot vectors into the delta, shape [tokens, d_out].

    Args:
        plan: The plan the results were computed with.
        slot_vectors: Decoded output ciphertexts in plan order (complex when the plan
            uses complex packing).
    """
    if len(slot_vectors) != plan.output_ciphertexts:
        raise InvalidArgument(
            "ciphertexts", f"{len(slot_vectors)} results, plan has {plan.output_ciphertexts}"
        )
    slots = plan.slot_count
    rows: list[FloatArray] = []
    if plan.packing is Packing.PER_TOKEN:
        for vector in slot_vectors:
            values = np.asarray(vector)[: plan.output_size]
            rows.append(np.real(values))
            if plan.complex_packing:
                rows.append(np.imag(values))
        return np.array(rows[: plan.tokens], dtype=np.float64)
    out = np.zeros((plan.units * plan.tokens_per_unit, plan.output_size), dtype=np.float64)
    for index, vector in enumerate(slot_vectors):
        group, feature = divmod(index, plan.output_size)
        base = group * plan.tokens_per_unit
        values = np.asarray(vector)
        out[base : base + slots, feature] = np.real(values)
        if plan.complex_packing:
            out[base + slots : base + 2 * slots, feature] = np.imag(values)
    return out[: plan.tokens]


def input_diagonals(plan: Plan, lora_a: FloatArray) -> list[list[FloatArray]]:
    """Return the PER_TOKEN x·A plaintext vectors, indexed ``[giant][baby]``.

    Extended diagonal k of the r x L matrix A^T (hybrid diagonal method) is
    ``D_k[i] = A[(i + k) mod L, i mod r]``, tiled across the slots. The vector for giant
    step g and baby step b is ``D_{g*n1 + b}`` rotated right by ``g * n1``, so that the
    giant-step rotation of the partial sum lines it up again.
    """
    _require_per_token(plan)
    return _bsgs_arrange(_input_matrix(plan, lora_a), plan.baby_steps, plan.giant_steps)


def _input_matrix(plan: Plan, lora_a: FloatArray) -> FloatArray:
    """The r extended diagonals of A^T tiled over every slot, shape [r, slots]."""
    block, rank = plan.block_length, plan.padded_rank
    padded = np.zeros((block, rank), dtype=np.float64)
    padded[: plan.hidden_size, : plan.rank] = lora_a
    index = np.arange(block)
    rows = (index[None, :] + np.arange(rank)[:, None]) % block
    return np.tile(padded[rows, index % rank], (1, plan.slot_count // block))


def shared_input_diagonals(
    plan: Plan, lora_as: Sequence[FloatArray], offsets: Sequence[int], output_sizes: Sequence[int]
) -> list[list[FloatArray]]:
    """x·A vectors of several layers on one input, layer l in its region of slots.

    Region l starts at ``offsets[l]`` and spans d_out_l + L - 1 slots
    (:func:`~tensafe.helora.plan.shared_input_offsets`); there the diagonals are layer
    l's, elsewhere zero.
    """
    _require_per_token(plan)
    diagonals = np.zeros((plan.padded_rank, plan.slot_count), dtype=np.float64)
    for lora_a, start, size in zip(lora_as, offsets, output_sizes, strict=True):
        end = start + size + plan.block_length - 1
        diagonals[:, start:end] = _input_matrix(plan, lora_a)[:, start:end]
    return _bsgs_arrange(diagonals, plan.baby_steps, plan.giant_steps)


def output_diagonals(plan: Plan, scaled_lora_b: FloatArray) -> list[list[FloatArray]]:
    """Return the PER_TOKEN u·B plaintext vectors, indexed ``[giant][baby]``.

    ``u = x·A`` arrives replicated with period r (slot i holds u[i mod r]), so
    ``P_k[i] = B[(i + k) mod r, i]`` for i < d_out (zero beyond) gives
    ``y[i] = sum_k P_k[i] * u[(i + k) mod r]``, arranged for the output BSGS split.

    Args:
        plan: A PER_TOKEN plan.
        scaled_lora_b: B already multiplied by alpha / rank, shape [r, d_out].
    """
    _require_per_token(plan)
    rank = plan.padded_rank
    padded = np.zeros((rank, plan.output_size), dtype=np.float64)
    padded[: plan.rank] = scaled_lora_b
    index = np.arange(plan.output_size)
    rows = (index[None, :] + np.arange(rank)[:, None]) % rank
    diagonals = np.zeros((rank, plan.slot_count), dtype=np.float64)
    diagonals[:, : plan.output_size] = padded[rows, index]
    return _bsgs_arrange(diagonals, plan.output_baby_steps, plan.output_giant_steps)


def shared_output_diagonals(
    plan: Plan, scaled_lora_bs: Sequence[FloatArray], offsets: Sequence[int]
) -> list[list[FloatArray]]:
    """u·B vectors of several layers on one input, layer l's outputs from ``offsets[l]``.

    Slot i of layer l's region holds u_l[i mod r] after the fold (i absolute), so
    ``P_k[i] = B_l[(i + k) mod r, i - offset_l]`` on its d_out_l output slots.
    """
    _require_per_token(plan)
    rank = plan.padded_rank
    diagonals = np.zeros((rank, plan.slot_count), dtype=np.float64)
    for scaled_b, start in zip(scaled_lora_bs, offsets, strict=True):
        size = scaled_b.shape[1]
        padded = np.zeros((rank, size), dtype=np.float64)
        padded[: plan.rank] = scaled_b
        index = np.arange(start, start + size)
        rows = (index[None, :] + np.arange(rank)[:, None]) % rank
        diagonals[:, start : start + size] = padded[rows, index - start]
    return _bsgs_arrange(diagonals, plan.output_baby_steps, plan.output_giant_steps)


def _bsgs_arrange(diagonals: FloatArray, baby: int, giants: int) -> list[list[FloatArray]]:
    return [
        [np.roll(diagonals[giant * baby + step], giant * baby) for step in range(baby)]
        for giant in range(giants)
    ]


def _require_per_token(plan: Plan) -> None:
    if plan.packing is not Packing.PER_TOKEN:
        raise InvalidArgument("plan.packing", "diagonals exist only for PER_TOKEN plans")


def reference_delta(
    activations: npt.ArrayLike, lora_a: npt.ArrayLike, lora_b: npt.ArrayLike, *, scaling: float
) -> FloatArray:
    """Return ``scaling * x @ A @ B`` in float64, the value HE-LoRA must reproduce."""
    x = np.asarray(activations, dtype=np.float64)
    return np.asarray(
        scaling * (x @ np.asarray(lora_a, dtype=np.float64)) @ np.asarray(lora_b, dtype=np.float64)
    )

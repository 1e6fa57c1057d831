"""PER_TOKEN rotations at one prime: what the precision budget allows (issue 19, round 4).

The CLIENT_BABY_STEPS plan (d = 4096, r = 16, N = 8192, compact parameters [60, 40 | 60])
makes 14 of its 17 rotations at two primes: x·A's 3 giant steps, the fold's 8 dependent
rotations and u·B's 3 baby steps, before the one rescale; only u·B's 3 giant steps run at
one prime. A key switch at one prime costs about half of one at two, so this bench
measures, in real SEAL on one core, the schedules that move rotations below the rescale
(rotation commutes with rescale), for a range of activation scales ``s``:

- ``2p-fold``: the current schedule (x·A giant steps, fold and u·B baby steps at two
  primes; the n1' copies rescaled one by one);
- ``1p-babies``: the same, but the fold result is rescaled once and u·B's baby steps run
  at one prime;
- ``1p-fold-k``: the first k fold steps at two primes, then one rescale and the rest of
  the fold and u·B at one prime;
- ``1p-all``: every giant partial of x·A rescaled, then all 17 rotations at one prime.

The budget every schedule shares: the last product (u·B, B in fixed point) is not
rescaled, so the first prime must hold 2^s · 2^b · max|delta| with the runtime's
worst-case overflow bound (activation bound 64, per-column L1 norms):
``s + b + log2(output_bound) <= q0 - 2``. A rotation at one prime adds key-switching noise
of ~2^14 units per slot (the one RNS digit is as large as the special prime), relative
error ~2^(14 - s) in u; B's fixed-point diagonals carry an encoding error of
~sqrt(N/12) = 2^4.7 units of 2^b. Raising s to quiet the first lowers b, and the
product of the two errors is fixed by the budget: this bench shows where the minimum is.

Per row: max |error| / max |delta| over 3 repetitions (LoRA-like weights, |x| ~ N(0, 2),
two tokens in one complex unit), the median CPU time of the evaluation, the rotations at
two and at one prime, the cost model's estimate (``CostModel`` defaults) and B's
fixed-point bits. The load average is printed (CPU time is what to compare on a shared
machine). The parameter set is checked against the 128-bit bound.

Usage: python bench/he_fold_one_prime.py [--shapes 4096:16,64:8] [--scales 23,25,27,29]
       [--l2-bound 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from typing import Any

import numpy as np
import seal

from tensafe.helora import (
    MAX_COEFF_MODULUS_BITS_128,
    Packing,
    compact_params,
    compile_plan,
    packing,
)
from tensafe.helora.ckks import CkksContext
from tensafe.helora.plan import CostModel, OpCounts, Plan, Variant

#: Schedule name -> (giant steps at two primes, fold steps at two primes, u·B baby steps
#: at two primes); fold steps None means all of them.
SCHEDULES: dict[str, tuple[bool, int | None, bool]] = {
    "2p-fold (current)": (True, None, True),
    "1p-babies": (True, None, False),
    "1p-fold-6": (True, 6, False),
    "1p-fold-4": (True, 4, False),
    "1p-all": (False, 0, False),
}


@dataclasses.dataclass
class Setup:
    plan: Plan
    context: CkksContext
    evaluator: Any
    encryptor: Any
    decryptor: Any
    keys: Any
    lora_a: np.ndarray
    scaled_b: np.ndarray
    x: np.ndarray
    expected: np.ndarray
    input_diagonals: list[list[Any]]
    output_bound: float


def setup(
    hidden: int, rank: int, alpha: float, rng: np.random.Generator, l2_bound: float | None
) -> Setup:
    params = compact_params()
    plan = compile_plan(
        hidden_size=hidden,
        output_size=hidden,
        rank=rank,
        alpha=alpha,
        tokens=2,
        params=params,
        packing=Packing.PER_TOKEN,
        variant=Variant.CLIENT_BABY_STEPS,
    )
    context = CkksContext(params)
    keygen = seal.KeyGenerator(context.seal_context)
    keys = seal.GaloisKeys()
    keygen.create_galois_keys(list(plan.rotation_steps), keys)
    bound = 1.0 / math.sqrt(hidden)
    lora_a = rng.uniform(-bound, bound, (hidden, rank))
    lora_b = rng.normal(0.0, 0.02, (rank, hidden))
    scaled_b = lora_b * plan.lora_scaling
    x = rng.normal(0.0, 2.0, (2, hidden)).clip(-64.0, 64.0)
    activation = plan.activation_bound * math.sqrt(2.0)
    if l2_bound is None:
        # The runtime's guarantee: |x_i| <= X in every coordinate, per-column L1 norms.
        inner = activation * np.sum(np.abs(lora_a), axis=0)
    else:
        # A hypothetical L2 activation bound ||x||_2 <= l2_bound (per token; sqrt(2) for
        # the complex pair): |u_j| <= ||x||_2 * ||A_j||_2 by Cauchy-Schwarz.
        inner = l2_bound * math.sqrt(2.0) * np.sqrt(np.sum(lora_a**2, axis=0))
    output_bound = float(np.max(inner @ np.abs(scaled_b)))
    evaluator = seal.Evaluator(context.seal_context)
    top = list(context.parms_id_for_primes(2))
    q1 = float(context.rescale_prime(2))
    diagonals = [
        [_plain(context, evaluator, vector, q1, top) for vector in row]
        for row in packing.input_diagonals(plan, lora_a)
    ]
    return Setup(
        plan=plan,
        context=context,
        evaluator=evaluator,
        encryptor=seal.Encryptor(context.seal_context, keygen.secret_key()),
        decryptor=seal.Decryptor(context.seal_context, keygen.secret_key()),
        keys=keys,
        lora_a=lora_a,
        scaled_b=scaled_b,
        x=x,
        expected=packing.reference_delta(x, lora_a, lora_b, scaling=plan.lora_scaling),
        input_diagonals=diagonals,
        output_bound=output_bound,
    )


def _plain(context: CkksContext, evaluator: Any, vector: Any, scale: float, level: Any) -> Any:
    plain = context.encoder.encode(np.ascontiguousarray(vector), scale)
    evaluator.mod_switch_to_inplace(plain, level)
    return plain


def counts_at(plan: Plan, schedule: tuple[bool, int | None, bool]) -> tuple[OpCounts, OpCounts]:
    """Operations at two primes and at one prime of one unit under ``schedule``."""
    giants_top, fold_top, babies_top = schedule
    fold = (plan.block_length // plan.padded_rank).bit_length() - 1
    fold_top = fold if fold_top is None else min(fold_top, fold)
    giant_rot, baby_rot = plan.giant_steps - 1, plan.output_baby_steps - 1
    out_giant_rot = plan.output_giant_steps - 1
    rescales = plan.output_baby_steps if babies_top else (1 if giants_top else plan.giant_steps)
    top_rot = (giant_rot if giants_top else 0) + fold_top + (baby_rot if babies_top else 0)
    all_rot = giant_rot + fold + baby_rot + out_giant_rot
    top = OpCounts(
        rotations=top_rot,
        key_switches=top_rot,
        multiply_plain=plan.padded_rank,
        additions=plan.padded_rank - 1 + (giant_rot if giants_top else 0) + fold_top,
        rescales=rescales,
    )
    bottom_rot = all_rot - top_rot
    bottom = OpCounts(
        rotations=bottom_rot,
        key_switches=bottom_rot,
        multiply_plain=plan.padded_rank,
        additions=plan.padded_rank - 1 + all_rot - top_rot,
    )
    return top, bottom


def run_once(
    setup_: Setup, schedule: tuple[bool, int | None, bool], s: int, b: int
) -> tuple[float, float]:
    plan, ev, keys = setup_.plan, setup_.evaluator, setup_.keys
    context = setup_.context
    giants_top, fold_top, babies_top = schedule
    fold = (plan.block_length // plan.padded_rank).bit_length() - 1
    fold_top = fold if fold_top is None else min(fold_top, fold)
    top = list(context.parms_id_for_primes(2))
    bottom = list(context.parms_id_for_primes(1))
    out_diagonals = [
        [_plain(context, ev, vector, 2.0**b, bottom) for vector in row]
        for row in packing.output_diagonals(plan, setup_.scaled_b)
    ]
    copies_in = []
    for vector in packing.activation_slots(plan, setup_.x):
        plain = context.encoder.encode_complex(np.ascontiguousarray(vector), 2.0**s)
        ev.mod_switch_to_inplace(plain, top)
        copies_in.append(setup_.encryptor.encrypt_symmetric(plain))
    started = time.process_time()
    inner = None
    for giant in range(plan.giant_steps):
        partial = None
        for baby in range(plan.baby_steps):
            product = ev.multiply_plain(copies_in[baby], setup_.input_diagonals[giant][baby])
            partial = product if partial is None else ev.add(partial, product)
        if not giants_top:
            ev.rescale_to_next_inplace(partial)
        if giant:
            partial = ev.rotate_vector(partial, giant * plan.baby_steps, keys)
        inner = partial if inner is None else ev.add(inner, partial)
    rescaled = not giants_top
    step, done = plan.padded_rank, 0
    while step < plan.block_length:
        if done == fold_top and not rescaled:
            ev.rescale_to_next_inplace(inner)
            rescaled = True
        ev.add_inplace(inner, ev.rotate_vector(inner, step, keys))
        step, done = step * 2, done + 1
    if babies_top:
        copies = [inner] + [
            ev.rotate_vector(inner, k, keys) for k in range(1, plan.output_baby_steps)
        ]
        for copy in copies:
            ev.rescale_to_next_inplace(copy)
    else:
        if not rescaled:
            ev.rescale_to_next_inplace(inner)
        copies = [inner] + [
            ev.rotate_vector(inner, k, keys) for k in range(1, plan.output_baby_steps)
        ]
    total = None
    for giant in range(plan.output_giant_steps):
        partial = None
        for baby in range(plan.output_baby_steps):
            product = ev.multiply_plain(copies[baby], out_diagonals[giant][baby])
            partial = product if partial is None else ev.add(partial, product)
        if giant:
            partial = ev.rotate_vector(partial, giant * plan.output_baby_steps, keys)
        total = partial if total is None else ev.add(total, partial)
    cpu_ms = (time.process_time() - started) * 1e3
    decoded = context.encoder.decode_complex(setup_.decryptor.decrypt(total))[: plan.output_size]
    got = np.stack([decoded.real, decoded.imag])
    error = float(np.max(np.abs(got - setup_.expected)) / np.max(np.abs(setup_.expected)))
    return error, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096:16,64:8", help="d:r pairs")
    parser.add_argument("--scales", default="23,25,27,29,31", help="activation scale bits")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument(
        "--l2-bound",
        type=float,
        default=None,
        help="size B's fixed point from a hypothetical L2 activation bound instead of the "
        "runtime's L-infinity bound 64 (what a client-checked norm bound would free)",
    )
    args = parser.parse_args()
    params = compact_params()
    degree = params.poly_modulus_degree
    sealed = seal.CoeffModulus.MaxBitCount(degree, seal.sec_level_type.tc128)
    print(
        f"parameters N = {degree}, primes {list(params.coeff_modulus_bits)}: "
        f"{params.total_bits} bits <= {MAX_COEFF_MODULUS_BITS_128[degree]} (HE standard) and "
        f"{sealed} (SEAL tc128): "
        f"{'128-bit secure' if params.total_bits <= sealed else 'INSECURE'}"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    model = CostModel()
    rng = np.random.default_rng(2024)
    headroom = params.data_prime_bits[0] - 2
    for shape in args.shapes.split(","):
        hidden, rank = (int(v) for v in shape.split(":"))
        case = setup(hidden, rank, 2.0 * rank, rng, args.l2_bound)
        print(
            f"\nd = {hidden}, r = {rank}: worst-case |delta| 2^{math.log2(case.output_bound):.1f} "
            + (
                f"(activation bound {case.plan.activation_bound:g})"
                if args.l2_bound is None
                else f"(hypothetical L2 activation bound {args.l2_bound:g} per token)"
            )
        )
        print(
            f"{'schedule':<19}{'s':>4}{'b':>4}{'B bits':>8}{'rot@2p':>8}{'rot@1p':>8}"
            f"{'model ms':>10}{'cpu ms':>9}{'max rel err':>13}"
        )
        for name, schedule in SCHEDULES.items():
            top, bottom = counts_at(case.plan, schedule)
            estimate = model.server_ms(top, poly_modulus_degree=degree, primes=2) + model.server_ms(
                bottom, poly_modulus_degree=degree, primes=1
            )
            for s in (int(v) for v in args.scales.split(",")):
                b = min(headroom - 2 - s, math.floor(headroom - s - math.log2(case.output_bound)))
                bits = b + math.log2(float(np.max(np.abs(case.scaled_b))))
                runs = [run_once(case, schedule, s, b) for _ in range(args.repetitions)]
                error = max(run[0] for run in runs)
                cpu = statistics.median(run[1] for run in runs)
                print(
                    f"{name:<19}{s:>4}{b:>4}{bits:>8.1f}{top.rotations:>8}{bottom.rotations:>8}"
                    f"{estimate:>10.1f}{cpu:>9.1f}{error:>13.2e}",
                    flush=True,
                )
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

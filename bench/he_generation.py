"""Greedy generation with HE-LoRA: ms per encrypted call, old (v1) plan vs current plan.

The demo's path end to end: a tiny Llama (hidden 64, 2 layers) runs in plaintext on
the client, a PEFT LoRA adapter (r = 8 on q/k/v/o, 8 adapted layers) is applied by a
real HE runtime (real SEAL, real gRPC, dev-mode adapter source) on CKKS-encrypted
activations through the SDK's ``HeLoraModel``. Each repetition generates the same
tokens twice, once per plan, interleaved:

- ``v1``: PER_TOKEN ``SERVER_BABY_STEPS``, the compiler-version-1 layout (the runtime
  rotates every baby and giant step, both products rescaled), streamed ``ApplyLora``,
  one core;
- ``current/old path``: the compiler's choice today (``CLIENT_BABY_STEPS``) over the
  path as it was before issue 19's item 4: streamed ``ApplyLora``, a runtime limited to
  one core (``evaluation_cores=1``);
- ``current/inline``: the same on one core, each call one ``ApplyLoraInline`` message
  each way (the SDK's choice for calls up to 2 MiB);
- ``current/inline+qkv``: inline on one core, and the layers that read one input (each
  block's q, k and v projections) in one request with one set of ciphertexts
  (``ApplyLoraHeader.more_layers``, issue 19 round 4), after the first forward pass;
- ``current/new path``: that on a runtime that uses every core (a peer process takes
  the independent half of each call's SEAL work).

A "call" is one adapted layer's delta for one forward pass (8 per token), whatever
number of requests carried it. Besides the round trip and the runtime's evaluation time
per call, the bench prints the CPU time of this process per call (the client's model,
encryption and decryption plus the runtime's serving thread; a peer process's CPU is not
in it) and the load average, since the machine is shared.

Each core count has its own runtime (same machine, same process), so the rows differ
only in plan, path and cores.

Usage: python bench/he_generation.py [--repetitions 3] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensafe.client.he import HeLoraModel, HeRuntimeRpc
from tensafe.helora import Packing, default_params
from tensafe.helora.plan import OpCounts, Variant

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from he_runtime.conftest import (
    ADAPTER,
    ALPHA,
    RANK,
    TARGET_MODULES,
    Runtime,
    runtime_config,
)

from testkit.models import BASE_MODEL, build_tiny_llama, one_torch_thread

PROMPT = "The river ran past the old"
#: name -> (forced variant, runtime cores, streamed, layers sharing an input in one
#: request); 0 cores = one per core.
PLANS: dict[str, tuple[Variant | None, int, bool, bool]] = {
    "v1": (Variant.SERVER_BABY_STEPS, 1, True, False),
    "current/old path": (None, 1, True, False),
    "current/inline": (None, 1, False, False),
    "current/inline+qkv": (None, 1, False, True),
    "current/new path": (None, 0, False, True),
}


class StreamedRpc(HeRuntimeRpc):
    """The SDK's RPCs with every ApplyLora streamed (the path before ApplyLoraInline)."""

    def apply_lora(
        self, session_id: str, layer: str, ciphertexts: Any, *, inline: Any = None, **kwargs: Any
    ) -> Any:
        return self.apply_lora_streamed(session_id, layer, ciphertexts, **kwargs)


def greedy(model: Any, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(token) for token in output[0, input_ids.shape[1] :]]


@dataclasses.dataclass
class Measured:
    """One generation: its tokens and the SDK's summed per-layer statistics."""

    tokens: list[int]
    calls: int
    grouped: int
    counts: OpCounts
    round_trip_ms: float
    server_ms: float
    cpu_ms: float


def measure(model: HeLoraModel, input_ids: torch.Tensor, new_tokens: int) -> Measured:
    model.session.stats.clear()
    started = time.process_time()
    tokens = greedy(model.model, input_ids, new_tokens)
    used = (time.process_time() - started) * 1e3
    stats = model.session.stats.values()
    return Measured(
        tokens=tokens,
        calls=sum(s.calls for s in stats),
        grouped=sum(s.grouped_calls for s in stats),
        counts=sum((s.counts for s in stats), OpCounts()),
        round_trip_ms=sum(s.round_trip_ms for s in stats),
        server_ms=sum(s.server_ms for s in stats),
        cpu_ms=used,
    )


def make_adapter(base_dir: Path, data_dir: Path) -> None:
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    peft_model.save_pretrained(data_dir / "adapters" / ADAPTER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="he-generation-") as scratch, one_torch_thread():
        root = Path(scratch)
        base_dir = build_tiny_llama(root / BASE_MODEL)
        data_dir = root / "data"
        make_adapter(base_dir, data_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        lora = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), data_dir / "adapters" / ADAPTER
        ).eval()
        expected = greedy(lora, input_ids, args.new_tokens)
        runtimes: dict[int, Runtime] = {}
        try:
            for cores in sorted({cores for _, cores, _, _ in PLANS.values()}):
                folder = root / f"runtime-{cores}"
                shutil.copytree(data_dir, folder)
                runtimes[cores] = Runtime(
                    runtime_config(folder, max_sessions_per_tenant=4, evaluation_cores=cores)
                )
            run(runtimes, base_dir, input_ids, expected, args)
        finally:
            for runtime in runtimes.values():
                runtime.stop()


def run(
    runtimes: dict[int, Runtime],
    base_dir: Path,
    input_ids: torch.Tensor,
    expected: list[int],
    args: argparse.Namespace,
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    models: dict[str, HeLoraModel] = {}
    for name, (variant, cores, streamed, share_inputs) in PLANS.items():
        runtime = runtimes[cores]
        rpc = StreamedRpc(runtime.channel(tenant)) if streamed else runtime.rpc(tenant)
        models[name] = HeLoraModel.create(
            AutoModelForCausalLM.from_pretrained(base_dir).eval(),
            rpc,
            adapter_name=ADAPTER,
            rank=RANK,
            alpha=ALPHA,
            target_modules=TARGET_MODULES,
            packing=Packing.PER_TOKEN,
            variant=variant,
            # v1 needs three data primes; the current plan runs on the SDK's default.
            params=default_params() if variant is Variant.SERVER_BABY_STEPS else None,
            share_inputs=share_inputs,
        )
    round_trip: dict[str, list[float]] = {name: [] for name in PLANS}
    server: dict[str, list[float]] = {name: [] for name in PLANS}
    identical: dict[str, bool] = dict.fromkeys(PLANS, True)
    cpu: dict[str, list[float]] = {name: [] for name in PLANS}
    decode: dict[str, list[float]] = {name: [] for name in PLANS}
    decode_server: dict[str, list[float]] = {name: [] for name in PLANS}
    decode_cpu: dict[str, list[float]] = {name: [] for name in PLANS}
    decode_calls: dict[str, int] = {}
    calls: dict[str, int] = {}
    grouped: dict[str, int] = {}
    counts: dict[str, OpCounts] = {}
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    try:
        for repetition in range(args.repetitions):
            names = list(PLANS)
            shift = repetition % len(names)
            order = names[shift:] + names[:shift]
            for name in order:
                model = models[name]
                # The prompt alone (one forward pass, its calls carry all 14 tokens),
                # then the whole generation: the difference is the decoding steps'.
                prefill = measure(model, input_ids, 1)
                whole = measure(model, input_ids, args.new_tokens)
                identical[name] = identical[name] and whole.tokens == expected
                calls[name], grouped[name] = whole.calls, whole.grouped
                counts[name] = whole.counts
                cpu[name].append(whole.cpu_ms / whole.calls)
                round_trip[name].append(whole.round_trip_ms / whole.calls)
                server[name].append(whole.server_ms / whole.calls)
                steps = whole.calls - prefill.calls
                decode_calls[name] = steps
                decode[name].append((whole.round_trip_ms - prefill.round_trip_ms) / steps)
                decode_server[name].append((whole.server_ms - prefill.server_ms) / steps)
                decode_cpu[name].append((whole.cpu_ms - prefill.cpu_ms) / steps)
                print(
                    f"  rep {repetition + 1} {name:8} {round_trip[name][-1]:7.1f} ms/call, "
                    f"decoding {decode[name][-1]:7.1f} ms/call",
                    flush=True,
                )
    finally:
        for model in models.values():
            model.close()
    print()
    print(
        f"Greedy generation, tiny Llama (d = 64, 8 adapted layers, r = {RANK}), prompt "
        f"{input_ids.shape[1]} tokens + {args.new_tokens} new; medians of {args.repetitions} "
        "interleaved repetitions (2 cores shared with other jobs: noisy)"
    )
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = (
        f"{'plan':46} {'identical':>9} {'calls':>5} {'grouped':>7} {'ms/call':>8} "
        f"{'server ms/call':>14} {'cpu ms/call':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in PLANS:
        plan = models[name].session.plan
        label = f"{name} ({plan.variant.value})"
        print(
            f"{label:46} {identical[name]!s:>9} {calls[name]:>5} {grouped[name]:>7} "
            f"{statistics.median(round_trip[name]):>8.1f} "
            f"{statistics.median(server[name]):>14.1f} {statistics.median(cpu[name]):>11.1f}"
        )
    for name in PLANS:
        per_call = counts[name]
        print(
            f"  {name:8} ops per call: {per_call.rotations / calls[name]:.1f} rotations, "
            f"{per_call.multiply_plain / calls[name]:.1f} multiply_plain, "
            f"{per_call.rescales / calls[name]:.1f} rescales"
        )
    print(
        f"Decoding steps only (whole generation minus the prompt's forward pass; "
        f"{max(decode_calls.values())} calls, one token each):"
    )
    print(f"  {'plan':44} {'ms/call':>8} {'server ms/call':>14} {'cpu ms/call':>11}")
    for name in PLANS:
        print(
            f"  {name:44} {statistics.median(decode[name]):>8.1f} "
            f"{statistics.median(decode_server[name]):>14.1f} "
            f"{statistics.median(decode_cpu[name]):>11.1f}"
        )
    for label, table in (("all calls", round_trip), ("decoding steps", decode)):
        best = statistics.median(table["current/new path"])
        for old in ("v1", "current/old path", "current/inline"):
            ratio = statistics.median(table[old]) / best
            verdict = "met" if ratio >= 2 else "MISSED"
            print(
                f"Target ({label}): current/new path >= 2x fewer ms per encrypted call than "
                f"{old} (same run): {ratio:.2f}x -> {verdict}"
            )
    overhead = {
        name: statistics.median(round_trip[name]) - statistics.median(server[name])
        for name in PLANS
    }
    print(
        "Per-call overhead (round trip - server evaluation: encrypt, framing, gRPC, session "
        "lookup, decrypt): "
        + ", ".join(f"{name} {value:.1f} ms" for name, value in overhead.items())
    )


if __name__ == "__main__":
    main()

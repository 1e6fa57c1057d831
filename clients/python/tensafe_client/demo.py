"""``tensafe demo``: the whole product once, against a running ``tensafe up``.

The task is one whose learning a reader sees in text: the base model answers sums the
way its public pretraining text does (``Question: what is 12 + 30? Answer: 42.``, the
number itself mostly wrong: the model has 160 k parameters); the private fine-tuning
data answers in a style the base model never writes (``Answer: The sum is 42.``).
After DP fine-tuning the adapted model answers in that style.

1. Use the stack's built-in pretrained base model (``tensafe up`` installs it into a
   fresh data dir; installed here if it is missing).
2. As the platform admin, create a tenant with a trainer principal and an API key;
   everything after this runs as that tenant's trainer, not as the admin.
3. Ask the base model the demo's questions.
4. As the tenant, DP fine-tune a LoRA adapter through the Tinker-compatible SDK at a
   stated target ε (live progress bar with loss and ε; a metrics file).
5. ``save_adapter``: the trainer seals the adapter into a signed, encrypted TGSP package
   carrying the DP certificate from its privacy ledger and publishes it to the registry.
6. Download the package and verify it with ``tensafe registry verify``, no decryption.
7. Ask the adapted model (the package opened locally into peft) the same questions and
   print base and adapted answers side by side.
8. Answer the first question again with HE-LoRA: the base model runs here in plaintext
   and every adapted layer's LoRA delta is computed by the HE runtime on CKKS-encrypted
   activations; print it beside the plaintext-adapted answer.
9. Print the adapter's DP certificate, draw loss and ε against steps (``[plot]`` extra),
   and a one-screen summary.

Exit code 0 when the adapted answers differ from the base model's and the HE-LoRA
answer equals the plaintext-adapted one, 1 when either fails, 2 when a step fails (the
message says which).

Heavy imports (torch, transformers, peft, SEAL) happen inside :func:`run_demo`, so the
``tensafe`` CLI loads without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tensafe.client.auth import TokenProvider, authenticated_channel
from tensafe.client.connection import load_connection
from tensafe.client.tenants import TenantCredentials, create_tenant_with_trainer
from tensafe.common.errors import IntegrityError, TenSafeError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tensafe import tgsp
    from tensafe.tinker import types

__all__ = ["BASE_MODEL", "DemoResult", "TenantCredentials", "create_tenant", "run_demo"]

BASE_MODEL = "tiny-llama"
"""The demo's base model: the stack's built-in pretrained tiny model."""

QUESTIONS = ((12, 30), (7, 58), (41, 26))
"""The sums the demo asks (none is in the fine-tuning data)."""

ANSWER_STYLE = "The sum is {s}."
"""How the private data answers (the base model answers ``{s}.``)."""

DATASET_SIZE = 512
"""Texts in the private fine-tuning set."""


def question(a: int, b: int) -> str:
    """A prompt in the format of the public pretraining text."""
    return f"Question: what is {a} + {b}? Answer:"


def private_dataset(count: int = DATASET_SIZE, *, seed: int = 7) -> list[tuple[str, str]]:
    """The private fine-tuning set: (question, answer) pairs, the answer in the new style.

    Args:
        count: Distinct pairs to make (at most the number of sums of two numbers in
            0..99 that the demo does not ask).
        seed: Seeds the choice of sums.
    """
    asked = set(QUESTIONS)
    pairs = [(a, b) for a in range(100) for b in range(100) if (a, b) not in asked]
    random.Random(seed).shuffle(pairs)
    return [(question(a, b), " " + ANSWER_STYLE.format(s=a + b)) for a, b in pairs[:count]]


def answer_datum(prompt: Sequence[int], answer: Sequence[int]) -> types.Datum:
    """A ``cross_entropy`` datum that learns the answer only (the prompt has weight 0).

    Training on completions is what makes the adapter change the *answer*; the prompt
    tokens are the base model's public text already.
    """
    from tensafe.tinker import types

    tokens = [*prompt, *answer]
    targets = tokens[1:]
    weights = [0.0 if i + 1 < len(prompt) else 1.0 for i in range(len(targets))]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


@dataclasses.dataclass
class DemoResult:
    """What the demo measured (also what its test checks).

    Attributes:
        tenant_id: The demo tenant.
        principal_id: Its trainer principal (the identity that trained).
        target_epsilon: The ε the run was planned for.
        steps: DP steps taken.
        losses: Mean NLL per step.
        epsilons: Epsilon after each step.
        adapter_name: Registry adapter name.
        version: Registry version.
        package_sha256: SHA-256 of the package.
        manifest: The verified manifest.
        prompts: The questions asked.
        base_answers: The base model's greedy answers.
        adapted_answers: The plaintext-LoRA answers.
        plaintext_tokens: Greedy tokens with plaintext LoRA (first prompt).
        he_tokens: Greedy tokens with HE-LoRA (first prompt).
        base_tokens: Greedy tokens of the base model alone (first prompt).
        plaintext_text: Decoded plaintext-LoRA answer (first prompt).
        he_text: Decoded HE-LoRA answer (first prompt).
        he_max_error: Largest absolute error of an HE delta against the plaintext delta.
        timings: Seconds per phase.
        package_path: Where the downloaded package was saved.
        metrics_path: The per-step metrics (JSON lines).
        plot_path: The loss and ε plot, if matplotlib is installed.
    """

    tenant_id: str = ""
    principal_id: str = ""
    target_epsilon: float = 0.0
    steps: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    epsilons: list[float] = dataclasses.field(default_factory=list)
    adapter_name: str = ""
    version: int = 0
    package_sha256: str = ""
    manifest: tgsp.Manifest | None = None
    prompts: list[str] = dataclasses.field(default_factory=list)
    base_answers: list[str] = dataclasses.field(default_factory=list)
    adapted_answers: list[str] = dataclasses.field(default_factory=list)
    plaintext_tokens: list[int] = dataclasses.field(default_factory=list)
    he_tokens: list[int] = dataclasses.field(default_factory=list)
    base_tokens: list[int] = dataclasses.field(default_factory=list)
    plaintext_text: str = ""
    he_text: str = ""
    he_max_error: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    package_path: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None

    @property
    def learned(self) -> bool:
        """The adapter changed what the model writes."""
        return self.adapted_answers != self.base_answers

    @property
    def he_matches(self) -> bool:
        """HE-LoRA generated exactly the plaintext-LoRA tokens."""
        return bool(self.he_tokens) and self.he_tokens == self.plaintext_tokens


@contextmanager
def _phase(result: DemoResult, name: str, out: TextIO) -> Iterator[None]:
    print(f"\n== {name} ==", file=out)
    out.flush()
    started = time.perf_counter()
    yield
    result.timings[name] = time.perf_counter() - started


def create_tenant(connection_file: Path | None, *, name: str) -> TenantCredentials:
    """Create a tenant, a trainer principal in it and an API key (as the platform admin).

    The admin's API key is the one ``tensafe up`` put into the connection file.

    Raises:
        TenSafeError: The auth service refused a call.
    """
    from tensafe.client.auth import find_api_key
    from tensafe.proto.auth.v1 import auth_service_pb2_grpc

    connection = load_connection(connection_file)
    admin_key = find_api_key(connection_file=connection.path)
    with connection.channel("auth") as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(
            authenticated_channel(channel, TokenProvider(channel, admin_key))
        )
        return create_tenant_with_trainer(
            stub, name, trainer_name=f"{name}-trainer", description="demo"
        )


def _greedy(model: Any, input_ids: torch.Tensor, new_tokens: int, eos: int) -> list[int]:
    """Greedy tokens after the prompt, up to and without the end-of-sequence token."""
    import torch

    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
    tokens = [int(token) for token in output[0, input_ids.shape[1] :]]
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _lora_deltas(opened: tgsp.OpenedAdapter) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per adapted module: A (r x d), B (d_out x r) in float64 and alpha / r."""
    import numpy as np

    lora = opened.manifest.lora
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in opened.numpy_tensors().items():
        module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        parts.setdefault(module, {})[rest[0]] = np.asarray(tensor, dtype=np.float64)
    return {m: (p["A"], p["B"], lora.alpha / lora.rank) for m, p in parts.items()}


def run_demo(
    *,
    connection_file: Path | None,
    steps: int,
    batch_size: int,
    target_epsilon: float,
    learning_rate: float,
    new_tokens: int,
    out: TextIO,
    progress_stream: TextIO,
) -> DemoResult:
    """Run the demo (see the module docstring) and return what it measured.

    Raises:
        TenSafeError: A service refused a step; the message says why.
    """
    import numpy as np
    import torch
    from peft import PeftModel
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensafe import tgsp
    from tensafe.client.base_models import ensure_builtin_base_model
    from tensafe.client.he import HeLoraModel, open_he_runtime
    from tensafe.client.progress import TrainingProgress
    from tensafe.client.registry import RegistryClient
    from tensafe.client.train_cli import Batches, describe_privacy, train
    from tensafe.tinker import ServiceClient, types

    result = DemoResult(target_epsilon=target_epsilon)
    connection = load_connection(connection_file)
    described = json.loads(connection.path.read_text())
    data_dir = Path(str(described["data_dir"]))
    models_dir = Path(str(described["base_models_dir"]))
    with _phase(result, "base model", out):
        model_dir, installed = ensure_builtin_base_model(models_dir, BASE_MODEL)
        how = "installed now" if installed else "installed by tensafe up"
        print(f"{BASE_MODEL}: {model_dir} (the built-in pretrained tiny model, {how})", file=out)
        hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eos = int(hf_tokenizer.eos_token_id)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # type: ignore[no-untyped-call]
        result.prompts = [question(a, b) for a, b in QUESTIONS]
        prompt_ids = [hf_tokenizer(p, return_tensors="pt").input_ids for p in result.prompts]
        base_tokens = [_greedy(base, ids, new_tokens, eos) for ids in prompt_ids]
        result.base_tokens = base_tokens[0]
        result.base_answers = [str(hf_tokenizer.decode(t)) for t in base_tokens]
    with _phase(result, "tenant", out):
        tenant = create_tenant(connection.path, name=f"demo-{uuid.uuid4().hex[:8]}")
        result.tenant_id, result.principal_id = tenant.tenant_id, tenant.principal_id
        print(
            f"created tenant {tenant.tenant_id} with trainer principal {tenant.principal_id} "
            "and an API key for it (as the platform admin); everything below runs with "
            "that trainer's key, not the admin's",
            file=out,
        )

    pairs = private_dataset()
    result.metrics_path = data_dir / "demo" / "metrics.jsonl"
    with (
        _phase(result, "DP-SGD fine-tuning", out),
        ServiceClient(api_key=tenant.api_key, connection_file=connection.path) as service,
    ):
        client = service.create_lora_training_client(
            base_model=BASE_MODEL,
            rank=8,
            target_epsilon=target_epsilon,
            planned_steps=steps,
        )
        encode = client.get_tokenizer().encode
        # The answer's tokens follow the prompt's (no BOS), then the end of sequence, so
        # the adapted model stops after its answer as the base model does.
        datums = [
            answer_datum(encode(prompt), [*encode(answer, add_special_tokens=False), eos])
            for prompt, answer in pairs
        ]
        print(
            f"private data: {len(datums)} sums answered in a new style, e.g. "
            f"{pairs[0][0] + pairs[0][1]!r} (the loss counts the answer tokens)\n"
            f"training client {client.model_id}: DP-SGD at target ε = {target_epsilon:g} "
            f"(δ = 1e-5) over {steps} steps of {batch_size} texts",
            file=out,
        )
        with TrainingProgress(
            steps, stream=progress_stream, metrics_file=result.metrics_path
        ) as progress:
            records = train(
                client,
                datums,
                steps=steps,
                batches=Batches(size=batch_size, count=len(datums), rng=random.Random(0)),
                adam_params=types.AdamParams(learning_rate=learning_rate),
                out=out,
                progress=progress,
            )
        result.steps = len(records)
        result.losses = [r.loss for r in records]
        result.epsilons = [r.epsilon for r in records]
        print(describe_privacy(client.get_privacy_spent()), file=out)
        result.adapter_name = f"demo-adapter-{uuid.uuid4().hex[:6]}"
        saved = client.save_adapter(result.adapter_name).result()
        result.version, result.package_sha256 = saved.version, saved.package_sha256
        print(
            f"published {saved.adapter_name} version {saved.version} "
            f"(sha256 {saved.package_sha256})",
            file=out,
        )

    with RegistryClient.connect(
        connection_file=connection.path, api_key=tenant.api_key
    ) as registry:
        with _phase(result, "verify the TGSP package", out):
            package_path = data_dir / "packages" / f"{result.adapter_name}-v{result.version}.tgsp"
            result.package_path = package_path
            registry.download(result.adapter_name, version=result.version, destination=package_path)
            keys = registry.signing_keys()
            manifest = tgsp.verify(
                package_path, trusted_keys=keys, expected_tenant=tenant.tenant_id
            )
            result.manifest = manifest
            print(f"{package_path}: {package_path.stat().st_size} bytes", file=out)
            # The same check with the CLI a third party would run.
            verified = subprocess.run(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "tensafe.client.cli",
                    "registry",
                    "verify",
                    str(package_path),
                    "--tenant",
                    tenant.tenant_id,
                    "--connection-file",
                    str(connection.path),
                ],
                env={**os.environ, "TENSAFE_API_KEY": tenant.api_key},
                capture_output=True,
                text=True,
                check=False,
            )
            print(f"$ tensafe registry verify {package_path.name} --tenant ...", file=out)
            print((verified.stdout + verified.stderr).strip(), file=out)
            if verified.returncode != 0:
                raise IntegrityError(f"tensafe registry verify failed: {verified.stderr}")
        with _phase(result, "base vs adapted (plaintext LoRA)", out):
            opened = registry.open(result.adapter_name, version=result.version)
            with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as adapter_dir:
                tgsp.write_peft_dir(opened, Path(adapter_dir) / "adapter")
                lora_model = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(model_dir),
                    str(Path(adapter_dir) / "adapter"),
                ).eval()
            adapted_tokens = [_greedy(lora_model, ids, new_tokens, eos) for ids in prompt_ids]
            result.plaintext_tokens = adapted_tokens[0]
            result.adapted_answers = [str(hf_tokenizer.decode(t)) for t in adapted_tokens]
            result.plaintext_text = result.adapted_answers[0]
            _print_side_by_side(result, out)

    with _phase(result, "HE-LoRA on encrypted activations", out):
        deltas = _lora_deltas(opened)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # type: ignore[no-untyped-call]
        rpc = open_he_runtime(api_key=tenant.api_key, connection_file=connection.path)
        he_model = HeLoraModel.create(
            model,
            rpc,
            adapter_name=result.adapter_name,
            adapter_version=result.version,
            rank=manifest.lora.rank,
            alpha=manifest.lora.alpha,
            target_modules=manifest.lora.target_modules,
        )
        max_error = 0.0

        def observe(layer: str) -> Any:
            lora_a, lora_b, scale = deltas[layer]

            def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
                nonlocal max_error
                x = inputs[0].detach().to(torch.float64).reshape(-1, module.in_features)
                base_out = x @ module.weight.detach().to(torch.float64).T
                he_delta = output.detach().to(torch.float64).reshape(base_out.shape) - base_out
                expected = scale * (x.numpy() @ lora_a.T @ lora_b.T)
                max_error = max(max_error, float(np.max(np.abs(he_delta.numpy() - expected))))

            return hook

        handles = [
            model.get_submodule(layer).register_forward_hook(observe(layer))
            for layer in he_model.session.layers
        ]
        try:
            result.he_tokens = _greedy(he_model.model, prompt_ids[0], new_tokens, eos)
        finally:
            for handle in handles:
                handle.remove()
            he_model.close()
            rpc.close()
        result.he_max_error = max_error
        result.he_text = str(hf_tokenizer.decode(result.he_tokens))
        calls = sum(s.calls for s in he_model.session.stats.values())
        server_ms = sum(s.server_ms for s in he_model.session.stats.values())
        print(f"prompt          : {result.prompts[0]!r}", file=out)
        print(f"plaintext LoRA  : {result.plaintext_text!r}", file=out)
        print(f"HE-LoRA (CKKS)  : {result.he_text!r}", file=out)
        print(
            f"identical tokens: {'yes' if result.he_matches else 'NO'} "
            f"({len(he_model.session.layers)} adapted layers, {calls} encrypted ApplyLora "
            f"calls, {server_ms / max(calls, 1):.1f} ms runtime time per call)",
            file=out,
        )
    result.plot_path = _plot(result, data_dir / "demo" / "run.png", out)
    _print_report(result, out)
    return result


def _print_side_by_side(result: DemoResult, out: TextIO) -> None:
    width = max(len(p) for p in result.prompts)
    column = max(len(repr(a)) for a in [*result.base_answers, "base model"])
    print(f"{'prompt':<{width}}  {'base model':<{column}}  adapted (DP LoRA)", file=out)
    for prompt, base, adapted in zip(
        result.prompts, result.base_answers, result.adapted_answers, strict=True
    ):
        print(f"{prompt:<{width}}  {base!r:<{column}}  {adapted!r}", file=out)
    verdict = (
        "the adapter changed what the model writes"
        if result.learned
        else "the adapter did NOT change what the model writes"
    )
    print(verdict, file=out)


def _plot(result: DemoResult, path: Path, out: TextIO) -> Path | None:
    """Draw the run's loss and ε; say so and go on if matplotlib is not installed."""
    from tensafe.client.extras import MissingExtra
    from tensafe.client.plot_cli import plot_metrics, read_metrics

    assert result.metrics_path is not None
    try:
        plot_metrics(
            read_metrics(result.metrics_path),
            path,
            title=f"tensafe demo: DP-SGD at target ε = {result.target_epsilon:g}",
        )
    except MissingExtra as error:
        print(f"\nplot not drawn: {error.message}", file=out)
        return None
    print(f"\nplot of loss and ε against steps: {path}", file=out)
    return path


def _certificate_lines(manifest: tgsp.Manifest) -> list[str]:
    from tensafe import tgsp

    certificate = manifest.dp_certificate
    if isinstance(certificate, tgsp.NoDPGuarantee):
        return [f"no DP guarantee: {certificate.reason}"]
    sampling = (
        f"Poisson, q = {certificate.sampling.rate:g}"
        if isinstance(certificate.sampling, tgsp.PoissonSampling)
        else "client batches (no amplification)"
    )
    lines = [
        f"(ε, δ) = ({certificate.epsilon:.4f}, {certificate.delta:g}) per example, "
        f"{certificate.accountant} accountant",
        f"σ = {certificate.noise_multiplier:.4f}, C = {certificate.max_grad_norm:g}, "
        f"{certificate.steps} steps, sampling: {sampling}",
    ]
    lines += [f"assumes: {text}" for text in certificate.assumptions]
    return lines


def _print_report(result: DemoResult, out: TextIO) -> None:
    assert result.manifest is not None
    manifest = result.manifest
    width = 78
    print("\n" + "=" * width, file=out)
    print("DP certificate (from the signed manifest):", file=out)
    for line in _certificate_lines(manifest):
        print(f"  {line}", file=out)
    provenance = manifest.provenance
    print(
        f"  tenant {provenance.tenant_id}, training client {provenance.training_client_id}, "
        f"{provenance.code_version}",
        file=out,
    )
    print("-" * width, file=out)
    certificate = manifest.dp_certificate
    epsilon = getattr(certificate, "epsilon", math.inf)
    delta = getattr(certificate, "delta", 0.0)
    print("summary", file=out)
    print(
        f"  trained as tenant {result.tenant_id}'s trainer {result.principal_id} "
        "(not the platform admin)",
        file=out,
    )
    print(
        f"  ε = {epsilon:.4f} at δ = {delta:g} after {result.steps} DP steps "
        f"(target {result.target_epsilon:g})",
        file=out,
    )
    print(
        f"  loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
        if result.losses
        else "  no steps",
        file=out,
    )
    print(
        f"  base {result.base_answers[0]!r} → adapted {result.adapted_answers[0]!r}; "
        f"HE-LoRA {'equal' if result.he_matches else 'DIFFERENT'}",
        file=out,
    )
    print(f"  package {result.adapter_name} v{result.version}", file=out)
    print(f"  sha256  {result.package_sha256}", file=out)
    print(f"  HE max |error| of a LoRA delta: {result.he_max_error:.2e}", file=out)
    if result.plot_path is not None:
        print(f"  plot   {result.plot_path}", file=out)
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
    print(f"  timings: {timings}", file=out)
    print(f"  total  : {sum(result.timings.values()):.1f}s", file=out)
    print("=" * width, file=out)


DEFAULTS = {"steps": 16, "batch_size": 256, "target_epsilon": 8.0, "learning_rate": 3e-2}
"""The demo's defaults (docs/sdk.md states the same)."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``tensafe`` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="the end-to-end demo against a running tensafe up (needs [trainer,he])",
        description="DP fine-tunes a LoRA adapter that makes the built-in tiny model answer "
        "sums in a new style, publishes it as a signed TGSP package, and shows base vs adapted "
        "answers, the HE-LoRA answer and the DP certificate.",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULTS["steps"], help="DP steps (default %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        help="texts per step (default %(default)s)",
    )
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=DEFAULTS["target_epsilon"],
        help="ε over --steps (default %(default)s)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=DEFAULTS["learning_rate"],
        help="Adam lr (default %(default)s)",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=12, help="tokens to generate (default %(default)s)"
    )
    parser.add_argument("--connection-file", help="default: .tensafe/connection.json")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON here")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``tensafe demo``."""
    try:
        result = run_demo(
            connection_file=Path(args.connection_file) if args.connection_file else None,
            steps=args.steps,
            batch_size=args.batch_size,
            target_epsilon=args.target_epsilon,
            learning_rate=args.learning_rate,
            new_tokens=args.new_tokens,
            out=sys.stdout,
            progress_stream=sys.stderr,
        )
    except (TenSafeError, FileNotFoundError) as error:
        print(f"tensafe demo: {error}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "tenant_id": result.tenant_id,
                    "principal_id": result.principal_id,
                    "target_epsilon": result.target_epsilon,
                    "steps": result.steps,
                    "epsilons": result.epsilons,
                    "losses": result.losses,
                    "adapter_name": result.adapter_name,
                    "version": result.version,
                    "package_sha256": result.package_sha256,
                    "package_path": str(result.package_path),
                    "prompts": result.prompts,
                    "base_answers": result.base_answers,
                    "adapted_answers": result.adapted_answers,
                    "plaintext_text": result.plaintext_text,
                    "he_text": result.he_text,
                    "he_matches": result.he_matches,
                    "learned": result.learned,
                    "he_max_error": result.he_max_error,
                    "metrics_path": str(result.metrics_path),
                    "plot_path": str(result.plot_path) if result.plot_path else None,
                    "timings": result.timings,
                },
                indent=2,
            )
        )
    return 0 if result.he_matches and result.learned else 1

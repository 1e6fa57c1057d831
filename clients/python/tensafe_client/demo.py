"""``tensafe demo``: the whole product once, against a running ``tensafe up``.

1. Build the tiny base model (no weights can be downloaded here) unless it exists.
2. As the platform admin, create a tenant with a trainer principal and an API key.
3. As that tenant, DP fine-tune a LoRA adapter through the Tinker-compatible SDK (loss
   and epsilon per step, with a progress bar).
4. ``save_adapter``: the trainer seals the adapter into a signed, encrypted TGSP package
   carrying the DP certificate from its privacy ledger and publishes it to the registry.
5. Download the package and verify it against the registry's published signing keys
   (what ``tensafe registry verify`` does), with no decryption.
6. Generate text twice from the same prompt: plaintext LoRA (the package opened locally
   and loaded into peft) and HE-LoRA (the base model runs here in plaintext; every
   adapted layer's LoRA delta is computed by the HE runtime on CKKS-encrypted
   activations, with the adapter the runtime loaded from the registry for the tenant).
7. Print the two texts side by side, the adapter's DP certificate and a one-screen
   summary (epsilon, delta, steps, package digest, HE max error, timings).

Exit code 0 when the HE-LoRA text equals the plaintext-LoRA text, 1 when it does not,
2 when a step fails (the message says which).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np
import torch
from torch import nn

from tensafe import tgsp
from tensafe.client.auth import TokenProvider, authenticated_channel
from tensafe.client.connection import load_connection
from tensafe.common.errors import IntegrityError, TenSafeError
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

BASE_MODEL = "tiny-llama"
"""Name (folder under the stack's base models dir) of the demo's base model."""

PROMPT = "The river ran past the old"
"""The generation prompt."""


@dataclasses.dataclass(frozen=True)
class TenantCredentials:
    """A tenant made for the demo.

    Attributes:
        tenant_id: The tenant.
        principal_id: Its trainer principal.
        api_key: The principal's API key (secret).
    """

    tenant_id: str
    principal_id: str
    api_key: str


@dataclasses.dataclass
class DemoResult:
    """What the demo measured (also what the integration tests check).

    Attributes:
        tenant_id: The demo tenant.
        steps: DP steps taken.
        losses: Mean NLL per step.
        epsilons: Epsilon after each step.
        adapter_name: Registry adapter name.
        version: Registry version.
        package_sha256: SHA-256 of the package.
        manifest: The verified manifest.
        plaintext_tokens: Greedy tokens with plaintext LoRA.
        he_tokens: Greedy tokens with HE-LoRA.
        base_tokens: Greedy tokens of the base model alone.
        plaintext_text: Decoded plaintext-LoRA text.
        he_text: Decoded HE-LoRA text.
        he_max_error: Largest absolute error of an HE delta against the plaintext delta.
        timings: Seconds per phase.
        package_path: Where the downloaded package was saved.
    """

    tenant_id: str = ""
    steps: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    epsilons: list[float] = dataclasses.field(default_factory=list)
    adapter_name: str = ""
    version: int = 0
    package_sha256: str = ""
    manifest: tgsp.Manifest | None = None
    plaintext_tokens: list[int] = dataclasses.field(default_factory=list)
    he_tokens: list[int] = dataclasses.field(default_factory=list)
    base_tokens: list[int] = dataclasses.field(default_factory=list)
    plaintext_text: str = ""
    he_text: str = ""
    he_max_error: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    package_path: Path | None = None


@contextmanager
def _phase(result: DemoResult, name: str, out: TextIO) -> Iterator[None]:
    print(f"\n== {name} ==", file=out)
    out.flush()
    started = time.perf_counter()
    yield
    result.timings[name] = time.perf_counter() - started


def ensure_tiny_model(models_dir: Path, *, name: str = BASE_MODEL, seed: int = 0) -> Path:
    """Build and briefly pretrain (on public text) the tiny base model, unless it is there.

    No weights can be downloaded here; a few seconds of public pretraining make the
    generations readable, so the demo shows what the private adapter changes.
    """
    from tensafe.client.tiny_model import pretrain_tiny_model

    path = models_dir / name
    if not (path / "config.json").is_file():
        pretrain_tiny_model(path, seed=seed)
    return path


def create_tenant(connection_file: Path | None, *, name: str) -> TenantCredentials:
    """Create a tenant, a trainer principal in it and an API key (as the platform admin).

    The admin's API key is the one ``tensafe up`` put into the connection file.

    Raises:
        TenSafeError: The auth service refused a call.
    """
    from tensafe.client.auth import find_api_key
    from tensafe.common.grpc_errors import from_rpc_error

    connection = load_connection(connection_file)
    admin_key = find_api_key(connection_file=connection.path)
    with connection.channel("auth") as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(
            authenticated_channel(channel, TokenProvider(channel, admin_key))
        )
        try:
            tenant = stub.CreateTenant(
                auth_pb.CreateTenantRequest(display_name=name, request_id=uuid.uuid4().hex)
            ).tenant
            principal = stub.CreatePrincipal(
                auth_pb.CreatePrincipalRequest(
                    kind=auth_pb.PRINCIPAL_KIND_USER,
                    name=f"{name}-trainer",
                    roles=[auth_pb.ROLE_TRAINER],
                    tenant_id=tenant.id,
                    request_id=uuid.uuid4().hex,
                )
            ).principal
            key = stub.CreateApiKey(
                auth_pb.CreateApiKeyRequest(principal_id=principal.id, description="demo")
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
    return TenantCredentials(tenant_id=tenant.id, principal_id=principal.id, api_key=key.secret)


def _greedy(model: Any, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(token) for token in output[0, input_ids.shape[1] :]]


def _lora_deltas(opened: tgsp.OpenedAdapter) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per adapted module: A (r x d), B (d_out x r) in float64 and alpha / r."""
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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensafe.client.he import HeLoraModel, open_he_runtime
    from tensafe.client.registry import RegistryClient
    from tensafe.client.tiny_model import tiny_corpus
    from tensafe.client.train_cli import (
        Batches,
        ProgressBar,
        build_corpus,
        describe_privacy,
        to_datum,
        train,
    )
    from tensafe.tinker import ServiceClient, types

    result = DemoResult()
    connection = load_connection(connection_file)
    described = json.loads(connection.path.read_text())
    models_dir = Path(str(described["base_models_dir"]))
    with _phase(result, "base model", out):
        model_dir = ensure_tiny_model(models_dir)
        print(f"{BASE_MODEL}: {model_dir}", file=out)
    with _phase(result, "tenant", out):
        tenant = create_tenant(connection.path, name=f"demo-{uuid.uuid4().hex[:8]}")
        result.tenant_id = tenant.tenant_id
        print(f"tenant {tenant.tenant_id}, trainer principal {tenant.principal_id}", file=out)

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
        tokenizer = client.get_tokenizer()
        corpus = build_corpus(tiny_corpus(), tokenizer.encode, max_length=64)
        datums = [to_datum(tokens) for tokens in corpus.sequences]
        print(
            f"training client {client.model_id}: {len(datums)} texts, {steps} steps of "
            f"{batch_size}, target ε = {target_epsilon:g}",
            file=out,
        )
        records = train(
            client,
            datums,
            steps=steps,
            batches=Batches(size=batch_size, count=len(datums), rng=random.Random(0)),
            adam_params=types.AdamParams(learning_rate=learning_rate),
            out=out,
            progress=ProgressBar(steps, progress_stream),
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
            package_path = (
                Path(str(described["data_dir"]))
                / "packages"
                / f"{result.adapter_name}-v{result.version}.tgsp"
            )
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
        with _phase(result, "plaintext LoRA", out):
            hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
            input_ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
            base = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # type: ignore[no-untyped-call]
            result.base_tokens = _greedy(base, input_ids, new_tokens)
            opened = registry.open(result.adapter_name, version=result.version)
            with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as adapter_dir:
                tgsp.write_peft_dir(opened, Path(adapter_dir) / "adapter")
                lora_model = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(model_dir),
                    str(Path(adapter_dir) / "adapter"),
                ).eval()
            result.plaintext_tokens = _greedy(lora_model, input_ids, new_tokens)
            result.plaintext_text = str(hf_tokenizer.decode(result.plaintext_tokens))

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
            result.he_tokens = _greedy(he_model.model, input_ids, new_tokens)
        finally:
            for handle in handles:
                handle.remove()
            he_model.close()
            rpc.close()
        result.he_max_error = max_error
        result.he_text = str(hf_tokenizer.decode(result.he_tokens))
        calls = sum(s.calls for s in he_model.session.stats.values())
        server_ms = sum(s.server_ms for s in he_model.session.stats.values())
        print(
            f"{len(he_model.session.layers)} adapted layers, {calls} encrypted ApplyLora "
            f"calls, {server_ms / max(calls, 1):.1f} ms runtime time per call",
            file=out,
        )
    _print_report(result, out)
    return result


def _certificate_lines(manifest: tgsp.Manifest) -> list[str]:
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
    print(f"prompt          : {PROMPT!r}", file=out)
    print(f"plaintext LoRA  : {result.plaintext_text!r}", file=out)
    print(f"HE-LoRA (CKKS)  : {result.he_text!r}", file=out)
    same = result.he_tokens == result.plaintext_tokens
    changed = result.plaintext_tokens != result.base_tokens
    print(
        f"identical tokens: {'yes' if same else 'NO'} "
        f"(the adapter {'changes' if changed else 'does not change'} the base model's output)",
        file=out,
    )
    print("-" * width, file=out)
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
    print(f"  ε = {epsilon:.4f} at δ = {delta:g} after {result.steps} DP steps", file=out)
    print(
        f"  loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
        if result.losses
        else "  no steps",
        file=out,
    )
    print(f"  package {result.adapter_name} v{result.version}", file=out)
    print(f"  sha256  {result.package_sha256}", file=out)
    print(f"  HE max |error| of a LoRA delta: {result.he_max_error:.2e}", file=out)
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
    print(f"  timings: {timings}", file=out)
    print(f"  total  : {sum(result.timings.values()):.1f}s", file=out)
    print("=" * width, file=out)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``tensafe`` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="the end-to-end demo against a running `tensafe up`"
    )
    parser.add_argument("--steps", type=int, default=12, help="DP steps (default 12)")
    parser.add_argument("--batch-size", type=int, default=256, help="texts per step")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="ε over --steps")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Adam lr")
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens to generate")
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
                    "steps": result.steps,
                    "epsilons": result.epsilons,
                    "losses": result.losses,
                    "adapter_name": result.adapter_name,
                    "version": result.version,
                    "package_sha256": result.package_sha256,
                    "package_path": str(result.package_path),
                    "plaintext_text": result.plaintext_text,
                    "he_text": result.he_text,
                    "he_max_error": result.he_max_error,
                    "timings": result.timings,
                },
                indent=2,
            )
        )
    return 0 if result.he_tokens == result.plaintext_tokens else 1

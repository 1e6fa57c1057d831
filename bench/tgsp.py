"""TGSP throughput against a plain file copy of the same bytes, measured in the same run.

A ~100 MiB LoRA adapter (fp32, r=16 A/B pairs for 4096-wide modules) is written once as
a safetensors file. Each round then times, in an interleaved order that rotates per
round, a plain copy of that file and each TGSP operation on it, each creating a new
output file (the previous one is removed untimed):

* copy        shutil.copyfile of the safetensors file                  (the baseline)
* read+write  the same copy through user space (bytes in, bytes out)    (for context)
* write       seal the safetensors file (given as a path) into a package (publish),
              and the same from its bytes already in memory (a trainer's publisher)
* verify      read the package file: signature, digests, structure      (registry)
* open        read the package, verify, unwrap, decrypt, hash tensors   (HE runtime)
* decrypt     package file to safetensors file in bounded memory       (export)

Medians over the rounds are reported with their ratio to the copy's median (and to the
user-space read+write copy); the target is every operation within 3x the copy. The CPU
time is work and how much waiting. With ``--durable`` the copy, write and decrypt also
fsync their output before it counts as done (``durable=True``, the library's default
for paths); without it nothing is fsynced.

Run: ``python bench/tgsp.py [--size-mib 100] [--rounds 7] [--durable]``. The machine's
page cache holds every file after the first round, so this measures CPU and memory
bandwidth, not the disk; on shared cores expect a few percent of noise between runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tensafe import tgsp

TENANT = "bench-tenant"


def build_adapter(directory: Path, size_mib: int) -> Path:
    """Write a LoRA-shaped safetensors file of about ``size_mib`` MiB."""
    rank, width = 16, 4096
    pair_bytes = 2 * rank * width * 4
    pairs = max(1, size_mib * 1024 * 1024 // pair_bytes)
    rng = np.random.default_rng(0)
    tensors = {}
    for index in range(pairs):
        layer, module = divmod(index, 4)
        name = f"base_model.model.layers.{layer}.self_attn.{'qkvo'[module]}_proj"
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((rank, width), dtype=np.float32)
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((width, rank), dtype=np.float32)
    path = directory / "adapter.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def fields() -> dict[str, object]:
    return {
        "adapter": tgsp.AdapterRef(adapter_id="bench", version="1"),
        "base_model": tgsp.BaseModelRef(model_id="llama-7b-shaped", weights_sha256="00" * 32),
        "lora": tgsp.LoraSpec(
            rank=16, alpha=32, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        "dp_certificate": tgsp.DPGuarantee(
            epsilon=5.632,
            delta=1e-5,
            accountant="rdp",
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            sampling=tgsp.PoissonSampling(rate=0.01),
            steps=10_000,
        ),
        "provenance": tgsp.Provenance(
            tenant_id=TENANT,
            training_client_id="bench-client",
            code_version="bench",
            created_at=dt.datetime.now(dt.UTC),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--durable", action="store_true", help="fsync outputs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tgsp-bench-") as tmp:
        root = Path(tmp)
        (root / "keks").mkdir(mode=0o700)
        kek = tgsp.LocalFileKekProvider(root / "keks")
        kek.create_tenant_kek(TENANT)
        key = tgsp.SigningKey.generate()
        trusted = [key.verifying_key]
        plain = build_adapter(root, args.size_mib)
        package_path = root / "adapter.tgsp"
        manifest_fields = fields()

        def copy() -> None:
            target = root / "copy.safetensors"
            shutil.copyfile(plain, target)  # in-kernel copy (copy_file_range) where it can
            if args.durable:
                descriptor = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)

        def copy_in_python() -> None:
            # What any user-space tool pays to move the bytes: read them in, write out.
            data = plain.read_bytes()
            with open(root / "copy2.safetensors", "wb") as out:
                out.write(data)
                if args.durable:
                    out.flush()
                    os.fsync(out.fileno())

        def write() -> None:
            tgsp.write_to(
                package_path,
                weights=plain,  # read in blocks, twice, by the library
                kek_provider=kek,
                signing_key=key,
                durable=args.durable,
                **manifest_fields,
            )

        in_memory = plain.read_bytes()

        def write_from_memory() -> None:
            tgsp.write_to(
                root / "from-memory.tgsp",
                weights=in_memory,
                kek_provider=kek,
                signing_key=key,
                durable=args.durable,
                **manifest_fields,
            )

        def verify() -> None:
            tgsp.verify(package_path, trusted_keys=trusted, expected_tenant=TENANT)

        def open_package() -> None:
            opened = tgsp.open(
                package_path, trusted_keys=trusted, kek_provider=kek, tenant_id=TENANT
            )
            if len(opened.payload) != plain.stat().st_size:
                raise SystemExit("open returned a payload of the wrong size")

        def decrypt() -> None:
            tgsp.decrypt_to_file(
                package_path,
                root / "decrypted.safetensors",
                trusted_keys=trusted,
                kek_provider=kek,
                tenant_id=TENANT,
                durable=args.durable,
            )

        operations: dict[str, Callable[[], None]] = {
            "copy (baseline)": copy,
            "read+write copy": copy_in_python,
            "write (path in)": write,
            "write (bytes in)": write_from_memory,
            "verify": verify,
            "open": open_package,
            "decrypt_to_file": decrypt,
        }
        # Each operation creates its output anew, as the registry's content-addressed
        # store and an export do; removing the previous one (freeing its page-cache
        # pages) is not timed.
        outputs = {
            "copy (baseline)": root / "copy.safetensors",
            "read+write copy": root / "copy2.safetensors",
            "write (path in)": package_path,
            "write (bytes in)": root / "from-memory.tgsp",
            "decrypt_to_file": root / "decrypted.safetensors",
        }
        write()  # the first package, and a warm-up for every file
        copy()
        timings: dict[str, list[float]] = {name: [] for name in operations}
        cpu_times: dict[str, list[float]] = {name: [] for name in operations}
        names = list(operations)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if name in outputs:
                    outputs[name].unlink(missing_ok=True)
                cpu_start = time.process_time()
                start = time.perf_counter()
                operations[name]()
                timings[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)

        if (root / "decrypted.safetensors").read_bytes() != plain.read_bytes():
            raise SystemExit("decrypt_to_file did not reproduce the plaintext")
        size = plain.stat().st_size
        baseline = statistics.median(timings["copy (baseline)"])
        user_space_copy = statistics.median(timings["read+write copy"])
        print(
            f"TGSP bench: {size / 2**20:.1f} MiB adapter, {args.rounds} interleaved rounds, "
            f"{'durable (fsync)' if args.durable else 'page cache, no fsync'}, "
            f"{len(os.sched_getaffinity(0))} cores"
        )
        print(
            f"{'operation':<20}{'median s':>9}{'min s':>8}{'max s':>8}{'cpu s':>8}"
            f"{'MiB/s':>7}{'× copy':>8}{'× r+w':>7}"
        )
        for name in names:
            values = timings[name]
            median = statistics.median(values)
            print(
                f"{name:<20}{median:>9.3f}{min(values):>8.3f}{max(values):>8.3f}"
                f"{statistics.median(cpu_times[name]):>8.3f}{size / 2**20 / median:>7.0f}"
                f"{median / baseline:>8.2f}{median / user_space_copy:>7.2f}"
            )
        print(
            "cpu s: process CPU time (all threads); wall above cpu means waiting (I/O or "
            "other processes), below means threads ran in parallel."
        )
        package_size = package_path.stat().st_size
        print(f"package overhead: {package_size - size} bytes ({package_size / size - 1:.4%})")


if __name__ == "__main__":
    main()

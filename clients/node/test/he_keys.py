"""Test helper: real CKKS public material for an HE-LoRA session, made by the Python SDK.

The Node client only carries keys (a Node CKKS implementation is out of its scope), so
its test gets the SEAL parameters and Galois keys a client would upload from
tensafe.helora, the same code the Python SDK's HeLoraSession uses.

Usage: python he_keys.py HIDDEN OUTPUT RANK ALPHA OUT_DIR
Writes OUT_DIR/parameters.bin, OUT_DIR/galois_keys.bin and the ciphertexts of one
token's activations (OUT_DIR/ciphertext-<i>.bin, in plan order); prints the plan's
parameters, rotation steps and ciphertext counts as JSON.
"""

import json
import sys
from pathlib import Path

import numpy as np

from tensafe.helora.client import HeLoraClient
from tensafe.helora.params import compact_params
from tensafe.helora.plan import choose_plan

hidden, output, rank, alpha, out_dir = sys.argv[1:6]
params = compact_params()
plan, _ = choose_plan(
    hidden_size=int(hidden),
    output_size=int(output),
    rank=int(rank),
    alpha=float(alpha),
    tokens=1,
    params=params,
)
crypto = HeLoraClient(params)
material = crypto.public_material(plan)
out = Path(out_dir)
(out / "parameters.bin").write_bytes(material.parameters)
(out / "galois_keys.bin").write_bytes(material.galois_keys or b"")
activations = 0.5 * np.sin(np.arange(int(hidden), dtype=np.float64))[None, :]
ciphertexts = crypto.encrypt_activations(plan, activations)
for index, blob in enumerate(ciphertexts):
    (out / f"ciphertext-{index}.bin").write_bytes(blob)
print(
    json.dumps(
        {
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_modulus_bits": list(params.coeff_modulus_bits),
            "scale_bits": params.scale_bits,
            "rotation_steps": list(plan.rotation_steps),
            "input_ciphertexts": len(ciphertexts),
            "output_ciphertexts": plan.output_ciphertexts,
        }
    )
)

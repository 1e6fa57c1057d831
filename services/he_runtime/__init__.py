"""The HE runtime: HE-LoRA on CKKS-encrypted activations (Microsoft SEAL)."""

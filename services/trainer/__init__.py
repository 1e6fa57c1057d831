"""TenSafe trainer service: Tinker-style LoRA training with DP-SGD and honest accounting."""

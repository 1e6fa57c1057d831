"""TenSafe's Tinker API: the official ``tinker`` SDK's HTTP protocol over the trainer."""

"""Configuration of the trainer API and its workers (one dataclass, both processes)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path

from tensafe.common.config import ServiceConfig, env_name, setting
from tensafe.common.errors import ConfigError
from tensafe.tgsp.kek_settings import KekSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig(KekSettings, ServiceConfig):
    """Settings of the trainer API (``python -m tensafe.trainer``) and its workers
    (``python -m tensafe.trainer.worker``). The KEK provider that seals published
    adapters comes from :class:`~tensafe.tgsp.kek_settings.KekSettings`."""

    nats_url: str = setting("NATS server with JetStream, e.g. nats://127.0.0.1:4222.")
    jobs_stream: str = setting("JetStream stream of training jobs.", default="TENSAFE_TRAINER")
    jobs_subject_prefix: str = setting(
        "Subject prefix of training jobs; a job of client C is published on <prefix>.C.",
        default="tensafe.trainer.jobs",
    )
    jobs_durable: str = setting(
        "Durable consumer name shared by every trainer worker.", default="trainer-workers"
    )
    base_models_dir: Path | None = setting(
        "Folder of base models: each folder holding a config.json is a base model, plain "
        "(<dir>/<name>, named name), nested as on the Hub (<dir>/<org>/<name>, named "
        "org/name) or a Hugging Face hub cache entry (<dir>/models--<org>--<name>, named "
        "org/name, at the snapshot refs/main names); sharded safetensors follow "
        "model.safetensors.index.json. Unset: <data_dir>/base_models.",
        default=None,
    )
    heartbeat_file: Path | None = setting(
        "Workers only: a file the worker touches every 5 s while its event loop runs, for "
        "a liveness probe (`python -m tensafe.common.heartbeat FILE --max-age S`). Unset: "
        "no heartbeat.",
        default=None,
    )
    job_ack_wait_seconds: float = setting(
        "Seconds without an ack or progress signal before JetStream redelivers a job to "
        "another worker (a killed worker's job is retried after this).",
        default=30.0,
    )
    lease_seconds: float = setting(
        "How long a worker's lease on a training client lasts without renewal; another "
        "worker may take the client after it expires.",
        default=30.0,
    )
    resident_bytes: int = setting(
        "Memory, bytes, a worker gives to resident training clients beyond its shared "
        "base models: each client holds its LoRA adapter, gradient accumulator and two "
        "AdamW moments (4 x the adapter). The least recently used clients are evicted "
        "above it and reloaded from their last committed state when next used. 0: a "
        "quarter of the machine's physical memory, or of the container's cgroup memory "
        "limit if that is lower.",
        default=0,
    )
    base_dtype: str = setting(
        "dtype a worker holds base models in: fp32, bf16 or fp16 (LoRA adapters, "
        "clipping, noise and AdamW stay float32).",
        default="fp32",
    )
    device: str = setting(
        "Device of a worker's base models and adapters: auto (the first CUDA device when "
        "torch sees one, else the CPU), cpu, cuda or cuda:N.",
        default="auto",
    )
    outbox_interval_seconds: float = setting(
        "Period of the API's re-publisher of accepted jobs whose publish failed.",
        default=10.0,
    )
    outbox_grace_seconds: float = setting(
        "Age a still-queued job must reach before the re-publisher sends it again.",
        default=5.0,
    )
    jobs_in_flight: int = setting(
        "Jobs one worker handles at once. Jobs of one training client never overlap (a "
        "later one waits in the worker for the earlier one), and engine steps on the "
        "shared base run one at a time; what overlaps is one job's database "
        "transactions, state write and acks with another job's engine step. 1: one job "
        "after another. Waiting jobs cost no engine time, and keep the engine busy while "
        "others are in the database (docs/trainer.md: 8 x 8 on 2 cores, 16 against 4).",
        default=16,
    )
    joint_forward_backward_rows: int = setting(
        "Most rows (datums) of one forward/backward pass that runs several DP clients' "
        "ForwardBackward jobs together on one shared base, each row through its own "
        "client's adapter and clipped into its own client's sum (jobs waiting for the "
        "engine at the same time; each still commits on its own). 0: every "
        "ForwardBackward runs alone. On CPU a shared pass costs what separate ones do "
        "(bench/joint_step.py) and its activations grow with it; on a GPU, where a "
        "bigger batch is cheaper per row, raise it.",
        default=16,
    )
    retry_delay_seconds: float = setting(
        "Delay before a job that waits for an earlier job of its client is redelivered.",
        default=0.05,
    )
    torch_threads: int = setting(
        "Threads torch uses in a worker; 0 keeps torch's default.", default=0
    )
    dataset_kek_file: Path | None = setting(
        "File holding the 256-bit key-encryption key (64 hex digits, mode 0600) that wraps "
        "each tenant's dataset data key. Required outside dev mode (a start-up error "
        "when missing); in dev mode, when unset, one is created at "
        "<data_dir>/trainer/keys/dataset.kek.",
        default=None,
    )
    max_dataset_bytes: int = setting(
        "Largest JSONL upload accepted by UploadDataset, bytes.", default=256 * 1024 * 1024
    )
    max_training_clients_per_tenant: int = setting(
        "Most live (not deleted) training clients one tenant may hold; one more "
        "CreateTrainingClient fails with RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED).",
        default=32,
    )
    max_pending_jobs_per_tenant: int = setting(
        "Most jobs (futures still PENDING or RUNNING) one tenant may have queued at once; "
        "one more ForwardBackward, OptimStep, Sample, ..., TrainOnDataset or AuditPrivacy "
        "fails with RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED).",
        default=256,
    )
    max_steps_per_job: int = setting(
        "Most optimizer steps one TrainOnDataset or AuditPrivacy job may run: a job is "
        "never preempted, so a run of a million steps would hold a worker for days; past "
        "it RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED) names the limit. Split longer runs "
        "into several jobs (the accountant composes them exactly).",
        default=100_000,
    )
    max_dataset_storage_bytes_per_tenant: int = setting(
        "Most bytes of encrypted datasets one tenant may store on the trainer; an "
        "UploadDataset that would pass it fails with RESOURCE_EXHAUSTED.",
        default=10 * 1024 * 1024 * 1024,
    )

    registry_url: str = setting(
        "host:port of the registry. Set: SaveAdapter seals adapters as TGSP packages and "
        "publishes them there, acting for the client's tenant. Unset: SaveAdapter fails "
        "with FAILED_PRECONDITION.",
        default="",
    )
    kek_dir: Path | None = setting(
        "Folder of the local-file KEK provider shared with the registry (the registry's "
        "TENSAFE_REGISTRY_KEK_DIR). Required with registry_url and kek_provider=local-file "
        "(dev mode only); production uses kek_provider=pkcs11, the registry's token.",
        default=None,
    )
    trainer_signing_key_file: Path | None = setting(
        "PEM file (PKCS#8, mode 0600) of the trainer's Ed25519 package-signing key; the "
        "registry must trust its public key (TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES). "
        "Required with registry_url outside dev mode; in dev mode, when unset, one is "
        "created at <data_dir>/dev-trainer-signing-key.pem (and logged as such).",
        default=None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nats_url.startswith(("nats://", "tls://")):
            raise ConfigError(env_name("nats_url"), "must start with nats:// or tls://")
        if not self.base_models_path.is_dir():
            raise ConfigError(
                env_name("base_models_dir"), f"{self.base_models_path} is not a directory"
            )
        positive = {
            "job_ack_wait_seconds": self.job_ack_wait_seconds,
            "lease_seconds": self.lease_seconds,
            "outbox_interval_seconds": self.outbox_interval_seconds,
            "retry_delay_seconds": self.retry_delay_seconds,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(env_name(name), "must be positive")
        if self.outbox_grace_seconds < 0:
            raise ConfigError(env_name("outbox_grace_seconds"), "must be >= 0")
        if self.resident_bytes < 0:
            raise ConfigError(env_name("resident_bytes"), "must be >= 0 (0: automatic)")
        if self.base_dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(env_name("base_dtype"), "must be fp32, bf16 or fp16")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ConfigError(env_name("device"), "must be auto, cpu, cuda or cuda:N")
        if self.torch_threads < 0:
            raise ConfigError(env_name("torch_threads"), "must be >= 0")
        if self.dataset_kek_file is None and not self.dev_mode:
            raise ConfigError(
                env_name("dataset_kek_file"),
                "required outside dev mode (TENSAFE_DEV_MODE=1): it wraps every tenant's "
                "dataset key, and none is ever generated silently",
            )
        if self.registry_url and self.trainer_signing_key_file is None and not self.dev_mode:
            raise ConfigError(
                env_name("trainer_signing_key_file"),
                "required with TENSAFE_REGISTRY_URL outside dev mode (TENSAFE_DEV_MODE=1): "
                "the trainer signs the packages it publishes",
            )
        if self.registry_url:
            self.check_kek_settings(dev_mode=self.dev_mode)
        if self.registry_url and self.kek_provider == "local-file" and self.kek_dir is None:
            raise ConfigError(
                env_name("kek_dir"),
                "required with TENSAFE_REGISTRY_URL and the local-file KEK provider: packages "
                "are sealed under the tenant's KEK, from the same provider the registry uses",
            )
        for name in (
            "max_dataset_bytes",
            "max_training_clients_per_tenant",
            "max_pending_jobs_per_tenant",
            "max_steps_per_job",
            "max_dataset_storage_bytes_per_tenant",
            "jobs_in_flight",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(env_name(name), "must be positive")
        if self.joint_forward_backward_rows < 0:
            raise ConfigError(
                env_name("joint_forward_backward_rows"), "must be 0 (off) or positive"
            )

    @property
    def base_models_path(self) -> Path:
        """The base models folder: the setting, or ``<data_dir>/base_models``."""
        if self.base_models_dir is not None:
            return self.base_models_dir
        return Path(self.data_dir) / "base_models"

    @property
    def resident_bytes_limit(self) -> int:
        """The resident client budget: the setting, or a quarter of the memory this
        process may use (physical memory, or the container's cgroup limit if lower)."""
        if self.resident_bytes > 0:
            return self.resident_bytes
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # A pod's limit, not the node's memory: cgroup v2, then v1 ("max" or an
        # absurdly large number mean no limit).
        for limit_file in (
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ):
            with contextlib.suppress(OSError, ValueError):
                memory = min(memory, int(Path(limit_file).read_text().strip()))
                break
        return memory // 4

"""All configuration in one place: environment variables prefixed HOTSWAP_ (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "hotswap"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "hotswap"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSWAP_", env_file=".env", extra="ignore")

    # Local dirs
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Root of model and adapter caches.")
    data_dir: Path = Field(default_factory=_default_data_dir, description="Embedded Redis data and file:// storage.")
    models_dir: Path | None = Field(default=None, description="Where converted models live (default: CACHE_DIR/models).")

    # Engine
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    dtype: str = Field(default="auto", description="'auto' (bf16 on GPU and on CPUs with native bf16: AVX512_BF16 or AMX; else fp32), 'float32', 'bfloat16', 'float16'.")
    cpu_tuning: Literal["auto", "remeasure", "off"] = Field(default="auto", description="CPU engine: measure the matmul paths once per machine kind and keep the timings in CPU_TUNING_DIR ('auto'), measure again now ('remeasure'), or use the fixed rule ('off').")
    cpu_tuning_dir: Path | None = Field(default=None, description="Where measured CPU matmul timings are kept (default: CACHE_DIR/cpu-tuning).")
    max_lora_rank: int = Field(default=64, description="Adapters of higher rank are refused at upload.")

    # The base model served (its config + tokenizer are read by the API; weights only by workers)
    base_model: str = Field(default="smollm2-135m-instruct", description="Name clients use for the base model.")
    base_model_dir: Path | None = Field(default=None, description="HF model dir of the base (default: the demo model).")

    # Redis and object storage
    redis_url: str = Field(default="redis://127.0.0.1:6379/0")
    api_redis_connections: int = Field(default=1024, ge=8, description=(
        "Redis connections one API process may open for streams and queue calls; past it a call waits "
        "for a free one (up to 30 s) instead of failing. Every in-flight request holds one while it waits "
        "for output (a blocking read of at most 1 s)."))
    storage_url: str | None = Field(default=None, description="s3://bucket/prefix or file:///dir (default: file://DATA_DIR/storage).")
    s3_endpoint_url: str | None = Field(default=None, description="For MinIO or other S3-compatible servers.")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_multipart_threshold_mb: int = Field(default=64, ge=5, description="Files above this upload in parts.")
    presign_expiry_s: int = Field(default=3600, ge=60)

    max_upload_mb: int = Field(default=40960, ge=1, description="Largest adapter / fine-tune upload accepted.")
    max_request_mb: int = Field(default=4, ge=1, description="Largest JSON request body (chat, completions, ...); longer prompts cannot fit a context anyway.")
    max_batch_file_mb: int = Field(default=200, ge=1, description="Largest batch input file (POST /v1/files) accepted.")

    # Worker-side adapter disk cache
    adapter_cache_dir: Path | None = Field(default=None, description="Default: CACHE_DIR/adapters.")
    adapter_cache_gb: float = Field(default=20.0, gt=0)

    # Scheduler: queues, batching, leases (see scheduler/policy.py for what each knob does)
    max_batch: int = Field(default=32, ge=1, description="Most requests of one model dispatched to a worker at once.")
    batch_window_ms: float = Field(default=50.0, ge=0, description="How long a batch-priority queue may wait to fill a batch.")
    realtime_window_ms: float = Field(default=0.0, ge=0, description="The same for real-time requests (0: dispatch at once).")
    realtime_boost_s: float = Field(default=30.0, ge=0, description="Aging: a batch queue unserved this long ranks with the real-time ones (batch work never starves).")
    affinity_wait_s: float = Field(default=0.5, ge=0, description="How long a queue waits for a busy worker holding its LoRA before another loads it.")
    swap_wait_s: float = Field(default=10.0, ge=0, description="How long a queue waits for a busy worker with its full weights before another swaps.")
    realtime_reserve: float = Field(default=0.25, ge=0, lt=1, description="Share of each worker that batch work leaves free.")
    max_queued_realtime: int = Field(default=2000, ge=0, description="Real-time requests waiting, all tenants (0: no cap); over it: 429.")
    max_queued_per_tenant: int = Field(default=500, ge=0, description="Real-time requests waiting per tenant (0: no cap).")
    max_prompts_per_request: int = Field(default=32, ge=1, description="Most prompts one /v1/completions call may hold (a list of prompts, each its own choice); more: 400.")
    max_n: int = Field(default=8, ge=1, le=128, description="Most choices (n) per prompt in one real-time call; each choice is its own generation request.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="A real-time call waiting longer is cancelled (504).")
    lease_s: float = Field(default=5.0, gt=0, description="A worker silent this long is dead; its requests are requeued.")
    heartbeat_s: float = Field(default=1.0, gt=0)
    claim_timeout_s: float = Field(default=30.0, gt=0, description="A dispatched request not picked up by then is requeued.")
    max_attempts: int = Field(default=3, ge=1, description="Crashed runs after which a request is dead-lettered.")
    result_ttl_s: int = Field(default=86400, ge=60, description="How long finished requests and their outputs stay in Redis.")

    # Worker
    worker_id: str | None = Field(default=None, description="Default: host-pid-random, unique per process.")
    worker_max_inflight: int | None = Field(default=None, ge=1, description="Requests a worker takes at once (default: the engine's max_num_seqs).")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences the engine runs in one step.")
    max_loras: int = Field(default=8, ge=0, description="LoRA adapters resident in GPU slots at once.")
    kv_cache_gb: float = Field(default=1.0, gt=0, description="KV cache size on CPU (on GPU it is sized from free memory).")
    prefix_caching: bool = Field(default=True, description="Reuse the KV of prompt prefixes already computed under the same weights (HOTSWAP_PREFIX_CACHING=0 turns it off).")
    drain_timeout_s: float = Field(default=60.0, ge=0, description="On SIGTERM: how long running requests may finish before they are requeued.")
    fault_crash_marker: str | None = Field(default=None, description="Fault injection for tests: a worker exits abruptly on a prompt containing this text.")

    # CLI -> API
    api_url: str = Field(default="http://127.0.0.1:8000", description="Where the CLI finds the API.")
    api_key: SecretStr | None = Field(default=None, description="The CLI's API key (HOTSWAP_API_KEY).")

    # Batch jobs (scheduler/batchjobs/records.py)
    batch_feed_window: int = Field(default=1000, ge=1, description="Requests of one batch job in the queues at once; more are fed as they finish.")
    batch_max_lines: int = Field(default=50000, ge=1, description="Most requests one batch input file may hold.")
    batch_completion_window_s: float = Field(default=86400.0, gt=0, description="A batch not finished this long after creation expires ('24h'; shorter in tests).")
    batch_poll_s: float = Field(default=0.25, gt=0, description="How often the job runner advances the batch jobs.")

    @property
    def model_root(self) -> Path:
        return self.models_dir or self.cache_dir / "models"

    @property
    def resolved_base_model_dir(self) -> Path:
        """Where the base model's files are: HOTSWAP_BASE_MODEL_DIR, else the demo model's dir."""
        from hotswap.demo_model import demo_model_dir

        return self.base_model_dir or demo_model_dir(self.model_root)

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'storage'}"

    @property
    def resolved_cpu_tuning_dir(self) -> Path:
        return self.cpu_tuning_dir or self.cache_dir / "cpu-tuning"

    @property
    def resolved_adapter_cache_dir(self) -> Path:
        return self.adapter_cache_dir or self.cache_dir / "adapters"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once, lazily: nothing is read at import time)."""
    return Settings()

"""All configuration in one place: environment variables prefixed HOTSWAP_ (or a .env file)."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "hotswap"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSWAP_", env_file=".env", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Root of model and adapter caches.")
    models_dir: Path | None = Field(default=None, description="Where converted models live (default: CACHE_DIR/models).")
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    dtype: str = Field(default="auto", description="'auto' (bf16 on GPU, fp32 on CPU), 'float32', 'bfloat16', 'float16'.")

    @property
    def model_root(self) -> Path:
        return self.models_dir or self.cache_dir / "models"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once, lazily: nothing is read at import time)."""
    return Settings()

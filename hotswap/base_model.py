"""The served base model as the API, the scheduler and the CLI see it: its files (never its
weights), its tokenizer and config.json, and the context length a request may use. One owner for
what those processes each used to work out on their own.

    served = load_served_base(settings)        # BaseModelMissing: says where it looked
    limit = context_limit(worker_limits, served.config_len)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONTEXT_LEN = 32768  # when neither config.json nor any worker says how long a context may be


class BaseModelMissing(Exception):
    """The base model's config.json or tokenizer.json is not on this host."""


@dataclass(frozen=True)
class ServedBase:
    name: str  # what clients call it (HOTSWAP_BASE_MODEL)
    dir: Path
    config: dict  # its config.json
    tokenizer: object  # hotswap.tokenizer.Tokenizer

    @property
    def config_len(self) -> int:
        return int(self.config.get("max_position_embeddings") or DEFAULT_CONTEXT_LEN)


def read_config(settings) -> dict:
    """The base model's config.json (what adapters are validated against)."""
    path = settings.resolved_base_model_dir / "config.json"
    if not path.exists():
        raise BaseModelMissing("the base model's config.json is not on this host: set HOTSWAP_BASE_MODEL_DIR or run "
                               "`hotswap models fetch-demo`")
    return json.loads(path.read_text())


def load_served_base(settings) -> ServedBase:
    """Tokenizer and config of the served base model; BaseModelMissing when its files are not here."""
    from hotswap.tokenizer import Tokenizer

    model_dir = settings.resolved_base_model_dir
    if not (model_dir / "tokenizer.json").exists():
        raise BaseModelMissing("the base model's tokenizer.json is not on this host: set HOTSWAP_BASE_MODEL_DIR or "
                               "run `hotswap models fetch-demo`")
    return ServedBase(settings.base_model, model_dir, read_config(settings), Tokenizer(model_dir))


def context_limit(worker_limits: list[int], config_len: int) -> int:
    """The longest prompt + output any request may ask for: what every live worker accepts, and no
    more than the model's own context (its own alone when no worker runs yet)."""
    return min(min([n for n in worker_limits if n] or [DEFAULT_CONTEXT_LEN]), config_len)

"""Random-init bf16 Llama checkpoints of named shapes, for benchmarks without a model hub: llama3-8b
(GPU), the demo model's shape, and a CPU-sized stand-in that exercises the same path."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}
# Shapes (LlamaConfig fields over DEFAULTS). "smollm2-135m" is the demo model's shape; "llama3-tiny"
# is a CPU-sized stand-in that exercises the same path.
RANDOM_MODELS = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama3-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256, vocab_size=2048),
}
DEFAULTS = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DONE_MARKER = ".random-model"  # in a finished ensure_random_model dir: the shape and seed it holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_random_model(name: str, out_dir: Path, device, seed: int, **overrides) -> Path:
    """Save a random-init bf16 Llama of the named shape (safetensors + config) into out_dir;
    `overrides` are LlamaConfig fields over the shape's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**DEFAULTS, **RANDOM_MODELS[name], **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return Path(out_dir)


def ensure_random_model(name: str, out_dir: Path, device, seed: int) -> Path:
    """The random model in out_dir: reused when a finished one of this shape and seed is there, else built."""
    out_dir = Path(out_dir)
    stamp = f"{name} seed {seed}\n"
    marker = out_dir / DONE_MARKER
    if marker.exists() and marker.read_text() == stamp:
        return out_dir
    if out_dir.exists():  # another shape, or a build that was cut short
        shutil.rmtree(out_dir)
    build_random_model(name, out_dir, device, seed)
    marker.write_text(stamp)
    return out_dir


def build_servable_random_model(name: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random model a server can serve: the tokenizer files of `tokenizer_dir` copied in, vocab = its
    size (random weights would otherwise emit ids the tokenizer cannot decode), 8192 positions; built on
    the GPU when there is one."""
    import torch

    from hotswap.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_dir).vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_random_model(name, out_dir, device, seed, vocab_size=vocab, max_position_embeddings=8192)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, out_dir / file)
    return out_dir

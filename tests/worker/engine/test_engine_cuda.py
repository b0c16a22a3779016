"""The engine on CUDA (compiled Triton kernels) against transformers and transformers + PEFT on the
same tiny random Llamas: greedy tokens equal and logits close, in fp32 and bf16 (GPU only; the first
step of scripts/gpu_proof.py runs these). Bounds calibrated on the CPU path: fp32 relative logit error
~6e-7; bf16 0.0080 for the engine against transformers' own bf16 0.0081."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY = dict(intermediate_size=512, num_hidden_layers=2, vocab_size=1024, max_position_embeddings=2048,
            rms_norm_eps=1e-5)
SHAPES = {  # GQA with head_dim 64 and 128
    "head64-gqa2": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    "head128-gqa4": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1),
}
PROMPT_LENS = (1, 5, 16, 17, 40, 90, 300)  # block edges, several blocks, and a prompt prefilled in chunks
NEW_TOKENS = 12


def make_model(tmp_path: Path, shape: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, **SHAPES[shape], tie_word_embeddings=False))
    model.save_pretrained(tmp_path / shape)
    return tmp_path / shape


def make_prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 1000 + 10 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]


def engine_run(model_dir: Path, device: str, dtype: str, prompts, adapters=(), names=None):
    """Greedy tokens and the logits of every step, in one continuous batch."""
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir, device=device, dtype=dtype, num_blocks=256, max_num_seqs=16,
                                    max_num_batched_tokens=128, max_loras=len(adapters), max_lora_rank=16))
    for name, path in adapters:
        engine.register_adapter(name, path)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, return_logits=True)
    results = engine.generate(prompts, params, adapters=names)
    return [(r.token_ids, torch.stack([l.float().cpu() for l in r.logits])) for r in results]


def teacher_forced(model, ids: list[int], tokens: list[int], device: str) -> torch.Tensor:
    """The reference's logits at each step the engine took: one forward over prompt + the engine's tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]], device=device)).logits[0]
    return logits[len(ids) - 1:].float().cpu()  # [NEW_TOKENS, vocab]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_against(references: dict, runs, prompts, names, dtype: str, device: str) -> dict:
    """Worst relative logit error of the engine against the fp32 reference; in bf16 it may be at most twice
    transformers' own bf16 error (same sequences), in fp32 it must be tiny and every greedy token the reference's."""
    worst = {"engine": 0.0, "transformers_bf16": 0.0}
    for ids, name, (tokens, logits) in zip(prompts, names, runs):
        want = teacher_forced(references[name]["float32"], ids, tokens, device)
        worst["engine"] = max(worst["engine"], rel_err(logits, want))
        if dtype == "float32":
            assert tokens == want.argmax(-1).tolist(), f"adapter {name}, prompt of {len(ids)}: greedy tokens differ"
        else:
            peer = teacher_forced(references[name]["bfloat16"], ids, tokens, device)
            worst["transformers_bf16"] = max(worst["transformers_bf16"], rel_err(peer, want))
    if dtype == "float32":
        assert worst["engine"] < 1e-3, worst
    else:
        assert worst["engine"] <= max(2 * worst["transformers_bf16"], 1e-2), worst
    print(f"worst relative logit error ({dtype}): {worst}")
    return worst


def hf_models(model_dir: Path, device: str, adapters=()) -> dict:
    """{adapter name or None: {dtype: model}}: transformers, and transformers + PEFT per adapter."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in [(None, None), *adapters]:
        out[name] = {}
        for dtype in ("float32", "bfloat16"):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
            if path is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, path).to(device).eval()
            out[name][dtype] = model
    return out


def engine_against_transformers(tmp_path: Path, shape: str, dtype: str, device: str) -> dict:
    model_dir = make_model(tmp_path, shape)
    prompts = make_prompts()
    names = [None] * len(prompts)
    runs = engine_run(model_dir, device, dtype, prompts)
    return check_against(hf_models(model_dir, device), runs, prompts, names, dtype, device)


def mixed_adapters_against_peft(tmp_path: Path, dtype: str, device: str) -> dict:
    from adapters.synthetic import write_random_lora

    model_dir = make_model(tmp_path, "head64-gqa2")
    base = json.loads((model_dir / "config.json").read_text())
    adapters = [("a", write_random_lora(tmp_path / "a", base, rank=8, alpha=16, seed=1, std=0.5)),
                ("b", write_random_lora(tmp_path / "b", base, rank=16, alpha=16, seed=2, std=0.5,
                                        targets=("q_proj", "v_proj", "o_proj", "down_proj")))]
    prompts = make_prompts() * 2
    names = (["a", None, "b"] * len(prompts))[:len(prompts)]  # base and two adapters in every step
    runs = engine_run(model_dir, device, dtype, prompts, adapters, names)
    return check_against(hf_models(model_dir, device, adapters), runs, prompts, names, dtype, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA with compiled (not interpreted) Triton")
class TestEngineOnCudaAgainstTransformers:
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize("shape", list(SHAPES))
    def test_logits_and_greedy_tokens(self, tmp_path, shape, dtype):
        engine_against_transformers(tmp_path, shape, dtype, "cuda")

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_mixed_adapter_batch_against_peft(self, tmp_path, dtype):
        mixed_adapters_against_peft(tmp_path, dtype, "cuda")

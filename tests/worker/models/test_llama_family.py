"""Our Llama-family model against transformers on tiny random checkpoints of each supported family."""

from __future__ import annotations

import json

import pytest
import torch

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.sampling_params import SamplingParams
from worker.models.config import ModelConfig

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)

FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "linear-rope-head128": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=128, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, num_key_value_heads=1)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False, tie_word_embeddings=True)),
}


def make_checkpoint(tmp_path, family: str):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(torch.float32)
    with torch.no_grad():  # random biases too (HF initialises them to zero), so qkv bias is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    out = tmp_path / family
    model.save_pretrained(out)
    return out, model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, family):
    path, hf = make_checkpoint(tmp_path, family)
    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", num_blocks=64, max_num_seqs=8))
    prompts = [[(7 * i + 3 * j) % 500 + 5 for j in range(n)] for i, n in enumerate((5, 16, 17, 40, 90))]
    results = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                      return_logits=True))
    for ids, res in zip(prompts, results):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        assert res.token_ids == out.sequences[0, len(ids):].tolist()
        for ours, theirs in zip(res.logits, out.logits):
            assert ((ours - theirs[0]).norm() / theirs[0].norm()).item() < 1e-4


def write_config(tmp_path, **overrides):
    raw = {"architectures": ["LlamaForCausalLM"], **TINY, **overrides}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("overrides,message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=128), "sliding-window"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "unsupported rope scaling"),
    (dict(num_key_value_heads=3), "not a multiple"),
])
def test_unsupported_configs_are_refused_clearly(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(write_config(tmp_path, **overrides))


def test_missing_and_wrong_shaped_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = make_checkpoint(tmp_path, "llama2")
    weights = load_file(path / "model.safetensors")
    cfg = EngineConfig(model=path, device="cpu", dtype="float32", num_blocks=8)

    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    save_file(missing, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights: layers\.1\.self_attn\.qkv_proj\.weight"):
        LLMEngine(cfg)

    short = dict(weights)
    short["model.layers.0.mlp.up_proj.weight"] = short["model.layers.0.mlp.up_proj.weight"][:100]
    save_file(short, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(100, 64\), model expects \(128, 64\)"):
        LLMEngine(cfg)


def test_pickled_weights_are_never_loaded(tmp_path):
    path = write_config(tmp_path)
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", num_blocks=8))

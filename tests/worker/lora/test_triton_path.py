"""The engine's GPU path (Triton kernels, here under the interpreter) against its CPU path, with adapters.

No GPU is needed: HOTSWAP_FORCE_TRITON=1 sends every kernel call of one engine (paged attention,
K/V store, SGMV shrink/expand over the slots' B^T views) through Triton, while a second engine on
the same weights takes the CPU path (torch references, batched LoRA). On a tiny random Llama.
"""

from __future__ import annotations

import pytest

from tests.worker.lora.test_registration import PARAMS, tiny  # noqa: F401 (fixture)
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

pytest.importorskip("triton")

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18], [19, 20, 21]]
ADAPTERS = ["a", None, "b", "a", "b"]  # base and two adapters of ranks 8 and 16 in one batch


def test_triton_kernels_give_the_cpu_paths_tokens_in_a_mixed_batch(tiny, monkeypatch):  # noqa: F811
    cpu_engine, a, b = tiny
    assert cpu_engine.runner.lora.cpu_batched
    cpu_engine.register_adapter("a", a)
    cpu_engine.register_adapter("b", b)
    want = [r.token_ids for r in cpu_engine.generate(PROMPTS, PARAMS, adapters=ADAPTERS)]
    assert len({tuple(t) for t in want}) > 1  # the adapters change the outputs

    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1")
    triton_engine = LLMEngine(EngineConfig(model=cpu_engine.config.model, device="cpu", dtype="float32",
                                           num_blocks=32, max_loras=2, max_lora_rank=16))
    assert not triton_engine.runner.lora.cpu_batched
    triton_engine.register_adapter("a", a)
    triton_engine.register_adapter("b", b)
    got = [r.token_ids for r in triton_engine.generate(PROMPTS, PARAMS, adapters=ADAPTERS)]
    assert got == want

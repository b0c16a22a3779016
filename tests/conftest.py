"""Shared fixtures: the real demo model (fetched once into the user cache) and its HF twin."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides once, when it is imported, whether it interprets or compiles; engine modules import
# it, so this must happen before any test module is collected. On CPU the kernels run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_model_dir():
    from hotswap.demo_model import fetch_demo_model

    return fetch_demo_model(log=lambda m: None)


@pytest.fixture(scope="session")
def hf_demo_model(demo_model_dir):
    """transformers' own Llama on the same weights, in float32: the reference the engine must match."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    from hotswap.tokenizer import Tokenizer

    return Tokenizer(demo_model_dir)

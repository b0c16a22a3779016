"""store_kv: Triton (interpreted on CPU) vs torch reference vs a per-token python loop."""

import os

import pytest
import torch

from worker.kernels.kv_store import store_kv, store_kv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (num_tokens, num_kv_heads, head_dim, block_size, num_blocks)
CASES = [
    (7, 2, 64, 16, 4),
    (20, 3, 128, 32, 3),
    (5, 1, 80, 8, 6),
    (1, 8, 64, 16, 1),
]


def _make(case, seed, dtype=torch.float32, device=DEVICE):
    num_tokens, kvh, head_dim, block_size, num_blocks = case
    torch.manual_seed(seed)
    # key/value as strided views into a fused qkv buffer, like the model produces them.
    qkv = torch.randn(num_tokens, 3 * kvh, head_dim)
    key, value = qkv[:, kvh:2 * kvh], qkv[:, 2 * kvh:]
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::3] = -1  # padding tokens are skipped
    shape = (num_blocks, block_size, kvh, head_dim)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    to = dict(device=device, dtype=dtype)
    return key.to(**to), value.to(**to), k_cache.to(**to), v_cache.to(**to), slots.to(device)


def _naive_store(key, value, k_cache, v_cache, slot_mapping):
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[i]
            v_cache[slot // block_size, slot % block_size] = value[i]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive(case):
    key, value, k_cache, v_cache, slots = _make(case, seed=sum(case))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_reference(key, value, k_cache, v_cache, slots)
    _naive_store(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, force_triton):
    key, value, k_cache, v_cache, slots = _make(case, seed=sum(case))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    store_kv_reference(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_triton_int32_slots_and_empty(force_triton):
    key, value, k_cache, v_cache, slots = _make(CASES[0], seed=1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots.int())
    store_kv_reference(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    store_kv(key[:0], value[:0], k_cache, v_cache, slots[:0])  # no tokens: no launch, no error
    assert torch.equal(k_cache, k_ref)


@pytest.mark.parametrize("force", [False, True])
def test_bad_shapes(force, monkeypatch):
    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1" if force else "0")
    key, value, k_cache, v_cache, slots = _make(CASES[0], seed=2)
    with pytest.raises(ValueError, match="key must be"):
        store_kv(key[..., :32], value[..., :32], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, value, k_cache, v_cache, slots[:-1])
    with pytest.raises(ValueError, match="v_cache shape"):
        store_kv(key, value, k_cache, v_cache[:, :8], slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA with compiled (not interpreted) Triton")
class TestCompiledCuda:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("case", CASES)
    def test_matches_reference(self, case, dtype):
        key, value, k_cache, v_cache, slots = _make(case, seed=3, dtype=dtype, device="cuda")
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        store_kv(key, value, k_cache, v_cache, slots)
        store_kv_reference(key, value, k_ref, v_ref, slots)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

    def test_casts_to_cache_dtype(self):
        key, value, k_cache, v_cache, slots = _make(CASES[1], seed=4, device="cuda")
        k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        store_kv(key, value, k_cache, v_cache, slots)
        store_kv_reference(key, value, k_ref, v_ref, slots)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_kernel_compiles_for_sm90(compile_sm90):
    compile_sm90("""
from worker.kernels.kv_store import _store_kv_kernel
for dt in ("bf16", "fp32"):
    types = {n: "*" + dt for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")}
    compile_sm90(_store_kv_kernel, {**types, "slot_ptr": "*i64"}, dict(BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128))
""")

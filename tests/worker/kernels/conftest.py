"""Kernel tests: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton picks interpret vs
compile for its own library at import), hence module level here. With CUDA it is left
alone so the kernels compile for real.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def force_triton(monkeypatch):
    """Make the public functions take the Triton path even for CPU tensors (interpreter)."""
    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1")


@pytest.fixture
def no_force_triton(monkeypatch):
    monkeypatch.delenv("HOTSWAP_FORCE_TRITON", raising=False)


def _make_paged(ctx_lens, num_kv_heads, head_dim, block_size, *, dtype=torch.float32, device="cpu",
                table_width=None, spare_blocks=3):
    """A paged K/V cache holding len(ctx_lens) sequences in shuffled physical blocks.

    Slots outside every sequence's context hold NaN and unused block-table entries hold an
    out-of-range id, so any read the kernels should not make shows up in the output.
    Returns a namespace with k_cache, v_cache [num_blocks, block_size, kvh, D],
    block_tables [num_seqs, width] int32, context_lens [num_seqs] int32 and slots (per
    sequence, the flat slot of each logical position, as python lists).
    """
    pages = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(pages) + spare_blocks
    width = max(max(pages, default=0), table_width or 0, 1)
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(ctx_lens), width), num_blocks + 7, dtype=torch.int32)
    slots, used = [], torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for s, (c, n) in enumerate(zip(ctx_lens, pages)):
        blocks, perm = perm[:n], perm[n:]
        block_tables[s, :n] = torch.tensor(blocks, dtype=torch.int32)
        slots.append([blocks[p // block_size] * block_size + p % block_size for p in range(c)])
        used[slots[-1]] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    for cache in (k_cache, v_cache):
        cache.view(num_blocks * block_size, -1)[~used] = float("nan")
    return types.SimpleNamespace(
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        block_tables=block_tables.to(device),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        slots=slots,
    )


@pytest.fixture
def make_paged():
    return _make_paged


# Runs in a fresh interpreter without TRITON_INTERPRET: once triton is imported in
# interpret mode its own library can no longer be compiled.
_SM90_PRELUDE = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("SKIP:", e); sys.exit(0)

def compile_sm90(fn, arg_types, constexprs, **options):
    sig = {p.name: "constexpr" if p.is_constexpr else arg_types.get(p.name, "i32") for p in fn.params}
    k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    assert k.asm["cubin"]
"""


@pytest.fixture
def compile_sm90():
    """Run a script that calls compile_sm90(kernel, {arg: type}, {CONST: value}) ahead of time.

    Catches what the interpreter tolerates but the compiler does not (tl.dot shapes and
    dtypes, control flow, shared memory) without needing a GPU.
    """

    def run(body: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", _SM90_PRELUDE + body + "\nprint('OK')\n"],
                              cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode and "ptxas" in proc.stderr:
            pytest.skip("no usable ptxas in this triton install")
        assert proc.returncode == 0, proc.stderr[-3000:]
        if proc.stdout.startswith("SKIP:"):
            pytest.skip(proc.stdout.strip())
        assert "OK" in proc.stdout

    return run

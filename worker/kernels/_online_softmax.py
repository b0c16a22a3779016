"""The one online-softmax step both paged-attention kernels run per tile of keys (flash attention):
load BLOCK_N keys and values of one kv head through the block table, score them against the query
rows, and fold them into the running max / sum / accumulator (log2 domain, fp32).

Rows are query heads of a GQA group (decode) or query positions (prefill); CAUSAL masks a key
after a row's own position (`q_pos`), otherwise only keys past `end` are masked.
"""

from __future__ import annotations

from worker.kernels._dispatch import jit, tl

LOG2E = 1.4426950408889634  # scores are scaled by scale * LOG2E so the kernels can use exp2


@jit
def attend_tile(
    q, acc, m_i, l_i,  # [ROWS, HEAD_DIM_PAD], [ROWS, HEAD_DIM_PAD] fp32, [ROWS] fp32, [ROWS] fp32
    k_cache_ptr, v_cache_ptr, bt_row, tok0, end, kvh, d, d_mask, q_pos, scale_log2,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd, stride_btb,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    pos = tok0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    valid = pos < end
    block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btb, mask=valid, other=0).to(tl.int64)
    off = pos % BLOCK_SIZE
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + block[:, None] * stride_kb + off[:, None] * stride_kt + kvh * stride_kh
                + d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, HEAD_DIM_PAD]
    if IEEE:  # fp32 inputs: match torch's fp32 matmul instead of TF32
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
    else:
        visible = valid[None, :]
    s = tl.where(visible, s * scale_log2, float("-inf"))  # [ROWS, BLOCK_N]
    # The callers' tiles each hold a key every row sees (decode: any valid key; prefill: position
    # 0 is in the first tile), so m_new is finite and no inf - inf appears.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + block[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh
                + d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, HEAD_DIM_PAD]
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, m_new, l_i

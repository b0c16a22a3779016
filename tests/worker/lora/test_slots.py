"""LoraSlots on their own: placement, rank bookkeeping and the B^T layout (tiny config, no model)."""

import torch

from worker.lora.layout import GROUPS, stack_adapter
from worker.lora.slots import LoraSlots
from worker.models.config import ModelConfig, RopeConfig

CFG = ModelConfig(architecture="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, max_position=64,
                  rope=RopeConfig(theta=10000.0), tie_word_embeddings=True, qkv_bias=False)
DIMS = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
        "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def adapter(name, rank, modules):
    g = torch.Generator().manual_seed(rank)
    tensors = {(layer, m): (torch.randn(rank, DIMS[m][0], generator=g), torch.randn(DIMS[m][1], rank, generator=g))
               for layer in range(CFG.num_layers) for m in modules}
    return stack_adapter(name, tensors, rank, 2.0, CFG, max_rank=16, dtype=torch.float32)


ZOO = {"full-8": adapter("full-8", 8, tuple(DIMS)), "attn-4": adapter("attn-4", 4, ATTENTION),
       "full-16": adapter("full-16", 16, tuple(DIMS)), "attn-16": adapter("attn-16", 16, ATTENTION)}


def make_slots(max_loras=4):
    return LoraSlots(CFG, max_loras=max_loras, max_rank=16, max_cpu_loras=8, device=torch.device("cpu"),
                     dtype=torch.float32, load_host=ZOO.__getitem__)


def test_adapters_on_every_group_fill_from_the_bottom_the_others_from_the_top():
    slots = make_slots()
    assert [slots.acquire(n) for n in ("full-8", "attn-4", "full-16", "attn-16")] == [0, 3, 1, 2]
    assert slots.slot_ranks == [8, 16, 16, 4]
    assert slots.slot_groups[3] == frozenset({"qkv", "o"}) and slots.slot_groups[0] == frozenset(GROUPS)


def test_slot_holds_b_transposed_and_zeroes_rows_a_higher_rank_tenant_left():
    slots = make_slots(max_loras=1)
    slots.release(slots.acquire("full-16"))
    slot = slots.acquire("full-8")
    assert slot == 0 and slots.slot_ranks == [8]
    a = ZOO["full-8"]
    for group in GROUPS:
        for k, bt in enumerate(slots.b[group]):
            assert torch.equal(bt[:, 0, :8], a.b[group][k])  # [L, r, out]
            assert not bt[:, 0, 8:].any()
        a_slot = slots.a[group][:, 0].unflatten(1, (-1, 16))
        assert torch.equal(a_slot[:, :, :8], a.a[group]) and not a_slot[:, :, 8:].any()


def test_stacked_adapter_keeps_lora_b_transposed():
    lora_a, lora_b = torch.randn(4, 32), torch.randn(16, 4)  # down_proj: in 32, out 16
    a = stack_adapter("one", {(1, "down_proj"): (lora_a, lora_b)}, 4, 1.0, CFG, max_rank=16, dtype=torch.float32)
    assert a.groups == frozenset({"down"})
    assert torch.equal(a.b["down"][0][1], lora_b.T) and torch.equal(a.a["down"][1, 0], lora_a)
    assert not a.b["down"][0][0].any()


def test_groups_cover_the_projections_adapters_format_maps_peft_names_onto():
    from adapters.format import SUPPORTED_MODULES

    assert [sub for _, subs in GROUPS.values() for sub in subs] == list(SUPPORTED_MODULES)


def test_module_shapes_agree_with_the_base_model_dims():
    from hotswap.model_dims import ModelDims
    from worker.lora.layout import group_dims

    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32}
    cfg, shapes = ModelConfig.from_dict(raw), ModelDims.from_config(raw, "config.json").projection_shapes()
    for group, (_, subs) in GROUPS.items():
        assert group_dims(cfg, group) == (shapes[subs[0]][0], [shapes[s][1] for s in subs])

"""Throughput of the hotswap engine against plain transformers, on one seeded workload.

Both sides run in this one process on the same requests: random prompt token ids (seeded, no
special ids) and per-request max_tokens, EOS ignored so each request generates exactly its
max_tokens. Side A is what a plain Hugging Face user does: static batches in arrival order,
left-padded, `model.generate` until the batch's longest request is done; only the tokens each
request asked for count. Side B is the engine with continuous batching. Prints a table and the
ratio engine / transformers of generated tokens per second.

    python scripts/bench_engine.py --quick                  # a few minutes on a 2-core CPU
    python scripts/bench_engine.py                          # 64 requests, prompts 16..512, tokens 16..256
    python scripts/bench_engine.py --skip-hf --json bench-engine.json
    python scripts/bench_engine.py --random-model llama3-8b # GPU: Llama-3-8B shape, random bf16 weights
    python scripts/bench_engine.py --no-prefix-caching      # the engine with prefix caching off
    python scripts/bench_engine.py --prefix-overhead --skip-hf  # caching on vs off where nothing is shared
    python scripts/bench_engine.py --shared-prefix [--quick] # prefix caching on vs off vs transformers
    python scripts/bench_engine.py --json-schema [--quick]  # half the requests JSON-schema constrained vs none

`--shared-prefix` is its own workload: 128 requests over 4 system prompts of 600-1,200 tokens, each
with its own 16-64 token suffix and 16-64 output tokens, on the base and 4 adapters; the engine with
prefix caching, the same engine with it off, and transformers + PEFT static batches run it in turn
(throughput, the ratio cache/off, the hit rate), then a sample of the same prompts is sent one at a
time to each engine (median TTFT, cache against off; the caching engine has seen each system prompt
once before the sample, but not the sampled prompts themselves).

`--json-schema` is its own workload on a model with a tokenizer (the demo model): chat prompts asking
for JSON, every other request constrained by its own random JSON schema (scripts/benchkit/json_schemas.py;
compiled when it is added, inside the timed run), greedy; constrained requests end where their JSON
ends, the others generate max_tokens. The same requests then run with no constraint at all, each
generating exactly as many tokens as it did constrained (EOS ignored): the same steps and batch sizes,
so the ratio of generated tokens/s, mixed / unconstrained, is what the grammars cost (goal >= 0.85x).
An unmeasured constrained run first gives those token counts and warms the step shapes; then the two
alternate (unconstrained, constrained, three times each, so a drift of the machine falls on both) and
the ratio is of each side's best run (other load on the machine only ever slows a run down, so the best
is the least disturbed). The prefix cache is emptied and the grammars forgotten before each run.

The default model is the demo model (`hotswap models fetch-demo`). `--random-model` writes a
random-init model to a temp dir first (no tokenizer needed: prompts are token ids), or to
`--random-model-dir`, where a finished one is reused (so several runs build it once). On CUDA
(or anywhere with `--floor`) the report puts the decode step time next to its memory-bandwidth
floor: the bytes a decode step must read (every weight once, plus the running sequences' KV)
over the device copy bandwidth measured in the same run, and over the spec HBM bandwidth
(`--hbm-gb-s`, known for a few GPUs), both overall and at the largest decode batch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchkit.random_models import RANDOM_MODELS, ensure_random_model

_MIN_TOKEN_ID = 10  # keep clear of special ids (unk, bos, eos, pad, ...) at the bottom of the vocab
_WARMUP_PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25]]
_WARMUP_TOKENS = 4

# Spec HBM bandwidth (GB/s) by device name, for the second decode floor (--hbm-gb-s overrides).
SPEC_HBM_GB_S = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "A100-SXM4-80GB": 2039.0}


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    adapters: list[str | None] | None = None  # per request (None = base), with --adapters N

    @property
    def generated_tokens(self) -> int:
        return sum(self.max_tokens)


# -- setup ----------------------------------------------------------------------------------------


def make_workload(vocab_size: int, num_requests: int, prompt_range: tuple[int, int],
                  token_range: tuple[int, int], seed: int) -> Workload:
    """Seeded prompts of random token ids and per-request max_tokens, both uniform in their ranges."""
    rng = random.Random(seed)
    prompts, max_tokens = [], []
    for _ in range(num_requests):
        length = rng.randint(*prompt_range)
        prompts.append([rng.randrange(_MIN_TOKEN_ID, vocab_size) for _ in range(length)])
        max_tokens.append(rng.randint(*token_range))
    return Workload(prompts, max_tokens)


def assign_adapters(workload: Workload, names: list[str], seed: int) -> Workload:
    """Each request to one of the adapters or the base model, uniformly (seeded)."""
    rng = random.Random(seed + 1)
    choices = [*names, None]
    return Workload(workload.prompts, workload.max_tokens, [rng.choice(choices) for _ in workload.prompts])


def base_only(workload: Workload) -> Workload:
    return Workload(workload.prompts, workload.max_tokens, None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # the engine's own default (bf16 on CPUs only with native bf16)
        from worker.engine.config import default_dtype

        return default_dtype(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_usage() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine incl. steal, CPU s of this process); None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_cpu_share(before, after) -> float | None:
    """Fraction of all CPUs that other processes (or the hypervisor) used between two cpu_usage() samples."""
    if before is None or after is None:
        return None
    wall, busy, ours = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - ours) / (wall * os.cpu_count()))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


# -- side A: transformers, static batches ---------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def hf_generate_batch(model, prompts: list[list[int]], new_tokens: int, pad_id: int,
                      adapter_names: list[str] | None = None) -> int:
    """One static batch; returns the tokens it computed (batch size x new_tokens)."""
    input_ids, mask = left_pad(prompts, pad_id, model.device)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}  # PEFT mixed-adapter batch
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=pad_id, **extra)
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"transformers stopped early: {out.shape[1] - input_ids.shape[1]} of {new_tokens} tokens")
    return len(prompts) * new_tokens


def run_hf(model_dir: Path, workload: Workload, batch_size: int, device: torch.device, dtype: torch.dtype,
           adapters: list[tuple[str, Path]] = ()) -> dict:
    from transformers import AutoModelForCausalLM

    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if adapters:  # transformers + PEFT, every adapter loaded, mixed batches by adapter_names
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters[0][1], adapter_name=adapters[0][0]).eval()
        for name, path in adapters[1:]:
            model.load_adapter(path, adapter_name=name)
    load_s = time.perf_counter() - t_load
    config = model.config if not adapters else model.base_model.model.config
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    names = [a or "__base__" for a in workload.adapters] if workload.adapters else None
    hf_generate_batch(model, _WARMUP_PROMPTS, _WARMUP_TOKENS, pad_id, names[:2] if names else None)
    computed = 0
    synchronize(device)
    usage, start = cpu_usage(), time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        computed += hf_generate_batch(model, workload.prompts[i:i + batch_size],
                                      max(workload.max_tokens[i:i + batch_size]), pad_id,
                                      names[i:i + batch_size] if names else None)
    synchronize(device)
    wall = time.perf_counter() - start
    others = other_cpu_share(usage, cpu_usage())
    del model
    release_memory(device)
    return {
        "load_s": load_s,
        "wall_s": wall,
        "generated_tokens": workload.generated_tokens,
        "computed_tokens": computed,  # includes what short requests made while their batch finished
        "tokens_per_s": workload.generated_tokens / wall,
        "batches": -(-len(workload.prompts) // batch_size),
        "other_cpu_share": others,
    }


# -- side B: the engine, continuous batching ------------------------------------------------------


def peek_step(engine) -> tuple[bool, int, int]:
    """Whether the next step is decode-only, the context tokens its running sequences read, and how many run."""
    batcher = engine.batcher
    running = batcher.running
    admits = bool(batcher.waiting) and len(running) < batcher.max_num_seqs
    decode_only = bool(running) and not admits and all(s.num_uncomputed == 1 for s in running)
    return decode_only, sum(s.num_tokens for s in running), len(running)


def drive_engine(engine, workload: Workload, params: list | None = None) -> dict:
    """Add every request at t=0 and step until all finish, timing each step. Default: greedy, EOS
    ignored, exactly max_tokens each; `params` (SamplingParams per request) replaces that, and then the
    counts, texts and finish reasons are only reported, not checked."""
    from worker.engine.sampling_params import SamplingParams

    device = engine.device
    exact = params is None
    if exact:
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in workload.max_tokens]
    synchronize(device)
    start = time.perf_counter()
    adapters = workload.adapters or [None] * len(workload.prompts)
    ids = [engine.add_request(p, sp, adapter=a) for p, sp, a in zip(workload.prompts, params, adapters)]
    index = {rid: i for i, rid in enumerate(ids)}
    counts, ttft, cached = [0] * len(ids), [0.0] * len(ids), [0] * len(ids)
    texts, finish = [""] * len(ids), [None] * len(ids)
    step_s, decode_s, decode_ctx, decode_batch = [], [], [], []
    while engine.has_unfinished():
        decode_only, ctx, batch = peek_step(engine)
        t0 = time.perf_counter()
        outputs = engine.step()  # ends in .tolist(): the step's device work is done when it returns
        t1 = time.perf_counter()
        step_s.append(t1 - t0)
        if decode_only:
            decode_s.append(t1 - t0)
            decode_ctx.append(ctx)
            decode_batch.append(batch)
        for out in outputs:
            i = index[out.request_id]
            if counts[i] == 0:
                ttft[i] = t1 - start
            counts[i] += len(out.new_token_ids)
            cached[i] = out.num_cached_tokens
            texts[i] += out.text
            finish[i] = out.finish_reason
    synchronize(device)
    wall = time.perf_counter() - start
    if exact and counts != workload.max_tokens:
        raise RuntimeError("the engine did not generate exactly max_tokens for every request")
    return {"wall": wall, "counts": counts, "ttft": ttft, "step_s": step_s, "decode_s": decode_s,
            "decode_ctx": decode_ctx, "decode_batch": decode_batch, "cached": cached, "texts": texts,
            "finish_reasons": finish}


def cpu_tuning_options() -> dict:
    """The worker's CPU-path settings (measured once per machine kind, kept in the cache dir). A GPU
    machine may lack the settings package (pydantic); its engine measures nothing, so none are needed."""
    try:
        from hotswap.settings import get_settings
    except ImportError:
        return {}
    settings = get_settings()
    return {"cpu_tuning": settings.cpu_tuning, "cpu_tuning_cache": settings.resolved_cpu_tuning_dir}


def make_engine(model_dir: Path, max_in_flight: int, device: torch.device, dtype: torch.dtype,
                adapters: list[tuple[str, Path]] = (), prefix_caching: bool = True):
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir, device=str(device), dtype=dtype_name(dtype),
                                    max_num_seqs=max_in_flight, max_num_batched_tokens=1024,
                                    max_loras=len(adapters), max_lora_rank=32,
                                    enable_prefix_caching=prefix_caching, **cpu_tuning_options()))
    for name, path in adapters:
        engine.register_adapter(name, path)
    warm = [None, adapters[0][0]] if adapters else [None, None]
    engine.generate(_WARMUP_PROMPTS, SamplingParams(max_tokens=_WARMUP_TOKENS, temperature=0.0, ignore_eos=True),
                    adapters=warm)
    return engine


def run_engine(model_dir: Path, workload: Workload, max_in_flight: int, device: torch.device,
               dtype: torch.dtype, adapters: list[tuple[str, Path]] = (), engine=None,
               bandwidth: float | None = None, spec_bandwidth: float | None = None,
               prefix_caching: bool = True, params: list | None = None) -> dict:
    """One workload through the engine; pass `engine` to reuse a loaded one (it is then kept). With a
    `bandwidth` (bytes/s) the report has the decode bandwidth floor (and with `spec_bandwidth` a second one).
    With `params` (see drive_engine) the report also has each request's output count, text and finish reason."""
    t_load = time.perf_counter()
    own = engine is None
    engine = engine or make_engine(model_dir, max_in_flight, device, dtype, adapters, prefix_caching)
    load_s = time.perf_counter() - t_load
    usage = cpu_usage()
    run = drive_engine(engine, workload, params)
    others = other_cpu_share(usage, cpu_usage())
    steps, decode = run["step_s"], run["decode_s"]
    report = {
        "load_s": load_s,
        "wall_s": run["wall"],
        "generated_tokens": sum(run["counts"]),
        "tokens_per_s": sum(run["counts"]) / run["wall"],
        "steps": len(steps),
        "mean_step_ms": 1e3 * statistics.fmean(steps),
        "decode_steps": len(decode),
        "mean_decode_step_ms": 1e3 * statistics.fmean(decode) if decode else None,
        "other_steps_s": sum(steps) - sum(decode),  # steps with prefill chunks
        "mean_ttft_s": statistics.fmean(run["ttft"]),
        "max_ttft_s": max(run["ttft"]),
        "kv_blocks": engine.blocks.num_blocks,
        "prefix_caching": engine.prefix_cache is not None,
        "cached_prompt_tokens": sum(run["cached"]),  # prompt tokens whose KV came from the prefix cache
        "prompt_tokens": sum(map(len, workload.prompts)),
        "cpu_paths": engine.cpu_paths,
        "other_cpu_share": others,
        # Only meaningful on a GPU (a CPU step is compute-bound): None unless a bandwidth is given.
        "decode_floor": (decode_bandwidth_floor(engine, run, bandwidth, spec_bandwidth)
                         if bandwidth and decode else None),
    }
    if params is not None:
        report["requests"] = {"counts": run["counts"], "texts": run["texts"], "finish_reasons": run["finish_reasons"]}
    if own:
        del engine
        release_memory(device)
    return report


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large copy on the device (each copy reads and writes nbytes)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    seconds = time.perf_counter() - start
    del src, dst
    release_memory(device)
    return 2 * nbytes * repeats / seconds


def spec_hbm_bandwidth(device: torch.device, override_gb_s: float | None) -> float | None:
    """The device's spec HBM bandwidth in bytes/s: --hbm-gb-s, else SPEC_HBM_GB_S by name, else None."""
    if override_gb_s:
        return override_gb_s * 1e9
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gb_s * 1e9 for key, gb_s in SPEC_HBM_GB_S.items() if key in name), None)


def decode_bandwidth_floor(engine, run: dict, bandwidth: float, spec_bandwidth: float | None = None) -> dict:
    """Lower bound of a decode step: every weight once plus every running sequence's KV, at copy speed
    (and at the spec bandwidth); overall and over the steps that ran the largest decode batch."""
    model = engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:  # untied: the embedding is only gathered a row per token
        weight_bytes -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv_per_token = engine.runner.kv_bytes_per_block(model, engine.config.block_size, engine.dtype)
    kv_per_token //= engine.config.block_size

    def floor(step_s: list[float], ctx: list[int]) -> dict:
        kv_bytes = kv_per_token * statistics.fmean(ctx)
        floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth
        mean_ms = 1e3 * statistics.fmean(step_s)
        spec_ms = 1e3 * (weight_bytes + kv_bytes) / spec_bandwidth if spec_bandwidth else None
        return {"steps": len(step_s), "mean_ms": mean_ms, "mean_kv_gb": kv_bytes / 1e9, "floor_ms": floor_ms,
                "x_floor": mean_ms / floor_ms, "spec_floor_ms": spec_ms,
                "x_spec_floor": mean_ms / spec_ms if spec_ms else None}

    batches = run["decode_batch"]
    full = max(batches)
    at_full = [(s, c) for s, c, b in zip(run["decode_s"], run["decode_ctx"], batches) if b == full]
    return {
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "spec_bandwidth_gb_s": spec_bandwidth / 1e9 if spec_bandwidth else None,
        "weight_gb": weight_bytes / 1e9,
        **floor(run["decode_s"], run["decode_ctx"]),
        "full_batch": {"batch": full, **floor([s for s, _ in at_full], [c for _, c in at_full])},
    }


# -- --shared-prefix: prefix caching on vs off ----------------------------------------------------

# Workload sizes of --shared-prefix (full, and with --quick): requests, system prompts and their
# lengths, per-request suffix and output lengths, adapters besides the base.
SHARED_PREFIX = dict(num_requests=128, num_system_prompts=4, min_system=600, max_system=1200, min_prompt=16,
                     max_prompt=64, min_tokens=16, max_tokens=64, adapters=4)
# --quick: 2 system prompts x (base + 2 adapters) = 6 prefixes to share among 24 requests (the full
# run has 4 x 5 = 20 among 128: the cache never shares across weights).
SHARED_PREFIX_QUICK = dict(SHARED_PREFIX, num_requests=24, num_system_prompts=2, min_system=128, max_system=256,
                           min_prompt=8, max_prompt=24, min_tokens=4, max_tokens=12, adapters=2)
SHARED_PREFIX_GOALS = {"cache_vs_off": 3.0, "ttft_ratio": 5.0}  # throughput x, median TTFT x lower
TTFT_SAMPLE = 8


def make_shared_prefix_workload(vocab_size: int, num_requests: int, num_system: int, system_range: tuple[int, int],
                                suffix_range: tuple[int, int], token_range: tuple[int, int],
                                seed: int) -> tuple[Workload, list[int]]:
    """Seeded requests, each one of `num_system` system prompts (uniformly) plus its own suffix; returns
    the workload and, per request, the index of its system prompt."""
    rng = random.Random(seed)
    systems = [[rng.randrange(_MIN_TOKEN_ID, vocab_size) for _ in range(rng.randint(*system_range))]
               for _ in range(num_system)]
    prompts, max_tokens, system_of = [], [], []
    for _ in range(num_requests):
        k = rng.randrange(num_system)
        suffix = [rng.randrange(_MIN_TOKEN_ID, vocab_size) for _ in range(rng.randint(*suffix_range))]
        prompts.append(systems[k] + suffix)
        max_tokens.append(rng.randint(*token_range))
        system_of.append(k)
    return Workload(prompts, max_tokens), system_of


def ttft_sample(prefix_of: list, size: int = TTFT_SAMPLE) -> tuple[list[int], list[int]]:
    """Requests to send one at a time: (warm-ups, sample). `prefix_of`: per request, what it can share
    (its system prompt and adapter: the cache never shares across weights). The sample is the first
    `size` requests whose prefix an earlier request had; the warm-ups, the earlier ones that had it first."""
    seen, warm, sample = set(), [], []
    for i, k in enumerate(prefix_of):
        if len(sample) == size:
            break
        if k in seen:
            sample.append(i)
        else:
            seen.add(k)
            warm.append(i)
    return warm, sample


def sequential_ttft(engine, workload: Workload, warm: list[int], sample: list[int]) -> list[float]:
    """Send the requests one at a time in arrival order (warm-ups first where they came first); the
    time to first token of each sampled one, each alone in the engine."""
    from worker.engine.sampling_params import SamplingParams

    adapters = workload.adapters or [None] * len(workload.prompts)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ttft = []
    for i in sorted(warm + sample):
        synchronize(engine.device)
        start = time.perf_counter()
        rid = engine.add_request(workload.prompts[i], params, adapter=adapters[i])
        while engine.has_unfinished():
            if any(out.request_id == rid for out in engine.step()):
                break
        synchronize(engine.device)
        if i in sample:
            ttft.append(time.perf_counter() - start)
    return ttft


def warm_adapters(engine, adapters: list[tuple[str, Path]]) -> None:
    """One tiny request per adapter, so no measured request pays an adapter's first load."""
    from worker.engine.sampling_params import SamplingParams

    engine.generate([_WARMUP_PROMPTS[0]] * len(adapters), SamplingParams(max_tokens=1, temperature=0.0),
                    adapters=[name for name, _ in adapters])


def benchmark_shared_prefix(args: argparse.Namespace, model_dir: Path) -> dict:
    """The engine with prefix caching, the same engine without, and transformers, on one shared-prefix
    workload; then the TTFT of a sample sent one at a time to each engine."""
    from adapters.synthetic import adapter_zoo

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    vocab_size = model_vocab_size(model_dir)
    workload, system_of = make_shared_prefix_workload(
        vocab_size, args.num_requests, args.num_system_prompts, (args.min_system, args.max_system),
        (args.min_prompt, args.max_prompt), (args.min_tokens, args.max_tokens), args.seed)
    base_config = json.loads((model_dir / "config.json").read_text())
    adapters = adapter_zoo(Path(args.adapter_dir), base_config, args.adapters, seed=args.seed) if args.adapters else []
    if adapters:
        workload = assign_adapters(workload, [n for n, _ in adapters], args.seed)
    hf = None if args.skip_hf else run_hf(model_dir, workload, args.max_in_flight, device, dtype, adapters)
    warm, sample = ttft_sample(list(zip(system_of, workload.adapters or [None] * len(system_of))))
    sides = {}
    for caching in (True, False):
        t_load = time.perf_counter()
        engine = make_engine(model_dir, args.max_in_flight, device, dtype, adapters, prefix_caching=caching)
        warm_adapters(engine, adapters)
        load_s = time.perf_counter() - t_load
        run = run_engine(model_dir, workload, args.max_in_flight, device, dtype, engine=engine)
        run["load_s"] = load_s
        run["hit_rate"] = run["cached_prompt_tokens"] / run["prompt_tokens"]
        run["prefix_evictions"] = engine.blocks.num_evictions
        engine.reset_prefix_cache()  # the sample starts cold: only what the warm-ups leave behind is cached
        run["sequential_ttft_s"] = sequential_ttft(engine, workload, warm, sample)
        run["median_sequential_ttft_s"] = statistics.median(run["sequential_ttft_s"])
        sides[caching] = run
        del engine
        release_memory(device)
    cache, off = sides[True], sides[False]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(model_dir=str(model_dir), model_name=args.random_model or model_dir.name, vocab_size=vocab_size,
                  device=str(device), dtype=dtype_name(dtype), torch_threads=torch.get_num_threads(),
                  cpu_count=os.cpu_count(), prompt_tokens=sum(map(len, workload.prompts)),
                  generated_tokens=workload.generated_tokens, ttft_warmups=len(warm), ttft_sample=len(sample))
    cache_vs_off = cache["tokens_per_s"] / off["tokens_per_s"]
    ttft_ratio = off["median_sequential_ttft_s"] / cache["median_sequential_ttft_s"]
    return {
        "config": config, "transformers": hf, "engine": cache, "engine_no_cache": off,
        "ratio": cache["tokens_per_s"] / hf["tokens_per_s"] if hf else None,
        "no_cache_ratio": off["tokens_per_s"] / hf["tokens_per_s"] if hf else None,
        "cache_vs_off": cache_vs_off, "hit_rate": cache["hit_rate"], "ttft_ratio": ttft_ratio,
        "goals": {name: {"goal": goal, "value": value, "met": value >= goal}
                  for (name, goal), value in zip(SHARED_PREFIX_GOALS.items(), (cache_vs_off, ttft_ratio))},
        "requests_per_adapter": {str(a): (workload.adapters or []).count(a) for a in [*dict(adapters), None]},
    }


def render_shared_prefix_table(report: dict):
    from rich.table import Table

    cfg, hf, cache, off = report["config"], report["transformers"] or {}, report["engine"], report["engine_no_cache"]
    table = Table(title=f"{cfg['model_name']} on {cfg['device']} ({cfg['dtype']}), shared prefixes: {cfg['num_requests']} "
                        f"requests over {cfg['num_system_prompts']} system prompts of {cfg['min_system']}.."
                        f"{cfg['max_system']} tokens, suffixes {cfg['min_prompt']}..{cfg['max_prompt']}, max_tokens "
                        f"{cfg['min_tokens']}..{cfg['max_tokens']}, {cfg['adapters']} adapters + base, seed {cfg['seed']}")
    table.add_column("")
    table.add_column(f"transformers + PEFT\n(static batches of {cfg['max_in_flight']})", justify="right")
    table.add_column(f"engine, no prefix cache\n(<= {cfg['max_in_flight']} in flight)", justify="right")
    table.add_column(f"engine, prefix cache\n(<= {cfg['max_in_flight']} in flight)", justify="right")
    computed = [_fmt(e["prompt_tokens"] - e["cached_prompt_tokens"], "d") for e in (off, cache)]
    rows = [
        ("wall time (s)", _fmt(hf.get("wall_s")), _fmt(off["wall_s"]), _fmt(cache["wall_s"])),
        ("generated tokens/s", _fmt(hf.get("tokens_per_s"), ".1f"), _fmt(off["tokens_per_s"], ".1f"),
         _fmt(cache["tokens_per_s"], ".1f")),
        ("prompt tokens computed", _fmt(cfg["prompt_tokens"], "d") if hf else "-", *computed),
        ("prefix cache hit rate (prompt tokens)", "-", "-", f"{cache['hit_rate']:.1%}"),
        ("steps", "-", _fmt(off["steps"], "d"), _fmt(cache["steps"], "d")),
        ("mean / max TTFT, all at once (s)", "-", f"{off['mean_ttft_s']:.2f} / {off['max_ttft_s']:.2f}",
         f"{cache['mean_ttft_s']:.2f} / {cache['max_ttft_s']:.2f}"),
        (f"median TTFT, {cfg['ttft_sample']} sent one at a time (s)", "-",
         _fmt(off["median_sequential_ttft_s"], ".3f"), _fmt(cache["median_sequential_ttft_s"], ".3f")),
        ("model load (s)", _fmt(hf.get("load_s")), _fmt(off["load_s"]), _fmt(cache["load_s"])),
    ]
    for row in rows:
        table.add_row(*row)
    table.add_section()
    table.add_row("[bold]prefix cache / no cache tok/s[/bold]", "", "", f"[bold]{report['cache_vs_off']:.2f}x[/bold]")
    table.add_row("[bold]median TTFT, no cache / prefix cache[/bold]", "", "", f"[bold]{report['ttft_ratio']:.2f}x[/bold]")
    if report["ratio"] is not None:
        table.add_row("engine / transformers tok/s", "", f"{report['no_cache_ratio']:.2f}x", f"{report['ratio']:.2f}x")
    return table


def print_shared_prefix_report(report: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(render_shared_prefix_table(report))
    labels = {"cache_vs_off": "throughput, prefix cache vs off", "ttft_ratio": "median TTFT, lower by"}
    for name, goal in report["goals"].items():
        verdict = "[green]met[/green]" if goal["met"] else "[red]not met[/red]"
        console.print(f"goal {labels[name]} >= {goal['goal']:.0f}x: {goal['value']:.2f}x {verdict}"
                      + (" (the goals are for the full workload: --quick prompts are short)" if report["config"]["quick"]
                         else ""))
    shares = [(name, report[key]["other_cpu_share"]) for name, key in (("transformers", "transformers"),
              ("engine, cache", "engine"), ("engine, no cache", "engine_no_cache"))
              if report[key] is not None and report[key]["other_cpu_share"] is not None]
    if any(share > 0.1 for _, share in shares):
        console.print("[yellow]note: other processes took " + ", ".join(f"{s:.0%} during the {n} run" for n, s in shares)
                      + f" (of {os.cpu_count()} CPUs): timings are skewed[/yellow]")

# -- --json-schema: structured outputs ------------------------------------------------------------

# Workload sizes of --json-schema (full, and with --quick): requests (every other one constrained) and
# the per-request max_tokens range.
JSON_SCHEMA = dict(num_requests=64, min_tokens=32, max_tokens=128)
JSON_SCHEMA_QUICK = dict(num_requests=16, min_tokens=16, max_tokens=64)
JSON_SCHEMA_GOAL = 0.85  # generated tok/s: half constrained / none constrained
JSON_SCHEMA_PAIRS = 3  # measured runs of each side, alternating


def make_json_schema_workload(tokenizer, num_requests: int, token_range: tuple[int, int],
                              seed: int) -> tuple[Workload, list[dict | None]]:
    """Seeded: one random schema per request and a chat prompt asking for JSON with its fields; every
    other request (the first, third, ...) keeps its schema as its constraint. Returns the workload and
    the constraints (None: unconstrained)."""
    from benchkit.json_schemas import prompt_for, random_schemas

    rng = random.Random(seed)
    schemas = random_schemas(num_requests, seed)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": prompt_for(s)}]) for s in schemas]
    max_tokens = [rng.randint(*token_range) for _ in schemas]
    return Workload(prompts, max_tokens), [s if i % 2 == 0 else None for i, s in enumerate(schemas)]


def json_schema_params(workload: Workload, constraints: list[dict | None]) -> list:
    """Greedy; a constrained request ends where its JSON ends (or at max_tokens), the others ignore EOS."""
    from hotswap.structured import GuidedSpec
    from worker.engine.sampling_params import SamplingParams

    return [SamplingParams(max_tokens=m, temperature=0.0, guided=GuidedSpec.json_schema(c)) if c is not None
            else SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
            for m, c in zip(workload.max_tokens, constraints)]


def exact_params(counts: list[int]) -> list:
    """Unconstrained, greedy, EOS ignored: exactly counts[i] tokens for request i."""
    from worker.engine.sampling_params import SamplingParams

    return [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]


def json_outputs(requests: dict, constraints: list[dict | None]) -> dict:
    """Of the constrained requests: how many their grammar ended (the rest hit max_tokens), and how many
    of those parse as a JSON object."""
    ended = [t for t, f, c in zip(requests["texts"], requests["finish_reasons"], constraints)
             if c is not None and f == "stop"]

    def parses(text: str) -> bool:
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False

    return {"constrained": sum(c is not None for c in constraints), "ended_by_grammar": len(ended),
            "parsed": sum(map(parses, ended))}


@contextlib.contextmanager
def grammar_timer():
    """Seconds spent, while inside, masking logits (sampler.apply_grammar_) and feeding tokens to the
    matchers (LLMEngine._grammar_ends): the grammars' own work in the steps, measured directly. The
    tok/s ratio carries the machine's noise; this does not, or much less."""
    from worker.engine import sampler
    from worker.engine.engine import LLMEngine

    spent = {"mask_s": 0.0, "accept_s": 0.0}
    mask, ends = sampler.apply_grammar_, LLMEngine.__dict__["_grammar_ends"]

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    sampler.apply_grammar_ = timed(mask, "mask_s")
    LLMEngine._grammar_ends = staticmethod(timed(ends.__func__, "accept_s"))
    try:
        yield spent
    finally:
        sampler.apply_grammar_ = mask
        LLMEngine._grammar_ends = ends


def benchmark_json_schema(args: argparse.Namespace, model_dir: Path) -> dict:
    """One engine: an unmeasured constrained run (token counts, warm shapes), then, alternating, the same
    requests with no constraint generating those counts and the constrained run again (grammars compiled
    anew each time). The table shows each side's fastest run; the ratio is of those."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t_load = time.perf_counter()
    engine = make_engine(model_dir, args.max_in_flight, device, dtype, prefix_caching=not args.no_prefix_caching)
    load_s = time.perf_counter() - t_load
    if engine.tokenizer is None:
        raise SystemExit("--json-schema needs a model dir with a tokenizer (grammars are over its vocabulary)")
    engine.grammar.warm()  # xgrammar and the vocabulary tables, once per engine: not part of any run
    workload, constraints = make_json_schema_workload(engine.tokenizer, args.num_requests,
                                                      (args.min_tokens, args.max_tokens), args.seed)
    mixed_params = json_schema_params(workload, constraints)
    grammar = engine.grammar
    engine.reset_prefix_cache()
    counts = drive_engine(engine, workload, mixed_params)["counts"]
    tok_s: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    best: dict[str, dict] = {}
    same_counts = True
    for _ in range(JSON_SCHEMA_PAIRS):
        engine.reset_prefix_cache()
        plain = run_engine(model_dir, workload, args.max_in_flight, device, dtype, engine=engine,
                           params=exact_params(counts))
        engine.reset_prefix_cache()
        grammar.clear()  # each constrained run compiles its schemas, as fresh requests would
        compile_s, misses = grammar.compile_s, grammar.misses
        with grammar_timer() as spent:
            mixed = run_engine(model_dir, workload, args.max_in_flight, device, dtype, engine=engine,
                               params=mixed_params)
        mixed.update(grammar_compile_s=grammar.compile_s - compile_s, grammars_compiled=grammar.misses - misses,
                     grammar_mask_s=spent["mask_s"], grammar_accept_s=spent["accept_s"])
        mixed["grammar_share"] = (mixed["grammar_compile_s"] + spent["mask_s"] + spent["accept_s"]) / mixed["wall_s"]
        same_counts &= mixed["requests"]["counts"] == counts
        for side, run in (("unconstrained", plain), ("constrained", mixed)):
            tok_s[side].append(run["tokens_per_s"])
            if side not in best or run["tokens_per_s"] > best[side]["tokens_per_s"]:
                best[side] = run
    plain, mixed = best["unconstrained"], best["constrained"]
    mixed.update(load_s=load_s, grammar_setup_s=grammar.setup_s, json=json_outputs(mixed["requests"], constraints),
                 same_counts_as_unmeasured_run=same_counts)
    del engine
    release_memory(device)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    lengths = [len(p) for p in workload.prompts]
    config.update(model_dir=str(model_dir), model_name=model_dir.name, device=str(device), dtype=dtype_name(dtype),
                  torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), prompt_tokens=sum(lengths),
                  prompt_range=[min(lengths), max(lengths)], generated_tokens=sum(counts),
                  constrained=sum(c is not None for c in constraints))
    if device.type == "cpu":
        from worker.models.cpu_facts import cpu_facts

        config["cpu"] = cpu_facts()
    ratio = mixed["tokens_per_s"] / plain["tokens_per_s"]
    return {"config": config, "engine": mixed, "engine_unconstrained": plain, "mixed_vs_unconstrained": ratio,
            "runs_tokens_per_s": tok_s,
            "goals": {"mixed_vs_unconstrained": {"goal": JSON_SCHEMA_GOAL, "value": ratio,
                                                 "met": ratio >= JSON_SCHEMA_GOAL}}}


def render_json_schema_table(report: dict):
    from rich.table import Table

    cfg, mixed, plain = report["config"], report["engine"], report["engine_unconstrained"]
    table = Table(title=f"{cfg['model_name']} on {cfg['device']} ({cfg['dtype']}), structured outputs (each side's "
                        "fastest run): "
                        f"{cfg['num_requests']} requests, every other one ({cfg['constrained']}) constrained by its own "
                        f"random JSON schema, greedy; chat prompts {cfg['prompt_range'][0]}..{cfg['prompt_range'][1]} "
                        f"tokens, max_tokens {cfg['min_tokens']}..{cfg['max_tokens']}; the unconstrained run "
                        f"generates exactly the tokens each request did constrained; seed {cfg['seed']}")
    table.add_column("")
    table.add_column(f"none constrained\n(<= {cfg['max_in_flight']} in flight)", justify="right")
    table.add_column(f"half constrained\n(<= {cfg['max_in_flight']} in flight)", justify="right")
    js = mixed["json"]
    rows = [
        ("wall time (s)", _fmt(plain["wall_s"]), _fmt(mixed["wall_s"])),
        ("generated tokens", _fmt(plain["generated_tokens"], "d"), _fmt(mixed["generated_tokens"], "d")),
        ("generated tokens/s", _fmt(plain["tokens_per_s"], ".1f"), _fmt(mixed["tokens_per_s"], ".1f")),
        ("steps", _fmt(plain["steps"], "d"), _fmt(mixed["steps"], "d")),
        ("mean step (ms)", _fmt(plain["mean_step_ms"]), _fmt(mixed["mean_step_ms"])),
        ("mean decode step (ms)", _fmt(plain["mean_decode_step_ms"]), _fmt(mixed["mean_decode_step_ms"])),
        ("mean / max TTFT (s)", f"{plain['mean_ttft_s']:.2f} / {plain['max_ttft_s']:.2f}",
         f"{mixed['mean_ttft_s']:.2f} / {mixed['max_ttft_s']:.2f}"),
        ("schemas compiled in the run (ms)", "-",
         f"{mixed['grammars_compiled']} ({1e3 * mixed['grammar_compile_s']:.0f} ms)"),
        ("masking logits / feeding matchers (ms)", "-",
         f"{1e3 * mixed['grammar_mask_s']:.0f} / {1e3 * mixed['grammar_accept_s']:.0f}"),
        ("grammar work / wall time", "-", f"{mixed['grammar_share']:.1%}"),
        ("constrained: ended by the grammar / parsed", "-",
         f"{js['ended_by_grammar']} of {js['constrained']} / {js['parsed']}"),
    ]
    for row in rows:
        table.add_row(*row)
    table.add_section()
    runs = report["runs_tokens_per_s"]
    table.add_row(f"tok/s of the {len(runs['constrained'])} runs each, alternating",
                  ", ".join(f"{v:.1f}" for v in runs["unconstrained"]), ", ".join(f"{v:.1f}" for v in runs["constrained"]))
    table.add_row("[bold]half constrained / none constrained, best tok/s[/bold]", "",
                  f"[bold]{report['mixed_vs_unconstrained']:.2f}x[/bold]")
    return table


def print_json_schema_report(report: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(render_json_schema_table(report))
    mixed = report["engine"]
    console.print(f"xgrammar setup, once per engine before the runs (import, tokenizer tables): "
                  f"{mixed['grammar_setup_s']:.2f} s")
    goal = report["goals"]["mixed_vs_unconstrained"]
    verdict = "[green]met[/green]" if goal["met"] else "[red]not met[/red]"
    console.print(f"goal half constrained / none constrained >= {goal['goal']:.2f}x: {goal['value']:.2f}x {verdict}")
    if not mixed["same_counts_as_unmeasured_run"]:
        console.print("[yellow]note: the measured constrained run generated other token counts than the first "
                      "one (greedy near-ties): the two sides did not do exactly the same work[/yellow]")
    shares = [(name, report[key]["other_cpu_share"]) for name, key in (("unconstrained", "engine_unconstrained"),
              ("constrained", "engine")) if report[key]["other_cpu_share"] is not None]
    if any(share > 0.1 for _, share in shares):
        console.print("[yellow]note: other processes took " + ", ".join(f"{s:.0%} during the {n} run" for n, s in shares)
                      + f" (of {os.cpu_count()} CPUs): timings are skewed[/yellow]")


# -- report ---------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, transformers, engine) rows; "-" where a side has no such figure."""
    hf, eng = report["transformers"] or {}, report["engine"]
    floor = eng.get("decode_floor") or {}
    waste = 1 - hf["generated_tokens"] / hf["computed_tokens"] if hf else None
    return [
        ("wall time (s)", _fmt(hf.get("wall_s")), _fmt(eng["wall_s"])),
        ("generated tokens", _fmt(hf.get("generated_tokens"), "d"), _fmt(eng["generated_tokens"], "d")),
        ("generated tokens/s", _fmt(hf.get("tokens_per_s"), ".1f"), _fmt(eng["tokens_per_s"], ".1f")),
        ("tokens computed (static waste)",
         f"{hf['computed_tokens']} ({waste:.0%})" if hf else "-", _fmt(eng["generated_tokens"], "d")),
        ("steps", "-", _fmt(eng["steps"], "d")),
        ("mean step (ms)", "-", _fmt(eng["mean_step_ms"])),
        ("decode-only steps", "-", _fmt(eng["decode_steps"], "d")),
        ("mean decode step (ms)", "-", _fmt(eng["mean_decode_step_ms"])),
        ("decode bandwidth floor (ms)", "-", _fmt(floor.get("floor_ms"))),
        ("decode step / floor", "-", _fmt(floor.get("x_floor"), ".2f")),
        ("mean / max TTFT (s)", "-", f"{eng['mean_ttft_s']:.2f} / {eng['max_ttft_s']:.2f}"),
        ("model load (s)", _fmt(hf.get("load_s")), _fmt(eng["load_s"])),
    ]


def render_table(report: dict):
    from rich.table import Table

    cfg = report["config"]
    mix = f", {cfg['adapters']} adapters + base" if cfg.get("adapters") else ""
    table = Table(title=f"{cfg['model_name']} on {cfg['device']} ({cfg['dtype']}){mix}: {cfg['num_requests']} requests, "
                        f"prompts {cfg['min_prompt']}..{cfg['max_prompt']}, max_tokens {cfg['min_tokens']}.."
                        f"{cfg['max_tokens']}, seed {cfg['seed']}")
    table.add_column("")
    hf_name = "transformers + PEFT" if cfg.get("adapters") else "transformers"
    table.add_column(f"{hf_name}\n(static batches of {cfg['max_in_flight']})", justify="right")
    table.add_column(f"hotswap engine\n(<= {cfg['max_in_flight']} in flight)", justify="right")
    for row in table_rows(report):
        table.add_row(*row)
    if report["ratio"] is not None:
        table.add_section()
        table.add_row("[bold]engine / transformers tok/s[/bold]", "", f"[bold]{report['ratio']:.2f}x[/bold]")
    if "mixed_vs_base" in report:
        base = report["engine_base_only"]
        table.add_row("engine, same requests all on base: tok/s", "", f"{base['tokens_per_s']:.1f}")
        table.add_row("[bold]engine mixed-adapter / base-only tok/s[/bold]", "",
                      f"[bold]{report['mixed_vs_base']:.2f}x[/bold]")
    return table


def floor_lines(floor: dict) -> list[str]:
    """The decode step against its bandwidth floor, overall and at the largest batch, in words."""
    full = floor["full_batch"]
    spec = floor["spec_bandwidth_gb_s"]
    lines = [f"decode floor: {floor['weight_gb']:.2f} GB weights + {floor['mean_kv_gb']:.3f} GB KV per step "
             f"(mean over {floor['steps']} decode steps) at {floor['copy_bandwidth_gb_s']:.0f} GB/s measured copy "
             f"bandwidth = {floor['floor_ms']:.2f} ms; measured {floor['mean_ms']:.2f} ms = {floor['x_floor']:.2f}x"]
    if spec:
        lines.append(f"  at the {spec:.0f} GB/s spec HBM bandwidth: floor {floor['spec_floor_ms']:.2f} ms, "
                     f"measured = {floor['x_spec_floor']:.2f}x")
    lines.append(f"  at batch {full['batch']} ({full['steps']} steps, {full['mean_kv_gb']:.3f} GB KV): "
                 f"{full['mean_ms']:.2f} ms vs floor {full['floor_ms']:.2f} ms = {full['x_floor']:.2f}x"
                 + (f" ({full['x_spec_floor']:.2f}x the spec floor {full['spec_floor_ms']:.2f} ms)" if spec else ""))
    return lines


def print_report(report: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(render_table(report))
    if report["config"].get("cpu"):
        from worker.models.cpu_facts import report_lines

        console.print("\n".join(report_lines(report["config"]["cpu"], report["engine"]["cpu_paths"])))
    overhead = report.get("prefix_overhead")
    if overhead:
        runs = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
        console.print(f"prefix caching on vs off, nothing shared (runs off, on, off, on): on {runs(overhead['on_tokens_per_s'])}"
                      f" / off {runs(overhead['off_tokens_per_s'])} tok/s -> [bold]{overhead['on_vs_off']:.3f}x[/bold]")
    floor = report["engine"].get("decode_floor")
    if floor is not None:
        for line in floor_lines(floor):
            console.print(line)
    sides = [(name, report[key]["other_cpu_share"]) for name, key in (("transformers", "transformers"),
             ("engine", "engine")) if report[key] is not None and report[key]["other_cpu_share"] is not None]
    if any(share > 0.1 for _, share in sides):
        shares = ", ".join(f"{share:.0%} during the {name} run" for name, share in sides)
        console.print(f"[yellow]note: other processes took {shares} (of {os.cpu_count()} CPUs): "
                      f"timings are skewed[/yellow]")


# -- CLI ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model dir (default: the demo model)")
    p.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default=None,
                   help="benchmark a random-init model of this shape, saved to a temp dir (overrides --model)")
    p.add_argument("--random-model-dir", type=Path, default=None,
                   help="save the --random-model here instead, and reuse a finished one of the same shape and seed")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-in-flight", type=int, default=16, help="engine max_num_seqs and transformers batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--skip-hf", action="store_true", help="engine only")
    p.add_argument("--floor", action="store_true",
                   help="measure the copy bandwidth and report the decode floor on CPU too (always done on CUDA)")
    p.add_argument("--hbm-gb-s", type=float, default=None,
                   help="spec HBM bandwidth for a second decode floor (default: known for " +
                        ", ".join(SPEC_HBM_GB_S) + ")")
    p.add_argument("--quick", action="store_true", help="16 requests, prompts 16..128, tokens 16..64")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    p.add_argument("--adapters", type=int, default=0,
                   help="N random LoRA adapters (ranks 8/16/32, mixed targets); each request goes to one of them or "
                        "the base, uniformly; transformers side uses PEFT mixed batches, and the engine also runs "
                        "the same requests base-only for the mixed/base ratio")
    p.add_argument("--no-prefix-caching", action="store_true", help="run the engine with prefix caching off")
    p.add_argument("--prefix-overhead", action="store_true",
                   help="the engine on this workload with prefix caching on and off, interleaved (off, on, off, on) "
                        "in this process: what the hashing and bookkeeping cost where nothing is shared")
    p.add_argument("--shared-prefix", action="store_true",
                   help="the shared-prefix workload (see above; --num-requests, --min/--max-prompt for the suffixes, "
                        "--min/--max-tokens, --adapters override its sizes): prefix caching on vs off vs transformers")
    p.add_argument("--num-system-prompts", type=int, default=None, help="--shared-prefix: system prompts (4)")
    p.add_argument("--min-system", type=int, default=None, help="--shared-prefix: shortest system prompt (600)")
    p.add_argument("--max-system", type=int, default=None, help="--shared-prefix: longest system prompt (1200)")
    p.add_argument("--json-schema", action="store_true",
                   help="structured outputs (see above; a model with a tokenizer): half the requests JSON-schema "
                        "constrained vs the same requests unconstrained (--num-requests, --min/--max-tokens override "
                        "its sizes: 64, 32..128; --quick 16, 16..64)")
    args = p.parse_args(argv)
    if args.json_schema and (args.shared_prefix or args.adapters or args.prefix_overhead or args.random_model):
        p.error("--json-schema runs its own workload on a model with a tokenizer: no --shared-prefix, --adapters, "
                "--prefix-overhead or --random-model")
    if args.json_schema:  # its own sizes, where not given on the command line
        for name, value in (JSON_SCHEMA_QUICK if args.quick else JSON_SCHEMA).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    elif args.shared_prefix:  # its own sizes, where not given on the command line
        for name, value in (SHARED_PREFIX_QUICK if args.quick else SHARED_PREFIX).items():
            if getattr(args, name) in (None, p.get_default(name)):
                setattr(args, name, value)
        if not 0 < args.min_system <= args.max_system or args.num_system_prompts < 1:
            p.error("need 0 < --min-system <= --max-system and --num-system-prompts >= 1")
    elif args.quick:
        args.num_requests, args.min_prompt, args.max_prompt, args.min_tokens, args.max_tokens = 16, 16, 128, 16, 64
    if not (0 < args.min_prompt <= args.max_prompt and 0 < args.min_tokens <= args.max_tokens):
        p.error("need 0 < min <= max for prompt lengths and max_tokens")
    if args.num_requests < 1 or args.max_in_flight < 1:
        p.error("--num-requests and --max-in-flight must be >= 1")
    return args


def prefix_overhead(model_dir: Path, workload: Workload, max_in_flight: int, device: torch.device,
                    dtype: torch.dtype) -> dict:
    """The workload through a fresh engine with prefix caching off, on, off, on (interleaved, so a drift
    of the machine falls on both sides). tok/s per run, and mean(on) / mean(off)."""
    tok_s: dict[bool, list[float]] = {False: [], True: []}
    last_on = None
    for caching in (False, True, False, True):
        run = run_engine(model_dir, workload, max_in_flight, device, dtype, prefix_caching=caching)
        tok_s[caching].append(run["tokens_per_s"])
        last_on = run if caching else last_on
        release_memory(device)
    on, off = statistics.mean(tok_s[True]), statistics.mean(tok_s[False])
    return {"on_tokens_per_s": tok_s[True], "off_tokens_per_s": tok_s[False], "on_vs_off": on / off,
            "last_on_run": last_on}


def benchmark(args: argparse.Namespace, model_dir: Path) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    vocab_size = model_vocab_size(model_dir)
    workload = make_workload(vocab_size, args.num_requests, (args.min_prompt, args.max_prompt),
                             (args.min_tokens, args.max_tokens), args.seed)
    adapters: list[tuple[str, Path]] = []
    if args.adapters:
        from adapters.synthetic import adapter_zoo

        base_config = json.loads((model_dir / "config.json").read_text())
        adapters = adapter_zoo(Path(args.adapter_dir), base_config, args.adapters, seed=args.seed)
        workload = assign_adapters(workload, [n for n, _ in adapters], args.seed)
    floor = device.type == "cuda" or args.floor
    bandwidth = copy_bandwidth(device) if floor else None  # before any model or KV cache takes the memory
    spec = spec_hbm_bandwidth(device, args.hbm_gb_s) if floor else None
    hf = None if args.skip_hf else run_hf(model_dir, workload, args.max_in_flight, device, dtype, adapters)
    base_run = None
    if adapters:
        # Mixed traffic and the same requests all on the base model, through one engine (LoRA enabled).
        t_load = time.perf_counter()
        engine = make_engine(model_dir, args.max_in_flight, device, dtype, adapters, not args.no_prefix_caching)
        load_s = time.perf_counter() - t_load
        eng = run_engine(model_dir, workload, args.max_in_flight, device, dtype, engine=engine,
                         bandwidth=bandwidth, spec_bandwidth=spec)
        eng["load_s"] = load_s
        base_run = run_engine(model_dir, base_only(workload), args.max_in_flight, device, dtype, engine=engine,
                              bandwidth=bandwidth, spec_bandwidth=spec)
        del engine
        release_memory(device)
    elif args.prefix_overhead:
        overhead = prefix_overhead(model_dir, workload, args.max_in_flight, device, dtype)
        eng = overhead.pop("last_on_run")
    else:
        eng = run_engine(model_dir, workload, args.max_in_flight, device, dtype, bandwidth=bandwidth,
                         spec_bandwidth=spec, prefix_caching=not args.no_prefix_caching)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(model_dir=str(model_dir), model_name=args.random_model or model_dir.name, vocab_size=vocab_size,
                  device=str(device), dtype=dtype_name(dtype), torch_threads=torch.get_num_threads(),
                  cpu_count=os.cpu_count(), prompt_tokens=sum(map(len, workload.prompts)),
                  generated_tokens=workload.generated_tokens)
    if device.type == "cpu":
        from worker.models.cpu_facts import cpu_facts

        config["cpu"] = cpu_facts()
    ratio = eng["tokens_per_s"] / hf["tokens_per_s"] if hf else None
    report = {"config": config, "transformers": hf, "engine": eng, "ratio": ratio}
    if args.prefix_overhead:
        report["prefix_overhead"] = overhead
    if base_run is not None:
        report["engine_base_only"] = base_run
        report["mixed_vs_base"] = eng["tokens_per_s"] / base_run["tokens_per_s"]
        report["requests_per_adapter"] = {str(a): workload.adapters.count(a) for a in [*dict(adapters), None]}
    return report


@contextlib.contextmanager
def quiet_transformers():
    """Silence generation-flag warnings and load progress bars (they would bury the table), then restore."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with quiet_transformers(), tempfile.TemporaryDirectory(prefix="hotswap-bench-") as tmp:
        if args.random_model:
            device = resolve_device(args.device)
            model_dir = ensure_random_model(args.random_model, args.random_model_dir or Path(tmp) / "model", device,
                                            args.seed)
        elif args.model is not None:
            model_dir = args.model
        else:
            from hotswap.demo_model import fetch_demo_model

            model_dir = fetch_demo_model(log=lambda m: print(m, file=sys.stderr))
        args.adapter_dir = Path(tmp) / "adapters"
        if args.json_schema:
            report = benchmark_json_schema(args, Path(model_dir))
        else:
            report = (benchmark_shared_prefix if args.shared_prefix else benchmark)(args, Path(model_dir))
    if args.json_schema:
        print_json_schema_report(report)
    else:
        (print_shared_prefix_report if args.shared_prefix else print_report)(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

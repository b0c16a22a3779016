"""Serving benchmark of any OpenAI-compatible endpoint, with the metrics of vLLM's `vllm bench serve`.

Requests stream from `/v1/completions` (or `/v1/chat/completions` with --endpoint chat) with
`stream_options.include_usage`; arrivals are Poisson at each --rates value (gamma with --burstiness;
`inf` sends all at once), optionally capped at --concurrency requests in flight; each request's
model is drawn from --models (weights or --zipf) so adapters mix per request. Per sweep point:

    TTFT   send -> first chunk carrying text           TPOT  (E2EL - TTFT) / (output tokens - 1)
    ITL    gaps between text-carrying chunks           E2EL  send -> end of the stream
    request / output / total token throughput over the point's duration (first send -> last answer),
    goodput = requests meeting every --slo-* given, per second; errors by HTTP status; and, with
    --gpu-hour-usd, $ per 1M output (and total) tokens at the measured throughput.

Definitions follow vLLM's benchmark (numpy linear percentiles; TPOT only for outputs of 2+ tokens,
counted as 0 in goodput), with two deliberate differences: TTFT is the first chunk with text (a chat
stream's role-only first chunk does not count), and ITL gaps are between chunks that carry text.
Output lengths: vLLM's random dataset sends `ignore_eos`; the OpenAI API has no such parameter and
hotswap refuses unknown ones, so requests set max_tokens = the shape's output length, greedy, and the
report uses the server's usage.completion_tokens (early stops are counted and shown). Use
--extra-body '{"ignore_eos": true}' for a server that takes it. Prompts are a fixed English passage,
rotated per request and cut to the exact token length with the base model's tokenizer.

    python scripts/bench_serving.py --quick                       # local hotswap stack, a few minutes on CPU
    python scripts/bench_serving.py --compare --quick --json serving.json   # + transformers serve, + adapters
    python scripts/bench_serving.py --url http://host:8000 --api-key KEY --model smollm2-135m-instruct \\
        --models base,support-bot:0.5 --rates 1,2,4,inf --shape 128x32 --json out.json
    python scripts/bench_serving.py --compare --fireworks --random-model llama3-8b --gpu-hour-usd 2.5  # GPU

Without --url a local stack is started (scripts/_stack.py: redis-server, scheduler, --workers
workers, API) with --adapters random LoRAs registered; --compare also starts `transformers serve
--continuous-batching` on the same model dir (or uses --transformers-url) and runs, in this one
process, hotswap base-only, hotswap mixed-adapter and transformers serve on the same requests.
Writes --json and a PNG (--plot, default next to the JSON) of p50/p99 E2EL against throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# Fireworks' published Llama 3 8B table (H100): shape, QPS, their latency and vLLM's (ms).
FIREWORKS = [
    {"input_len": 128, "output_len": 4, "qps": 22.5, "fireworks_ms": 43, "vllm_ms": 247},
    {"input_len": 2000, "output_len": 100, "qps": 1.33, "fireworks_ms": 740, "vllm_ms": 1509},
    {"input_len": 4000, "output_len": 200, "qps": 7.5, "fireworks_ms": 2117, "vllm_ms": 2877},
]
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
RANDOM_MODELS = {  # --random-model shapes; the vocab is the tokenizer's (see build_random_model)
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336),
    "llama3-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256),
}
PASSAGE = (
    "The harbour town woke slowly that winter. Fishing boats came in before dawn with their lamps still lit, "
    "and the market opened as the first light touched the slate roofs. Traders argued about the price of salt, "
    "children ran between the stalls, and an old clockmaker repaired the tower clock that had stopped during "
    "the storm. In the library on the hill a young archivist sorted letters written by sailors two centuries "
    "ago: requests for news from home, lists of supplies, careful drawings of coastlines that no longer look "
    "the same. She copied each one into a ledger, noting the date, the ship and the weather, because the "
    "museum planned an exhibition for the spring. By noon the wind had turned, the gulls moved inland, and the "
    "ferry to the islands left half empty. Engineers from the city inspected the sea wall, measured the cracks "
    "with brass calipers, and wrote that it would hold for another decade if the winters stayed mild. "
    "Nobody believed them, but everyone was glad to hear it. In the evening the bakery sold the last loaves "
    "at half price, the tavern lit its fire, and a fiddler played songs about the northern passage."
).split()


# -- workload -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    input_len: int
    output_len: int

    @property
    def name(self) -> str:
        return f"{self.input_len}x{self.output_len}"


def parse_shape(text: str) -> Shape:
    try:
        a, b = text.lower().split("x")
        shape = Shape(int(a), int(b))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: use INPUTxOUTPUT tokens, e.g. 128x32") from None
    if shape.input_len < 1 or shape.output_len < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: lengths must be >= 1")
    return shape


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        rate = math.inf if part.strip().lower() in ("inf", "infinity") else float(part)
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"rates must be > 0 (or inf), got {part!r}")
        rates.append(rate)
    return rates


def parse_mix(spec: str, base_model: str) -> list[tuple[str, float]]:
    """"base,lora-0:2,lora-1" -> [(base_model, 1), ("lora-0", 2), ("lora-1", 1)]; "base" = base_model."""
    mix = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, weight = part.partition(":")
        w = float(weight) if weight else 1.0
        if w <= 0:
            raise ValueError(f"model weight must be > 0 in {part!r}")
        mix.append((base_model if name == "base" else name, w))
    if not mix:
        raise ValueError("--models names no model")
    return mix


def zipf_mix(names: list[str], s: float) -> list[tuple[str, float]]:
    """Weights 1 / rank**s in the order given (the first is the most popular)."""
    return [(n, 1.0 / (rank ** s)) for rank, n in enumerate(names, start=1)]


def assign_models(n: int, mix: list[tuple[str, float]], seed: int) -> list[str]:
    rng = random.Random(seed + 7)
    names, weights = zip(*mix)
    return rng.choices(names, weights=weights, k=n)


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from start) of n requests: gamma gaps of mean 1/rate (burstiness 1 = Poisson,
    as vLLM draws them); rate inf sends all at t=0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return list(np.cumsum(gaps))


class PromptMaker:
    """Prompts of exact token lengths (as the server counts them) from PASSAGE."""

    def __init__(self, tokenizer, chat: bool = False):
        self.tok, self.chat = tokenizer, chat

    def count(self, text: str) -> int:
        if self.chat:
            return len(self.tok.encode_chat([{"role": "user", "content": text}]))
        return len(self.tok.encode(text))

    def make(self, n_tokens: int, index: int, seed: int) -> str:
        rng = random.Random(seed * 1_000_003 + index)
        start = rng.randrange(len(PASSAGE))
        words = PASSAGE[start:] + PASSAGE[:start]
        text = " ".join(words)
        ids = self.tok.encode(text, add_special_tokens=False)
        while len(ids) < n_tokens + 8:
            text = text + " " + " ".join(words)
            ids = self.tok.encode(text, add_special_tokens=False)
        best, cut = None, n_tokens
        for _ in range(12):  # decode(ids[:cut]) may re-encode to a slightly different length: adjust the cut
            candidate = self.tok.decode(ids[:max(1, cut)])
            got = self.count(candidate)
            if best is None or abs(got - n_tokens) < abs(best[1] - n_tokens):
                best = (candidate, got)
            if got == n_tokens:
                break
            cut += n_tokens - got
            if cut < 1:
                break
        return best[0]


@dataclass
class Workload:
    shape: Shape
    prompts: list[str]
    prompt_lens: list[int]
    models: list[str]


def make_workload(maker: PromptMaker, shape: Shape, n: int, mix: list[tuple[str, float]], seed: int) -> Workload:
    prompts = [maker.make(shape.input_len, i, seed) for i in range(n)]
    return Workload(shape, prompts, [maker.count(p) for p in prompts], assign_models(n, mix, seed))


# -- one request ----------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    model: str
    prompt_len: int                  # client-side count; the server's is prompt_tokens
    max_tokens: int
    send_s: float = 0.0              # when sent, from the point's start
    success: bool = False
    status: int = 0                  # HTTP status (0: no answer)
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    chunks: int = 0
    response_id: str = ""
    text: str = ""
    usage_reported: bool = False


def request_body(model: str, prompt: str, max_tokens: int, chat: bool, temperature: float, extra: dict) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(extra)
    return body


async def send_one(client, url: str, headers: dict, body: dict, record: RequestRecord, chat: bool,
                   tokenizer=None) -> RequestRecord:
    """Stream one request; fills `record` (never raises for a server or transport failure)."""
    import httpx

    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                try:
                    record.error = json.loads(raw)["error"]["message"][:200]
                except (ValueError, KeyError, TypeError):
                    record.error = raw[:200]
                return record
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj and not obj.get("choices"):
                    err = obj["error"]
                    record.error = f"stream error: {err.get('code')}: {str(err.get('message'))[:160]}"
                    return record
                if obj.get("usage"):
                    record.usage_reported = True
                    record.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                    record.prompt_tokens = obj["usage"].get("prompt_tokens")
                record.response_id = record.response_id or obj.get("id", "")
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                    if text:
                        if not record.chunks:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last)
                        last = now
                        record.chunks += 1
                        record.text += text
            record.e2el = time.perf_counter() - start
            if not done and record.finish_reason is None:
                record.error = "stream ended without [DONE]"
                return record
    except (httpx.HTTPError, OSError) as exc:
        record.error = f"transport: {type(exc).__name__}: {exc}"[:200]
        return record
    if not record.usage_reported and tokenizer is not None:  # vLLM's fallback: count the text
        record.output_tokens = len(tokenizer.encode(record.text, add_special_tokens=False))
    record.success = record.chunks > 0 or record.output_tokens == 0
    if not record.success:
        record.error = "no text received"
    return record


# -- metrics (pure) -------------------------------------------------------------------------------


def percentiles(values: list[float], qs=(50, 90, 99), scale: float = 1e3) -> dict:
    """mean, std and the percentiles (numpy 'linear', as vLLM), in ms by default; zeros when empty."""
    arr = np.asarray(values, dtype=float) * scale
    out = {"mean": float(arr.mean()) if arr.size else 0.0, "std": float(arr.std()) if arr.size else 0.0}
    for q in qs:
        out[f"p{q:g}"] = float(np.percentile(arr, q)) if arr.size else 0.0
    return out


def tpot(e2el: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None for outputs of fewer than 2 tokens."""
    return (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None


def is_good(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Meets every SLO given (ttft / tpot / e2el in ms); a 1-token output's TPOT counts as 0 (vLLM)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": tpot(record.e2el, record.ttft, record.output_tokens) or 0.0,
              "e2el": record.e2el}
    return all(values[k] * 1e3 <= limit for k, limit in slo_ms.items())


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = str(r.status) if r.status and r.status != 200 else (r.error.split(":")[0] or "unknown")
            counts[key] = counts.get(key, 0) + 1
    return counts


def compute_metrics(records: list[RequestRecord], duration_s: float, slo_ms: dict[str, float] | None = None,
                    gpu_hour_usd: float | None = None, qs=(50, 90, 99)) -> dict:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := tpot(r.e2el, r.ttft, r.output_tokens)) is not None]
    duration_s = max(duration_s, 1e-9)
    m = {
        "completed": len(ok), "failed": len(records) - len(ok), "errors": error_counts(records),
        "duration_s": duration_s, "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s, "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "ttft_ms": percentiles([r.ttft for r in ok], qs), "tpot_ms": percentiles(tpots, qs),
        "itl_ms": percentiles([g for r in ok for g in r.itl], qs), "e2el_ms": percentiles([r.e2el for r in ok], qs),
        "mean_output_tokens": total_out / len(ok) if ok else 0.0,
        "early_stops": sum(1 for r in ok if r.output_tokens < r.max_tokens),
        "requests_per_model": {m: sum(1 for r in records if r.model == m) for m in sorted({r.model for r in records})},
    }
    if slo_ms:
        good = sum(1 for r in records if is_good(r, slo_ms))
        m.update(slo_ms=dict(slo_ms), good_requests=good, request_goodput=good / duration_s,
                 goodput_fraction=good / len(records) if records else 0.0)
    if gpu_hour_usd:
        per_s = gpu_hour_usd / 3600
        m.update(gpu_hour_usd=gpu_hour_usd,
                 usd_per_1m_output_tokens=per_s / m["output_throughput"] * 1e6 if total_out else None,
                 usd_per_1m_total_tokens=per_s / m["total_token_throughput"] * 1e6 if total_in + total_out else None)
    return m


# -- a sweep point --------------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    url: str
    api_key: str | None
    base_model: str       # the base model's name at this server
    kind: str = "openai"  # hotswap | transformers | openai
    pids: list[int] = field(default_factory=list)  # its processes when started here (for the CPU-share note)


@dataclass
class Series:
    label: str
    target: Target
    mix: list[tuple[str, float]]


async def run_point(target: Target, workload: Workload, rate: float, concurrency: int | None, args,
                    progress=None, task=None, tokenizer=None) -> tuple[list[RequestRecord], float]:
    import httpx

    chat = args.endpoint == "chat"
    url = target.url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    extra = json.loads(args.extra_body) if args.extra_body else {}
    offsets = arrival_offsets(len(workload.prompts), rate, args.burstiness, args.seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    records = [RequestRecord(m, n, workload.shape.output_len) for m, n in zip(workload.models, workload.prompt_lens)]
    failed = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=30), limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal failed
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = request_body(workload.models[i], workload.prompts[i], workload.shape.output_len, chat,
                                args.temperature, extra)
            if sem is not None:
                await sem.acquire()
            try:
                records[i].send_s = time.perf_counter() - start
                await send_one(client, url, headers, body, records[i], chat, tokenizer)
            finally:
                if sem is not None:
                    sem.release()
            failed += not records[i].success
            if progress is not None:
                progress.update(task, advance=1, errors=failed)

        await asyncio.gather(*(one(i) for i in range(len(records))))
        duration = time.perf_counter() - start
    return records, duration


async def warm_up(target: Target, models: list[str], args, tokenizer) -> None:
    """One short request per model, sequentially (loads adapters, compiles, fills caches); not measured."""
    shape = Shape(min(16, args.shapes[0].input_len), 4)
    prompt = PromptMaker(tokenizer, args.endpoint == "chat").make(shape.input_len, 999, args.seed)
    for model in models:
        records, _ = await run_point(target, Workload(shape, [prompt], [shape.input_len], [model]), math.inf, None,
                                     args, tokenizer=tokenizer)
        if not records[0].success:
            raise RuntimeError(f"warm-up request to {target.label} ({model}) failed: "
                               f"{records[0].status} {records[0].error}")


def run_series(series: Series, args, tokenizer, console) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from _stack import CpuMeter

    maker = PromptMaker(tokenizer, args.endpoint == "chat")
    asyncio.run(warm_up(series.target, [m for m, _ in series.mix], args, tokenizer))
    points = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        for shape in args.shapes:
            workload = make_workload(maker, shape, args.num_prompts, series.mix, args.seed)
            for rate in args.rates:
                for conc in args.concurrency:
                    desc = f"{series.label} {shape.name} rate {rate:g}" + (f" conc {conc}" if conc else "")
                    task = progress.add_task(desc, total=len(workload.prompts), errors=0)
                    meter = CpuMeter(series.target.pids).start()
                    records, duration = asyncio.run(run_point(series.target, workload, rate, conc, args,
                                                              progress, task, tokenizer))
                    metrics = compute_metrics(records, duration, args.slo_ms, args.gpu_hour_usd, args.percentiles)
                    metrics.update(meter.stop())
                    point = {"shape": asdict(shape), "rate": None if math.isinf(rate) else rate,
                             "concurrency": conc, "metrics": metrics}
                    if args.keep_requests:
                        point["requests"] = [{k: v for k, v in asdict(r).items() if k != "text"} for r in records]
                    points.append(point)
    return points


# -- targets --------------------------------------------------------------------------------------


def build_random_model(shape: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random-init bf16 Llama of the named shape with the tokenizer of `tokenizer_dir` (vocab = its
    size: random weights would otherwise emit ids the tokenizer cannot decode)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hotswap.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_dir).vocab_size
    config = LlamaConfig(**RANDOM_MODELS[shape], vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def fmt_rate(rate) -> str:
    return "inf" if rate is None else f"{rate:g}"


def run_all(args, console) -> dict:
    from _stack import LocalStack, TransformersServe, default_model_dir
    from hotswap.tokenizer import Tokenizer

    series_out: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        need_local = args.url is None or (args.compare and args.transformers and args.transformers_url is None)
        model_dir = None
        if args.random_model:
            console.print(f"building a random {args.random_model} model (bf16) ...")
            model_dir = build_random_model(args.random_model, Path(tmp) / args.random_model, default_model_dir(),
                                           args.seed)
        elif args.model_dir is not None:
            model_dir = args.model_dir
        elif need_local or args.tokenizer is None:
            model_dir = default_model_dir()
        tokenizer = Tokenizer(args.tokenizer or model_dir)

        def measure(series: Series) -> None:
            console.rule(f"{series.label}: {series.target.url}")
            points = run_series(series, args, tokenizer, console)
            series_out.append({"label": series.label, "kind": series.target.kind, "url": series.target.url,
                               "mix": [[m, w] for m, w in series.mix], "points": points})

        # hotswap (or the one --url target)
        if args.url is None:
            console.print(f"starting a local hotswap stack ({args.workers} worker(s)) ...")
            local = stack.enter_context(LocalStack(workers=args.workers, model_dir=model_dir,
                                                   env=dict(args.stack_env)))
            adapters = [local.add_lora(f"lora-{i}", rank=(8, 16, 32)[i % 3], seed=args.seed + i,
                                       attention_only=bool(i % 2)) for i in range(args.adapters)]
            target = Target("hotswap", local.url, local.key, local.base_model, "hotswap",
                            list(local.pids().values()))
        else:
            adapters = []
            target = Target(args.label, args.url, args.api_key, args.model or "base", args.kind)
        base_only = [(target.base_model, 1.0)]
        if args.models:
            mixed = parse_mix(args.models, target.base_model)
        elif adapters:
            names = [target.base_model, *adapters]
            mixed = zipf_mix(names, args.zipf) if args.zipf else [(n, 1.0) for n in names]
        else:
            mixed = base_only
        if args.zipf and args.models:
            mixed = zipf_mix([m for m, _ in mixed], args.zipf)
        if args.compare:
            measure(Series(f"{target.label} base", target, base_only))
            if mixed != base_only:
                measure(Series(f"{target.label} mixed", target, mixed))
        else:
            measure(Series(target.label if mixed == base_only else f"{target.label} mixed", target, mixed))
        if args.url is None:
            stack.close()  # free the CPU / GPU before the next server starts
        if args.compare and args.transformers:
            if args.transformers_url:
                tf = Target("transformers serve", args.transformers_url, None, args.transformers_model or "",
                            "transformers")
                measure(Series(tf.label, tf, [(tf.base_model, 1.0)]))
            else:
                console.print("starting transformers serve --continuous-batching ...")
                with TransformersServe(model_dir, device=args.device) as srv:
                    tf = Target("transformers serve", srv.url, None, srv.model, "transformers",
                                list(srv.pids().values()))
                    measure(Series(tf.label, tf, [(tf.base_model, 1.0)]))
    return {"config": config_of(args, model_dir), "series": series_out,
            "comparisons": comparisons(series_out), "published": published_rows(series_out)}


def config_of(args, model_dir) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("shapes", "rates", "slo_ms", "stack_env", "api_key")}
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}
    cfg.update(shapes=[asdict(s) for s in args.shapes], rates=[None if math.isinf(r) else r for r in args.rates],
               slo_ms=args.slo_ms, model_dir=str(model_dir) if model_dir else None, cpu_count=os.cpu_count(),
               load_avg_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    return cfg


def _key(point: dict) -> tuple:
    return (point["shape"]["input_len"], point["shape"]["output_len"], point["rate"], point["concurrency"])


def comparisons(series: list[dict]) -> list[dict]:
    """Per sweep point: each other series against the first (output tok/s ratio, p50 E2EL ratio)."""
    if len(series) < 2:
        return []
    ref = series[0]
    ref_points = {_key(p): p["metrics"] for p in ref["points"]}
    out = []
    for other in series[1:]:
        for p in other["points"]:
            a, b = ref_points.get(_key(p)), p["metrics"]
            if a is None or not a["output_throughput"] or not b["output_throughput"]:
                continue
            out.append({"series": other["label"], "against": ref["label"], "shape": p["shape"], "rate": p["rate"],
                        "concurrency": p["concurrency"],
                        "output_throughput_ratio": b["output_throughput"] / a["output_throughput"],
                        "p50_e2el_ratio": b["e2el_ms"]["p50"] / a["e2el_ms"]["p50"] if a["e2el_ms"]["p50"] else None})
    return out


def published_rows(series: list[dict]) -> list[dict]:
    """Our points at the shapes of Fireworks' table, next to their figures (comparable only on a GPU
    with an 8B model at their QPS)."""
    rows = []
    for pub in FIREWORKS:
        for s in series:
            for p in s["points"]:
                if (p["shape"]["input_len"], p["shape"]["output_len"]) == (pub["input_len"], pub["output_len"]):
                    m = p["metrics"]
                    rows.append({**pub, "series": s["label"], "rate": p["rate"], "concurrency": p["concurrency"],
                                 "achieved_qps": m["request_throughput"], "mean_e2el_ms": m["e2el_ms"]["mean"],
                                 "p50_e2el_ms": m["e2el_ms"]["p50"], "p99_e2el_ms": m["e2el_ms"]["p99"]})
    return rows


# -- report ---------------------------------------------------------------------------------------


def _ms(stats: dict, *qs) -> str:
    return " / ".join(f"{stats[q]:.0f}" for q in qs)


def render_tables(report: dict) -> list:
    from rich.table import Table

    cfg = report["config"]
    tables = []
    slo = bool(cfg.get("slo_ms"))
    price = cfg.get("gpu_hour_usd")
    for shape in cfg["shapes"]:
        title = (f"{shape['input_len']} in / {shape['output_len']} out tokens, {cfg['num_prompts']} requests per "
                 f"point, {cfg['endpoint']} endpoint")
        t = Table(title=title)
        for col, just in [("series", "left"), ("rate", "right"), ("conc", "right"), ("ok / err", "right"),
                          ("req/s", "right"), ("out tok/s", "right"), ("total tok/s", "right"),
                          ("TTFT p50/p99 ms", "right"), ("TPOT p50/p99 ms", "right"), ("ITL p50/p99 ms", "right"),
                          ("E2EL p50/p90/p99 ms", "right"), ("out tok/req", "right")]:
            t.add_column(col, justify=just)
        if slo:
            t.add_column("goodput req/s", justify="right")
        if price:
            t.add_column(f"$/1M out tok @ ${price:g}/h", justify="right")
        for s in report["series"]:
            for p in s["points"]:
                if (p["shape"]["input_len"], p["shape"]["output_len"]) != (shape["input_len"], shape["output_len"]):
                    continue
                m = p["metrics"]
                row = [s["label"], fmt_rate(p["rate"]), str(p["concurrency"] or "-"),
                       f"{m['completed']} / {m['failed']}",
                       f"{m['request_throughput']:.2f}", f"{m['output_throughput']:.1f}",
                       f"{m['total_token_throughput']:.1f}", _ms(m["ttft_ms"], "p50", "p99"),
                       _ms(m["tpot_ms"], "p50", "p99"), _ms(m["itl_ms"], "p50", "p99"),
                       _ms(m["e2el_ms"], "p50", "p90", "p99"), f"{m['mean_output_tokens']:.1f}"]
                if slo:
                    row.append(f"{m['request_goodput']:.2f} ({m['goodput_fraction']:.0%})")
                if price:
                    cost = m.get("usd_per_1m_output_tokens")
                    row.append("-" if cost is None else f"{cost:.2f}")
                t.add_row(*row)
        tables.append(t)
    if report["comparisons"]:
        t = Table(title="ratios against " + report["comparisons"][0]["against"])
        for col in ("series", "shape", "rate", "conc", "out tok/s ratio", "p50 E2EL ratio"):
            t.add_column(col, justify="left" if col == "series" else "right")
        for c in report["comparisons"]:
            t.add_row(c["series"], f"{c['shape']['input_len']}x{c['shape']['output_len']}", fmt_rate(c["rate"]),
                      str(c["concurrency"] or "-"), f"{c['output_throughput_ratio']:.2f}x",
                      "-" if c["p50_e2el_ratio"] is None else f"{c['p50_e2el_ratio']:.2f}x")
        tables.append(t)
    if report["published"]:
        t = Table(title="Fireworks' published Llama 3 8B figures (H100) next to ours (comparable only on a GPU, "
                        "8B model, their QPS)")
        for col in ("shape", "published QPS", "Fireworks ms", "vLLM ms", "series", "our rate", "our req/s",
                    "our E2EL mean / p50 ms"):
            t.add_column(col, justify="right")
        for r in report["published"]:
            t.add_row(f"{r['input_len']}x{r['output_len']}", f"{r['qps']:g}", str(r["fireworks_ms"]), str(r["vllm_ms"]),
                      r["series"], fmt_rate(r["rate"]), f"{r['achieved_qps']:.2f}",
                      f"{r['mean_e2el_ms']:.0f} / {r['p50_e2el_ms']:.0f}")
        tables.append(t)
    return tables


def notes(report: dict) -> list[str]:
    out = []
    for s in report["series"]:
        for p in s["points"]:
            m = p["metrics"]
            if m["early_stops"]:
                out.append(f"{s['label']} {p['shape']['input_len']}x{p['shape']['output_len']} rate "
                           f"{fmt_rate(p['rate'])}: {m['early_stops']} of {m['completed']} requests stopped before "
                           f"max_tokens (EOS; no ignore_eos in the OpenAI API)")
            if (m.get("other_cpu_share") or 0) > 0.1:
                out.append(f"{s['label']} {p['shape']['input_len']}x{p['shape']['output_len']} rate "
                           f"{fmt_rate(p['rate'])}: other processes took {m['other_cpu_share']:.0%} of the "
                           f"{os.cpu_count()} CPUs: timings are skewed")
            if m["errors"]:
                out.append(f"{s['label']} rate {fmt_rate(p['rate'])}: errors {m['errors']}")
    return out


def write_plot(report: dict, path: Path) -> bool:
    """p50 (solid) and p99 (dashed) E2EL against output tokens/s, one panel per shape, one colour per series."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = report["config"]["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for i, s in enumerate(report["series"]):
            pts = [p for p in s["points"] if (p["shape"]["input_len"], p["shape"]["output_len"]) ==
                   (shape["input_len"], shape["output_len"]) and p["metrics"]["completed"]]
            if not pts:
                continue
            x = [p["metrics"]["output_throughput"] for p in pts]
            color = f"C{i}"
            ax.plot(x, [p["metrics"]["e2el_ms"]["p50"] for p in pts], "o-", color=color, label=f"{s['label']} p50")
            ax.plot(x, [p["metrics"]["e2el_ms"]["p99"] for p in pts], "x--", color=color, label=f"{s['label']} p99")
            for xi, p in zip(x, pts):
                lab = fmt_rate(p["rate"]) + (f"/c{p['concurrency']}" if p["concurrency"] else "")
                ax.annotate(lab, (xi, p["metrics"]["e2el_ms"]["p50"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(f"{shape['input_len']} in / {shape['output_len']} out")
        ax.set_xlabel("achieved output tokens/s")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("latency vs throughput across the rate sweep (labels: request rate/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- CLI ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("target")
    g.add_argument("--url", default=None, help="an OpenAI-compatible server (default: start a local hotswap stack)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key for --url")
    g.add_argument("--model", default=None, help="the base model's name at --url ('base' in --models means it)")
    g.add_argument("--label", default="target", help="name of the --url series in the report")
    g.add_argument("--kind", default="openai", choices=["hotswap", "transformers", "openai"])
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--compare", action="store_true",
                   help="in one run: hotswap base-only, hotswap mixed-adapter, transformers serve "
                        "--continuous-batching")
    g.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="--compare without transformers")
    g.add_argument("--transformers-url", default=None, help="a running `transformers serve` (else started locally)")
    g.add_argument("--transformers-model", default=None, help="model name at --transformers-url")
    g.add_argument("--workers", type=int, default=1, help="local hotswap workers")
    g.add_argument("--adapters", type=int, default=None, help="random LoRAs registered on the local stack (default: 4 "
                   "with --compare, else 0)")
    g.add_argument("--model-dir", type=Path, default=None, help="model dir of the local servers (default: demo model)")
    g.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default=None,
                   help="local servers serve a random-init bf16 model of this shape (GPU: llama3-8b)")
    g.add_argument("--tokenizer", type=Path, default=None, help="model dir whose tokenizer.json sizes the prompts")
    g.add_argument("--device", default="auto", help="device of a locally started transformers serve")
    g.add_argument("--stack-env", action="append", default=[], metavar="HOTSWAP_X=V",
                   help="extra environment for the local stack's processes (repeatable)")
    w = p.add_argument_group("workload")
    w.add_argument("--shape", dest="shapes", type=parse_shape, action="append", default=None,
                   help="INPUTxOUTPUT tokens, repeatable (default 128x32)")
    w.add_argument("--fireworks", action="store_true", help="the shapes of Fireworks' table: 128x4, 2000x100, 4000x200")
    w.add_argument("--num-prompts", type=int, default=32, help="requests per sweep point")
    w.add_argument("--rates", type=parse_rates, default=[math.inf], help="requests/s, comma list (inf = all at once)")
    w.add_argument("--concurrency", default="", help="max requests in flight, comma list (default: no cap)")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    w.add_argument("--models", default=None, help="mix: base,NAME[:WEIGHT],... ('base' = the base model)")
    w.add_argument("--zipf", type=float, default=None, help="weigh the mix by Zipf(s) popularity in its order")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--extra-body", default=None, help="JSON merged into every request, e.g. '{\"ignore_eos\": true}'")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--timeout", type=float, default=900.0, help="per-request read timeout (s)")
    r = p.add_argument_group("report")
    r.add_argument("--slo-ttft-ms", type=float, default=None)
    r.add_argument("--slo-tpot-ms", type=float, default=None)
    r.add_argument("--slo-e2el-ms", type=float, default=None)
    r.add_argument("--gpu-hour-usd", type=float, default=None,
                   help="$ per hour of the serving machine -> $ per 1M tokens")
    r.add_argument("--percentiles", default="50,90,99")
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None, help="PNG (default: the --json path with .png)")
    r.add_argument("--keep-requests", action="store_true", help="per-request records in the JSON")
    p.add_argument("--quick", action="store_true",
                   help="32x16 tokens, 8 requests, rates 2,inf: minutes on a 2-core CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or [Shape(32, 16)]
        if args.rates == [math.inf]:
            args.rates = [2.0, math.inf]
        if args.num_prompts == 32:
            args.num_prompts = 8
    if args.fireworks:
        args.shapes = [Shape(f["input_len"], f["output_len"]) for f in FIREWORKS] + (args.shapes or [])
    args.shapes = args.shapes or [Shape(128, 32)]
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()] or [None]
        args.percentiles = tuple(float(q) for q in args.percentiles.split(","))
        args.stack_env = [tuple(kv.split("=", 1)) for kv in args.stack_env]
        if args.extra_body:
            json.loads(args.extra_body)
    except ValueError as exc:
        p.error(str(exc))
    if any(c is not None and c < 1 for c in args.concurrency) or args.num_prompts < 1:
        p.error("--concurrency and --num-prompts must be >= 1")
    if args.adapters is None:
        args.adapters = 4 if args.compare and args.url is None else 0
    if args.url and args.adapters:
        p.error("--adapters registers adapters on a local stack; with --url name existing ones in --models")
    if args.url and not args.model:
        p.error("--url needs --model (the base model's name there)")
    if args.transformers_url and not args.transformers_model:
        p.error("--transformers-url needs --transformers-model (the model name that server loaded)")
    args.slo_ms = {k: v for k, v in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms), ("e2el", args.slo_e2el_ms))
                   if v is not None}
    return args


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(stderr=True)
    report = run_all(args, console)
    out = Console(width=None if sys.stdout.isatty() else 220)  # piped: do not squeeze the tables to 80 columns
    for table in render_tables(report):
        out.print(table)
    for line in notes(report):
        out.print(f"[yellow]note:[/yellow] {line}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot is not None:
        if write_plot(report, plot):
            out.print(f"plot: {plot}")
        else:
            out.print("[yellow]no plot: pip install matplotlib[/yellow]")
    return report


if __name__ == "__main__":
    main()

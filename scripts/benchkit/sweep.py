"""A series of sweep points against one target: warm-up, then for each shape x rate x concurrency
cap, the workload's requests sent at their arrival times and measured (benchkit.stats).

`args` is bench_serving's namespace: endpoint, extra_body, burstiness, seed, temperature, timeout,
shapes, rates, concurrency, num_prompts, slo_ms, gpu_hour_usd, percentiles, keep_requests."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field

from benchkit.client import RequestRecord, auth_headers, endpoint_url, http_client, request_body, send_one
from benchkit.stats import compute_metrics
from benchkit.workload import PromptMaker, Shape, Workload, arrival_offsets, make_workload


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
    chat = args.endpoint == "chat"
    url, headers = endpoint_url(target.url, chat), auth_headers(target.api_key)
    extra = json.loads(args.extra_body) if args.extra_body else {}
    offsets = arrival_offsets(len(workload.prompts), rate, args.burstiness, args.seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    records = [RequestRecord(m, n, workload.shape.output_len) for m, n in zip(workload.models, workload.prompt_lens)]
    failed = 0
    async with http_client(args.timeout) as client:
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

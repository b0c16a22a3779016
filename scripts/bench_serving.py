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
import json
import math
import os
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from benchkit.random_models import build_servable_random_model
from benchkit.report import FIREWORKS, comparisons, notes, published_rows, render_tables, write_plot
from benchkit.sweep import Series, Target, run_series
from benchkit.workload import Shape, parse_mix, parse_rates, parse_shape, zipf_mix

# --random-model: the benchkit.random_models shapes served here (built with the tokenizer's vocab)
RANDOM_MODEL_CHOICES = ["llama3-8b", "llama3-tiny"]


def model_mix(args, base_model: str, adapters: list[str]) -> list[tuple[str, float]]:
    """The mixed series' models: --models (Zipf-weighted in its order with --zipf), else the base model
    and the local adapters (equal, or Zipf), else the base model alone."""
    if args.models:
        mix = parse_mix(args.models, base_model)
        return zipf_mix([m for m, _ in mix], args.zipf) if args.zipf else mix
    names = [base_model, *adapters]
    return zipf_mix(names, args.zipf) if args.zipf else [(n, 1.0) for n in names]


def run_all(args, console) -> dict:
    from _stack import LocalStack, TransformersServe, default_model_dir
    from hotswap.tokenizer import Tokenizer

    series_out: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        need_local = args.url is None or (args.compare and args.transformers and args.transformers_url is None)
        model_dir = None
        if args.random_model:
            console.print(f"building a random {args.random_model} model (bf16) ...")
            model_dir = build_servable_random_model(args.random_model, Path(tmp) / args.random_model,
                                                    default_model_dir(), args.seed)
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
        mixed = model_mix(args, target.base_model, adapters)
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
    g.add_argument("--random-model", choices=RANDOM_MODEL_CHOICES, default=None,
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

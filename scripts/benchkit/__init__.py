"""Benchmark code shared by the scripts (bench_serving.py, soak.py, bench_engine.py, bench_swap.py).

A script run as `python scripts/X.py` has scripts/ as sys.path[0], so `import benchkit` needs no
sys.path edit; the tests load scripts the same way (tests/script_modules.py). Modules, one job each:

    workload       prompts of exact token lengths, shapes, rates, arrival times, the model mix
    client         one streamed OpenAI-compatible request -> a RequestRecord (TTFT, ITL, E2EL, usage)
    stats          vLLM's serving metrics over RequestRecords (percentiles, TPOT, goodput, $/token)
    sweep          a series of sweep points against one target (warm-up, arrivals, concurrency cap)
    report         bench_serving's tables, notes, comparisons and plot from its JSON report
    random_models  random-init Llama checkpoints of named shapes (8B on a GPU, tiny on a CPU)

Nothing here reads the environment or does I/O at import time; heavy packages (torch, httpx, rich,
matplotlib, transformers) are imported where they are used.
"""

"""bench_serving's report from its JSON dict: per-shape tables (rich), ratios between series, our
points next to Fireworks' published Llama 3 8B table, notes (early stops, CPU contention, errors) and
the latency-vs-throughput plot."""

from __future__ import annotations

import os
from pathlib import Path

# Fireworks' published Llama 3 8B table (H100): shape, QPS, their latency and vLLM's (ms).
FIREWORKS = [
    {"input_len": 128, "output_len": 4, "qps": 22.5, "fireworks_ms": 43, "vllm_ms": 247},
    {"input_len": 2000, "output_len": 100, "qps": 1.33, "fireworks_ms": 740, "vllm_ms": 1509},
    {"input_len": 4000, "output_len": 200, "qps": 7.5, "fireworks_ms": 2117, "vllm_ms": 2877},
]


def fmt_rate(rate) -> str:
    return "inf" if rate is None else f"{rate:g}"


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

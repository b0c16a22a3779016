"""The `hotswap` command. Heavy modules (torch, the engine) are imported inside the commands that
need them, so `hotswap --help` stays instant and API-only installs work."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.console import err, fail

app = typer.Typer(
    help="hotswap: serve many fine-tunes of one base LLM from your own GPUs.\n\n"
    "New here? Try:  hotswap models fetch-demo  then  hotswap generate --prompt 'Hello' --chat",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models: fetch the demo model.", no_args_is_help=True)
app.add_typer(models_app, name="models")
keys_app = typer.Typer(help="API keys (admin: talks to Redis directly).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _register_subcommands() -> None:
    from cli.adapters import app as adapters_app

    app.add_typer(adapters_app, name="adapters")
    from cli.batch import app as batch_app

    app.add_typer(batch_app, name="batch")


_register_subcommands()




@models_app.command("fetch-demo")
def fetch_demo(
    root: Annotated[Optional[Path], typer.Option(help="Models dir (default: ~/.cache/hotswap/models, or HOTSWAP_MODELS_DIR).")] = None,
) -> None:
    """Download and convert the demo model (SmolLM2-135M-Instruct) once; later runs are instant."""
    from hotswap.demo_model import fetch_demo_model

    try:
        path = fetch_demo_model(root, log=lambda m: err.print(m, highlight=False))
    except Exception as exc:  # network, disk, conversion: say what failed in one line
        fail(f"could not fetch the demo model: {exc}")
    print(path)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to, e.g. acme (created on first key).")],
    redis_url: Annotated[Optional[str], typer.Option(help="Default: HOTSWAP_REDIS_URL.")] = None,
) -> None:
    """Create an API key for a tenant and print it once (only its hash is stored)."""
    import redis

    from api.auth import create_key
    from hotswap.settings import get_settings

    url = redis_url or get_settings().redis_url
    try:
        key = create_key(redis.Redis.from_url(url, socket_timeout=5), tenant)
    except ValueError as exc:
        fail(str(exc))
    except redis.RedisError as exc:
        fail(f"cannot reach Redis at {url}: {exc}")
    err.print(f"API key for tenant {tenant!r} (shown once, keep it safe):")
    print(key)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Run the API server (settings from HOTSWAP_* environment variables)."""
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface the API listens on.")] = "127.0.0.1",
    redis_port: Annotated[Optional[int], typer.Option(help="Embedded Redis port (default: 6379 if free, else any free one).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Redis data, file storage, logs, the API key (default: HOTSWAP_DATA_DIR or ~/.local/share/hotswap).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Workers to run (0: API and scheduler only).")] = 1,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for everything to be ready.")] = 600.0,
) -> None:
    """Run the whole stack here: embedded Redis, file storage, the demo model, scheduler, worker(s), API. Ctrl-C stops it."""
    from cli.up import run_up

    raise typer.Exit(run_up(host=host, port=port, redis_port=redis_port, data_dir=data_dir, workers=workers,
                            startup_timeout_s=startup_timeout))


@app.command()
def scheduler(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run the scheduler: dispatches queued requests to workers by model, requeues a dead worker's work."""
    from hotswap.logs import setup_logging
    from hotswap.settings import get_settings
    from scheduler.main import run_scheduler

    setup_logging(log_level)
    run_scheduler(get_settings())


@app.command()
def worker(
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda:N (default: HOTSWAP_DEVICE).")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run a GPU worker: one engine with the base model, taking batches from the scheduler. One per GPU."""
    from hotswap.logs import setup_logging
    from hotswap.settings import get_settings
    from worker.main import run_worker

    setup_logging(log_level)
    settings = get_settings()
    if device:
        settings = settings.model_copy(update={"device": device})
    try:
        run_worker(settings, loglevel=log_level)
    except ValueError as exc:  # bad engine settings, no CUDA, ...
        fail(str(exc))


@app.command()
def health(
    role: Annotated[str, typer.Argument(help="scheduler | worker: which process on this host to check.")],
) -> None:
    """Exit 0 if that process's heartbeat in Redis is fresh (for container health checks)."""
    import socket

    import redis

    from hotswap.settings import get_settings
    from hotswap import keys
    from scheduler.workers import live_workers

    settings = get_settings()
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        if role == "scheduler":
            ok = bool(client.exists(keys.SCHEDULER_ALIVE))
        elif role == "worker":
            ok = any(w.hostname == socket.gethostname() for w in live_workers(client))
        else:
            fail(f"unknown role {role!r}: use scheduler or worker")
    except redis.RedisError as exc:
        fail(f"cannot reach Redis at {settings.redis_url}: {exc}")
    if not ok:
        fail(f"no fresh heartbeat from a {role} on this host")
    print("ok")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue (or the user message with --chat).")],
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    model: Annotated[Optional[Path], typer.Option(help="A Hugging Face model dir (default: the demo model).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Makes sampling reproducible.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Run the engine once from the shell and stream the answer to stdout."""
    from hotswap.demo_model import demo_model_dir, fetch_demo_model

    if model is None:
        model = demo_model_dir()
        if not (model / "config.json").exists():
            err.print("demo model not found: fetching it once ...")
            model = fetch_demo_model(log=lambda m: err.print(m, highlight=False))
    elif not (model / "config.json").exists():
        fail(f"{model} is not a model dir (no config.json)")

    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0,
                                top_k=top_k, seed=seed, stop=stop or [])
        engine = LLMEngine(EngineConfig(model=model, device=device, max_num_seqs=1, max_num_batched_tokens=2048))
        text = prompt
        if chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            text_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        else:
            text_ids = engine.tokenizer.encode(text)
        finish = None
        for out in engine.generate_stream(text_ids, params):
            print(out.text, end="", flush=True)
            finish = out.finish_reason
        print()
        err.print(f"[dim]finish_reason={finish}[/]")
    except ValueError as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

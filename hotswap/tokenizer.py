"""Tokenizer + chat template from a Hugging Face model dir, without transformers or torch.

Used by the worker (detokenizing, stop strings) and by the API (prompt length checks), so it stays
light: the `tokenizers` Rust library and jinja2 only.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{model_dir} has no tokenizer.json")
        self._tok = RustTokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template_path = model_dir / "chat_template.jinja"
        self.chat_template = template_path.read_text() if template_path.exists() else config.get("chat_template")
        self._token_texts: dict[int, str] = {}  # token_text's cache: at most one entry per vocab id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: a prompt of n characters is at least
        n / max_token_chars tokens, so a longer one is refused without tokenizing it. A vocab entry's
        length is an upper bound (byte-level BPE spells each byte as one character)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens spelled out: how logprobs name it (as vLLM does).
        A token holding part of a multi-byte character decodes to U+FFFD."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages to the prompt text the model was trained on (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template: send a plain prompt instead")
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:  # raise_exception() in the template: the conversation is refused
            raise ValueError(f"the chat template refused the conversation: {exc}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template already writes special tokens: do not add them twice.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # Compiled once per template (a few ms each time otherwise: every chat request renders one).
    # Sandboxed: templates come with user-supplied model dirs.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)

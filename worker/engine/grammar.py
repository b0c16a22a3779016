"""Structured outputs with xgrammar: compile a request's constraint, match its tokens, mask its logits.

- GrammarCompiler (one per engine, made on the first constrained request): xgrammar's compiler over
  the model's tokenizer, with the vocabulary as wide as the model's logits (the model may have more
  rows than the tokenizer has tokens: those are never allowed) and the engine's EOS ids as the stop
  tokens (a matcher allows EOS exactly where the grammar may end). Each constraint is compiled once
  and kept in a bounded LRU keyed by GuidedSpec.key. `json_object` is the schema {"type": "object"}
  (xgrammar's builtin JSON grammar would also allow arrays, strings and numbers at the top).
- A GrammarMatcher per constrained sequence (Sequence.matcher): the sampler asks it for the allowed
  tokens of the next position (`apply_grammar_`), the engine feeds it each token it appends.
- check_json_schema: the up-front check that names what a schema uses and xgrammar cannot enforce.

xgrammar (and the torch / transformers it imports) is imported on first use, so an engine that
never sees a constrained request never loads it.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from hotswap.structured import GuidedSpec

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept (a typical one is well under 1 MB)
# json_schema: compact JSON (", " and ": " separators, no newlines), and strict: no properties or items
# beyond the schema's unless it says so. Outputs stay short and a small model cannot spend its budget
# on blank lines; with the properties closed, xgrammar issue #851 (compact output degrading quality
# where extra keys are open) does not apply.
JSON_FORMAT = dict(any_whitespace=False, strict_mode=True)
# json_object: any object, keys open, so whitespace stays free (the model's own layout; issue #851).
JSON_OBJECT_SCHEMA = '{"type":"object"}'
JSON_OBJECT_FORMAT = dict(any_whitespace=True, strict_mode=True)

# xgrammar 0.2.9 writes the characters of a string with minLength/maxLength as [^"\\\r\n]: raw tabs and other
# control characters pass (JSON forbids them inside strings: json.loads refuses the output) and escapes
# do not. The same class without control characters, as its unbounded strings already have it.
_LOOSE_CHARS = r'[^\"\\\r\n]'
_JSON_CHARS = r'[^\0-\x1f\"\\]'

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the readable part.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def _xgr():
    import xgrammar

    return xgrammar


def unsupported_message(exc: Exception) -> str:
    """xgrammar's error as one readable line, without the C++ source location."""
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


def json_schema_grammar(schema: str):
    """The xgrammar.Grammar of a schema (canonical JSON text), strings without raw control characters."""
    xgr = _xgr()
    grammar = xgr.Grammar.from_json_schema(schema, **JSON_FORMAT)
    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARS, _JSON_CHARS)) if _LOOSE_CHARS in text else grammar


def check_json_schema(schema: dict | str) -> GuidedSpec:
    """The schema as a GuidedSpec, or ValueError naming what is wrong or unsupported ("the JSON schema
    cannot be enforced: Regex parsing error at position 3: Lookbehind is not supported yet."). Needs
    xgrammar (a worker process) but no model: it converts the schema to a grammar, which is where
    xgrammar refuses what it cannot enforce. Keywords it does not know are ignored, not refused."""
    spec = GuidedSpec.json_schema(schema)  # ValueError: not a JSON object, not JSON, too large
    try:
        json_schema_grammar(spec.schema)
    except Exception as exc:  # xgrammar raises RuntimeError (and its own errors) from C++
        raise ValueError(f"the JSON schema cannot be enforced: {unsupported_message(exc)}") from None
    return spec


class GrammarCompiler:
    """Compiles GuidedSpecs for one model's tokenizer; compiled grammars are cached (LRU)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, stop_token_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size  # the model's logits width
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()  # spec.key -> xgrammar.CompiledGrammar
        self._compiler = None
        self.hits = self.misses = 0
        self.compile_s = 0.0  # total time spent compiling (misses)
        self.setup_s = 0.0  # building the compiler: xgrammar import, tokenizer, vocabulary tables

    def _xgr_compiler(self):
        if self._compiler is None:
            start = time.perf_counter()
            xgr = _xgr()
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            # Our LRU is the cache (bounded, and counted): xgrammar's own one would hold a second copy.
            self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
            self.setup_s = time.perf_counter() - start
        return self._compiler

    def warm(self) -> None:
        """Build the compiler now (about a second or more, once) rather than on the first request."""
        self.compile(GuidedSpec.json_object())

    def compile(self, spec: GuidedSpec):
        """The compiled grammar of a spec (xgrammar.CompiledGrammar); ValueError if it cannot be enforced."""
        grammar = self._cache.get(spec.key)
        if grammar is not None:
            self._cache.move_to_end(spec.key)
            self.hits += 1
            return grammar
        compiler = self._xgr_compiler()
        start = time.perf_counter()
        try:
            if spec.kind == "json_object":
                grammar = compiler.compile_json_schema(JSON_OBJECT_SCHEMA, **JSON_OBJECT_FORMAT)
            else:
                grammar = compiler.compile_grammar(json_schema_grammar(spec.schema))
        except Exception as exc:  # RuntimeError from xgrammar's C++ side
            raise ValueError(f"the JSON schema cannot be enforced: {unsupported_message(exc)}") from None
        self.compile_s += time.perf_counter() - start
        self.misses += 1
        self._cache[spec.key] = grammar
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: GuidedSpec):
        """A fresh xgrammar.GrammarMatcher for one sequence (compiling the spec if not cached)."""
        return _xgr().GrammarMatcher(self.compile(spec))

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Forget every compiled grammar (a benchmark measuring cold compiles again)."""
        self._cache.clear()


def apply_grammar_(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence) -> torch.Tensor:
    """Set the tokens each matcher forbids next to -inf, in place, on the given rows only."""
    # logits: [num_rows, vocab] float; matchers[j] constrains logits[rows[j]]
    xgr = _xgr()
    num_rows, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)  # [num_rows, ceil(vocab / 32)] int32 on the CPU
    for row, matcher in zip(rows, matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab,
                                    indices=list(rows))
    return logits

"""The engine: one resident model, a paged KV cache, continuous batching.

    engine = LLMEngine(EngineConfig(model="path/to/hf-dir"))
    engine.add_request("Hello", SamplingParams(max_tokens=32), request_id="r1")
    while engine.has_unfinished():
        for out in engine.step():  # RequestOutput deltas: new tokens and text
            ...

A server drives `step()` itself and routes each output to its request; `generate` and
`generate_stream` are conveniences for a dedicated engine (CLI, tests, benchmarks).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotswap.tokenizer import Tokenizer
from worker.engine.batcher import Batcher, ScheduledChunk
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.errors import AdapterError, RequestRejected
from worker.engine.grammar import GrammarCompiler
from worker.engine.logprobs import TokenLogprob, next_token_entries
from worker.engine.model_runner import ModelRunner, PromptLogits
from worker.engine.prefix_cache import PrefixCache, WeightsId
from worker.engine.sampler import sample_step
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import Sequence, SequenceStatus
from worker.lora.layer import LoraRuntime
from worker.lora.layout import StackedAdapter, stack_adapter
from worker.lora.slots import LoraSlots
from worker.models.loader import load_model
from worker.swap import FullModelSwapper

_MAX_DEFAULT_MODEL_LEN = 32768


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta, for streaming)."""

    request_id: str
    new_token_ids: list[int]
    text: str  # new text since the last output
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int
    logits: torch.Tensor | None = None  # [vocab] float32, only with SamplingParams.return_logits
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at first admission
    # With SamplingParams.logprobs: one entry per token in new_token_ids (None when not asked).
    logprobs: list[TokenLogprob] | None = None
    # With SamplingParams.prompt_logprobs: in the request's first output only, one entry per prompt
    # token (aligned to its prompt token ids, the first entry None); None in every other output.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token, if asked for
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # per generated token, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (first None), if asked


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.kv_dtype = config.kv_torch_dtype(self.device, self.dtype)
        model_dir = Path(config.model)
        self.model = load_model(model_dir, self.dtype, self.device)
        self.model.prepack()
        self.cpu_paths = self._tune_cpu_paths()  # what runs each projection per row count ({} off CPU)
        self.model_config = self.model.config
        self.tokenizer = Tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
        self._base_config_raw = json.loads((model_dir / "config.json").read_text())
        self.lora_slots, lora_runtime = None, None
        if config.max_loras > 0:
            self.lora_slots = LoraSlots(
                self.model_config, config.max_loras, config.max_lora_rank,
                config.max_cpu_loras or 4 * config.max_loras, self.device, self.dtype, self._read_adapter,
            )
            lora_runtime = LoraRuntime(self.model, self.lora_slots)
        self._adapters: dict[str, tuple[Path, object]] = {}  # name -> (dir, adapters.format info)
        self._retired: set[str] = set()  # unregistered: no new requests, queued ones still finish
        self._swapper: FullModelSwapper | None = None  # made on the first full fine-tune
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self.blocks = BlockManager(num_blocks, config.block_size)
        # Weights identity for prefix caching: every register_* gives its name a new generation, so
        # blocks computed under replaced weights never match a request for the new ones.
        self._generations = itertools.count(1)
        self._weights_gen: dict[tuple[str, str], int] = {}  # ("lora" | "ft", name) -> generation
        self.prefix_cache = PrefixCache(self.blocks, self._weights_of) if config.enable_prefix_caching else None
        self.batcher = Batcher(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, self.lora_slots,
                               self.prefix_cache)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, lora_runtime, self.kv_dtype)
        model_len = config.max_model_len or min(self.model_config.max_position, _MAX_DEFAULT_MODEL_LEN)
        # A request must fit the cache on its own, or preemption could never make room for it.
        self.max_model_len = min(model_len, num_blocks * config.block_size)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._grammar: GrammarCompiler | None = None  # made on the first structured-output request
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()

    def _tune_cpu_paths(self) -> dict:
        if self.device.type != "cpu":
            return {}
        from worker.models.cpu_tuning import tune_model

        return tune_model(self.model.linear_sites(), self.config.max_num_seqs, self.config.cpu_tuning,
                          self.config.cpu_tuning_cache)

    def _auto_num_blocks(self) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.model, self.config.block_size, self.kv_dtype)
        if self.device.type != "cuda":
            return max(1, int(self.config.kv_cache_gb * 2**30) // per_block)
        free, total = torch.cuda.mem_get_info(self.device)
        cfg = self.model_config
        # Head-room for one step's activations and logits, so the cache never starves the forward pass.
        act = self.config.max_num_batched_tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
        act += self.config.max_num_seqs * cfg.vocab_size * 4 * 3
        budget = total * self.config.gpu_memory_utilization - (total - free) - act
        if budget < per_block * 16:
            raise ValueError("not enough GPU memory left for a KV cache: lower max_num_batched_tokens or raise gpu_memory_utilization")
        return int(budget // per_block)

    # -- adapters and fine-tunes ------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path) -> None:
        """Make a PEFT LoRA adapter dir servable as `name` (validated now, loaded on first use).
        Names are keys: a server registers immutable versions (`name@3`). Registering a name again
        with other weights is refused while requests use it, so no request mixes two versions."""
        from adapters.format import inspect_lora_adapter

        if self.lora_slots is None:
            raise AdapterError("LoRA is disabled in this engine: start it with max_loras > 0")
        info = inspect_lora_adapter(Path(path), self._base_config_raw, max_rank=self.config.max_lora_rank)
        if name in self._adapters and self.lora_slots.in_use(name):
            raise AdapterError(f"adapter {name!r} is in use by running requests: register new weights under a new name")
        self._adapters[name] = (Path(path), info)
        self._retired.discard(name)
        self.lora_slots.forget(name)
        self._new_generation("lora", name)

    def unregister_adapter(self, name: str) -> None:
        """New requests can no longer use `name`; requests already queued for it still finish."""
        if name in self._adapters:
            self._retired.add(name)
            if self.prefix_cache is not None:  # deleted weights: their blocks are unreachable from now on
                self.prefix_cache.retire(self._adapter_id(name))

    def _read_adapter(self, name: str) -> StackedAdapter:
        from adapters.format import load_lora_tensors

        path, info = self._adapters[name]
        pin = self.device.type == "cuda"
        tensors = load_lora_tensors(path, info)
        return stack_adapter(name, tensors, info.rank, info.scaling, self.model_config,
                             self.config.max_lora_rank, self.dtype, pin=pin)

    def register_finetune(self, name: str, path: str | Path) -> None:
        """Make a full fine-tune (same architecture and dims as the base) servable as `name`."""
        if self._swapper is None:
            self._swapper = FullModelSwapper(self.model, self.config.max_cpu_finetunes)
        resident = name == self._swapper.current
        if resident and self.batcher.running:
            raise AdapterError(f"full fine-tune {name!r} is in use by running requests: register new weights "
                               "under a new name")
        self._swapper.register(name, path)
        if resident:  # the model holds the replaced weights: put the base back, the next use loads the new ones
            self._swapper.swap_to(None)
            self.batcher.swapped_to(None)
        self._new_generation("ft", name)

    def _new_generation(self, kind: str, name: str) -> None:
        old = self._weights_gen.get((kind, name))
        self._weights_gen[(kind, name)] = next(self._generations)
        if old is not None and self.prefix_cache is not None:  # replaced weights: drop their blocks
            self.prefix_cache.retire(f"{kind}:{name}#{old}")

    def _full_id(self, finetune: str | None) -> str:
        return "base" if finetune is None else f"ft:{finetune}#{self._weights_gen[('ft', finetune)]}"

    def _adapter_id(self, adapter: str) -> str:
        return f"lora:{adapter}#{self._weights_gen[('lora', adapter)]}"

    def _weights_of(self, seq: Sequence) -> WeightsId:
        """The identity of the weights a sequence runs on now: full weights and adapter, versioned."""
        return self._full_id(seq.finetune), None if seq.adapter is None else self._adapter_id(seq.adapter)

    @property
    def grammar(self) -> GrammarCompiler:
        """The structured-output compiler (made now if needed; xgrammar loads on its first compile)."""
        if self.tokenizer is None:
            raise RequestRejected("structured outputs need a tokenizer, and this model dir has none")
        if self._grammar is None:
            self._grammar = GrammarCompiler(self.config.model, self.model_config.vocab_size, self.eos_token_ids)
        return self._grammar

    @property
    def adapters(self) -> list[str]:
        return sorted(set(self._adapters) - self._retired)

    @property
    def finetunes(self) -> list[str]:
        return sorted(self._swapper.paths) if self._swapper else []

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None,
                    finetune: str | None = None) -> str:
        """Queue a request for the base model, a LoRA `adapter`, or a full `finetune` (by name)."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already in the engine")
        if adapter is not None and (adapter not in self._adapters or adapter in self._retired):
            raise RequestRejected(f"no LoRA adapter named {adapter!r} is registered")
        if finetune is not None and finetune not in self.finetunes:
            raise RequestRejected(f"no full fine-tune named {finetune!r} is registered")
        if adapter is not None and finetune is not None:
            raise RequestRejected("a request names a LoRA adapter or a full fine-tune, not both")
        if params.stop and self.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer, and this model dir has none")
        token_ids = self._tokenize(prompt)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise RequestRejected(f"stop_token_ids must be in [0, {vocab})")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"maximum context length of {self.max_model_len} tokens"
            )
        matcher = None
        if params.guided is not None:
            # Compiled here, before the sequence reaches the batcher, on the thread that drives step():
            # a cache hit costs microseconds and a new schema a few ms (the first request also loads
            # xgrammar and the tokenizer tables, ~1-3 s once; GrammarCompiler.warm() does it ahead). A
            # background compile would need a "grammar pending" state in the batcher for little gain
            # at these costs. An unsupported schema is refused here, before it takes any KV.
            try:
                matcher = self.grammar.matcher(params.guided)
            except ValueError as exc:
                raise RequestRejected(str(exc)) from None
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, token_ids, params, next(self._arrivals), generator=generator,
                       adapter=adapter, finetune=finetune, matcher=matcher)
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.batcher.add(seq)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("this model dir has no tokenizer: pass token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise RequestRejected("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})")
        return token_ids

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; frees its KV blocks at once. False if it is unknown/finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._detok.pop(request_id, None)
        self.batcher.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        seq.matcher = None
        return True

    def has_unfinished(self) -> bool:
        return self.batcher.has_work()

    @property
    def resident_finetune(self) -> str | None:
        """The full fine-tune whose weights are resident now (None: the base model's)."""
        return self.batcher.current_finetune

    def held_adapters(self) -> list[str]:
        """Names of the LoRA adapters in device slots or the host tier (none when LoRA is off)."""
        return self.lora_slots.held() if self.lora_slots is not None else []

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (e.g. a benchmark measuring a cold cache again); blocks in use
        keep their KV but can no longer be hit. Returns how many blocks were forgotten."""
        return self.blocks.forget(lambda tag: True) if self.prefix_cache is not None else 0

    @property
    def num_running(self) -> int:
        return len(self.batcher.running)

    @property
    def num_waiting(self) -> int:
        return len(self.batcher.waiting)

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.batcher.needs_swap():
            target = self.batcher.swap_target()
            self._swapper.swap_to(target)
            self.model.prepack()
            self.batcher.swapped_to(target)
            if self.prefix_cache is not None:  # the cache survives the swap; the old weights' blocks go first
                self.prefix_cache.demote_except(self._full_id(target))
        plan = self.batcher.plan()
        if not plan:
            return []
        out = self.runner.run(plan, self.blocks)
        for part in out.prompt:
            self._collect_prompt_logprobs(part)
        logits = out.sampled  # [num_sampling, vocab]
        sampling = [c for c in plan.chunks if c.samples]
        for chunk in plan.chunks:
            computed_before = chunk.seq.num_computed_tokens
            chunk.seq.num_computed_tokens += chunk.num_tokens
            if self.prefix_cache is not None:
                self.prefix_cache.commit(chunk.seq, computed_before)
        if not sampling:
            return []
        sampled = sample_step(logits, [c.seq for c in sampling], self.eos_token_ids)
        return [self._append(c, t, logits[i], lp)
                for i, (c, t, lp) in enumerate(zip(sampling, sampled.token_ids, sampled.logprobs))]

    @staticmethod
    def _collect_prompt_logprobs(part: PromptLogits) -> None:
        seq, first, last = part.seq, part.positions.start, part.positions.stop
        if first != len(seq.prompt_logprobs) - 1:  # the runner asks exactly for the next missing ones
            raise RuntimeError(f"prompt logprobs of {seq.request_id} out of order: position {first} "
                               f"after {len(seq.prompt_logprobs)} entries")
        next_ids = seq.prompt_token_ids[first + 1:last + 1]  # logits at q score token q + 1
        seq.prompt_logprobs += next_token_entries(part.logits, next_ids, seq.params.prompt_logprobs)

    def _append(self, chunk: ScheduledChunk, token: int, logits: torch.Tensor,
                logprob: TokenLogprob | None) -> RequestOutput:
        seq, params = chunk.seq, chunk.seq.params
        seq.output_token_ids.append(token)
        detok = self._detok.get(seq.request_id)
        text, reason = "", None
        check_stop = len(seq.output_token_ids) >= params.min_tokens  # as vLLM: no stop before min_tokens
        if seq.matcher is not None and self._grammar_ends(seq, token):
            reason = "stop"  # the grammar took its stop token (EOS), even with ignore_eos
        elif check_stop and (not params.ignore_eos and token in self.eos_token_ids or token in params.stop_token_ids):
            reason = "stop"
        elif detok is not None:
            text, hit_stop = detok.add(token, check_stop)
            reason = "stop" if hit_stop else None
        if reason is None and (len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text += detok.flush() if detok is not None else ""
            self._finish(seq, reason)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            text=text,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
            logits=logits.clone() if params.return_logits else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
            logprobs=None if logprob is None else [logprob],
            prompt_logprobs=self._take_prompt_logprobs(seq),
        )

    @staticmethod
    def _grammar_ends(seq: Sequence, token: int) -> bool:
        """Feed the token to the sequence's matcher; whether the grammar has now ended."""
        if not seq.matcher.accept_token(token):  # the mask allowed only tokens the matcher accepts
            raise RuntimeError(f"request {seq.request_id}: token {token} was sampled against its grammar")
        return seq.matcher.is_terminated()

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
        """The prompt logprobs, the first time a request outputs anything (then None)."""
        if seq.params.prompt_logprobs is None or seq.prompt_logprobs_sent:
            return None
        if len(seq.prompt_logprobs) != len(seq.prompt_token_ids):
            raise RuntimeError(f"prompt logprobs of {seq.request_id} incomplete: {len(seq.prompt_logprobs)} "
                               f"of {len(seq.prompt_token_ids)}")
        seq.prompt_logprobs_sent = True
        return list(seq.prompt_logprobs)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.matcher = None
        self.batcher.remove(seq)
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)

    # -- conveniences for a dedicated engine ----------------------------------------------------

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Add one request and drive the engine until it finishes, yielding its deltas."""
        request_id = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(request_id)  # a caller that stops iterating frees the request's blocks

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[str | None] | None = None,
                 finetunes: list[str | None] | None = None) -> list[GenerationResult]:
        """Run all prompts together (continuous batching) and return results in prompt order.
        `adapters` / `finetunes`: per prompt, the LoRA or full fine-tune to use (None = base)."""
        n = len(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * n
        adapters, finetunes = adapters or [None] * n, finetunes or [None] * n
        if not len(params) == len(adapters) == len(finetunes) == n:
            raise ValueError("give one SamplingParams (or adapter, fine-tune) per prompt")
        ids = [self.add_request(p, sp, adapter=a, finetune=f)
               for p, sp, a, f in zip(prompts, params, adapters, finetunes)]
        results = {
            rid: GenerationResult(rid, self._seqs[rid].prompt_token_ids, [], "", "",
                                  logprobs=None if sp.logprobs is None else [])
            for rid, sp in zip(ids, params)
        }
        while self.has_unfinished():
            for out in self.step():
                res = results.get(out.request_id)
                if res is None:
                    continue  # someone else's request sharing this engine
                res.token_ids += out.new_token_ids
                res.text += out.text
                if out.logits is not None:
                    res.logits.append(out.logits)
                if out.logprobs is not None:
                    res.logprobs += out.logprobs
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                res.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    res.finish_reason = out.finish_reason
        return [results[rid] for rid in ids]

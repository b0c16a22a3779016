"""Structured outputs (xgrammar) through the engine on the real demo model, float32 on the CPU: random
JSON schemas at temperature 1.0 give valid JSON, json_object gives an object, constrained rows share
steps with unconstrained ones and a LoRA adapter without changing them, the mask touches only
constrained rows, logprobs stay raw, preemption and finishing keep the matcher consistent, and
unsupported schemas are refused by name."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from hotswap.structured import GuidedSpec
from tests.factories import make_peft_adapter
from tests.script_modules import benchkit_module
from worker.engine.batcher import StepPlan
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.errors import RequestRejected
from worker.engine.grammar import GrammarCompiler, check_json_schema
from worker.engine.sampler import adjust_logits
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import Sequence

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SHIRT = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "size": {"type": "integer", "minimum": 30, "maximum": 60}},
         "required": ["color", "size"], "additionalProperties": False}
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def adapter_dir(demo_model_dir, tmp_path_factory):
    return make_peft_adapter(demo_model_dir, tmp_path_factory.mktemp("grammar-adapter") / "qv", seed=7, r=8,
                             lora_alpha=16, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def engine(demo_model_dir, adapter_dir):
    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_num_seqs=64,
                                    max_num_batched_tokens=1024, num_blocks=512, max_loras=1, max_lora_rank=16))
    engine.register_adapter("qv", adapter_dir)
    return engine


@pytest.fixture(scope="module")
def schemas():
    with benchkit_module("json_schemas") as module:
        yield module


def chat(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


@pytest.mark.slow
def test_fifty_random_schemas_at_temperature_one_give_valid_json(engine, schemas):
    """All in one generate call (one batch): every output that ends by itself parses and validates."""
    cases = schemas.random_schemas(50, seed=0)
    prompts = [chat(engine, schemas.prompt_for(s)) for s in cases]
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, guided=GuidedSpec.json_schema(s))
              for i, s in enumerate(cases)]
    results = engine.generate(prompts, params)
    stopped = [(s, r) for s, r in zip(cases, results) if r.finish_reason == "stop"]
    assert {r.finish_reason for r in results} <= {"stop", "length"}
    assert len(stopped) >= 0.8 * len(cases), [r.text for r in results if r.finish_reason != "stop"]
    for schema, result in stopped:
        assert result.token_ids[-1] in engine.eos_token_ids  # the grammar ended on its stop token
        jsonschema.validate(json.loads(result.text), schema)  # json.loads is strict: no raw control chars


def test_json_object_outputs_parse_as_objects(engine):
    prompts = [chat(engine, "Give me a JSON object describing a cat, with its name and age."),
               chat(engine, "Return a JSON object with the keys city and country.")]
    params = [SamplingParams(max_tokens=96, guided=GuidedSpec.json_object(), **GREEDY),
              SamplingParams(max_tokens=96, temperature=1.0, seed=3, guided=GuidedSpec.json_object())]
    for result in engine.generate(prompts, params):
        assert result.finish_reason == "stop", result.text
        assert isinstance(json.loads(result.text), dict)


def test_a_mixed_step_leaves_unconstrained_requests_and_the_adapter_alone(engine):
    """Constrained and unconstrained requests, on the base and on a LoRA adapter, in one generate call:
    each one's greedy tokens are those it gets alone; the constrained ones are valid JSON."""
    prompts = [chat(engine, "Describe a person as JSON."), chat(engine, "What is the capital of France?"),
               chat(engine, "Describe a shirt as JSON."), chat(engine, "Name three colors.")]
    params = [SamplingParams(max_tokens=32, guided=GuidedSpec.json_schema(PERSON), **GREEDY),
              SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY),
              SamplingParams(max_tokens=32, guided=GuidedSpec.json_schema(SHIRT), **GREEDY),
              SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY)]
    adapters = [None, None, "qv", "qv"]
    mixed = engine.generate(prompts, params, adapters=adapters)
    for prompt, p, adapter, got in zip(prompts, params, adapters, mixed):
        alone = engine.generate([prompt], p, adapters=[adapter])[0]
        assert got.token_ids == alone.token_ids, (adapter, p.guided)
    assert [r.finish_reason for r in mixed] == ["stop", "length", "stop", "length"]
    jsonschema.validate(json.loads(mixed[0].text), PERSON)
    jsonschema.validate(json.loads(mixed[2].text), SHIRT)


def test_the_mask_touches_only_constrained_rows(engine):
    vocab = engine.model_config.vocab_size
    logits = torch.randn(3, vocab)
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=8), i) for i in range(3)]
    assert adjust_logits(logits, seqs, engine.eos_token_ids) is logits  # nobody constrained: no copy, no mask
    seqs[1].matcher = engine.grammar.matcher(GuidedSpec.json_schema(PERSON))
    adjusted = adjust_logits(logits, seqs, engine.eos_token_ids)
    assert torch.equal(adjusted[0], logits[0]) and torch.equal(adjusted[2], logits[2])
    allowed = torch.isfinite(adjusted[1])
    assert 0 < int(allowed.sum()) < vocab // 100  # the opening of an object: "{" and a few merges of it
    assert torch.equal(adjusted[1][allowed], logits[1][allowed])
    assert all(engine.tokenizer.decode([t]).startswith("{") for t in allowed.nonzero().flatten().tolist())
    assert not allowed[sorted(engine.eos_token_ids)].any()  # an empty output is not JSON: no EOS yet
    assert torch.isfinite(logits).all()  # the input stays raw


def test_logprobs_are_of_the_raw_logits_not_the_masked_ones(engine):
    prompt = chat(engine, "Say hello.")
    free = engine.generate([prompt], SamplingParams(max_tokens=1, logprobs=5, **GREEDY))[0]
    bound = engine.generate([prompt], SamplingParams(max_tokens=1, logprobs=5, guided=GuidedSpec.json_object(),
                                                     **GREEDY))[0]
    assert engine.tokenizer.decode(bound.token_ids).startswith("{") and bound.token_ids != free.token_ids
    (top_bound, top_free) = ([t for t, _ in r.logprobs[0].top] for r in (bound, free))
    assert top_bound == top_free  # the same raw top 5, "{" among them or not (the prompt's KV may come
    # from the prefix cache the second time: equal up to float rounding, as in test_logprobs)
    assert [v for _, v in bound.logprobs[0].top] == pytest.approx([v for _, v in free.logprobs[0].top], abs=1e-4)
    assert bound.logprobs[0].logprob < free.logprobs[0].logprob  # the grammar's choice, scored unmasked


def test_max_tokens_cuts_with_length_and_ignore_eos_still_ends_with_the_grammar(engine):
    prompt = chat(engine, "Describe a person as JSON.")
    cut = engine.generate([prompt], SamplingParams(max_tokens=3, guided=GuidedSpec.json_schema(PERSON), **GREEDY))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
    free = engine.generate([prompt], SamplingParams(max_tokens=48, guided=GuidedSpec.json_schema(PERSON),
                                                    ignore_eos=True, **GREEDY))[0]
    assert free.finish_reason == "stop" and len(free.token_ids) < 48
    jsonschema.validate(json.loads(free.text), PERSON)


def test_preemption_mid_output_keeps_the_matcher_consistent(engine):
    """Recompute keeps the output tokens the matcher has accepted: the same greedy JSON as without."""
    prompt = chat(engine, "Describe a person as JSON.")
    params = SamplingParams(max_tokens=32, guided=GuidedSpec.json_schema(PERSON), **GREEDY)
    expected = engine.generate([prompt], params)[0]
    rid = engine.add_request(prompt, params)
    seq = engine._seqs[rid]
    tokens = []
    while len(tokens) < 4:
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    engine.batcher._preempt(seq, StepPlan())
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert seq.num_preemptions == 1
    assert tokens == expected.token_ids and seq.finish_reason == "stop"
    assert seq.matcher is None  # dropped when it finished


def test_aborted_requests_drop_their_matchers(engine):
    rid = engine.add_request(chat(engine, "JSON please."), SamplingParams(max_tokens=8, guided=GuidedSpec.json_object()))
    seq = engine._seqs[rid]
    assert seq.matcher is not None
    engine.step()
    assert engine.abort(rid) and seq.matcher is None and seq.finish_reason == "abort"


def test_unsupported_schemas_are_refused_by_name_before_queueing(engine):
    lookbehind = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    with pytest.raises(ValueError, match="Lookbehind is not supported"):
        check_json_schema(lookbehind)
    with pytest.raises(ValueError, match='Unsupported type "color"'):
        check_json_schema({"type": "color"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        check_json_schema("[1, 2]")
    waiting = engine.num_waiting
    with pytest.raises(RequestRejected, match="Lookbehind is not supported"):
        engine.add_request("hi", SamplingParams(guided=GuidedSpec.json_schema(lookbehind)))
    assert engine.num_waiting == waiting and not engine.has_unfinished()


def test_length_bounded_strings_refuse_raw_control_characters(engine):
    """xgrammar 0.2.9 lets a raw tab or \\x01 into a string with maxLength (invalid JSON); ours does not."""
    spec = GuidedSpec.json_schema({"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}},
                                   "required": ["s"]})
    for text, ok in (('{"s": "a\tb"}', False), ('{"s": "a\x01b"}', False), ('{"s": "a b"}', True)):
        matcher = engine.grammar.matcher(spec)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        accepted = all(matcher.accept_token(t) for t in ids)
        assert accepted == ok and (not ok or matcher.is_completed()), text


def test_a_schema_compiles_once_and_the_cache_is_bounded(demo_model_dir, engine):
    compiler = engine.grammar
    spec = GuidedSpec.json_schema({"type": "object", "properties": {"zeta": {"type": "boolean"}}})
    misses, hits = compiler.misses, compiler.hits
    first = compiler.compile(spec)
    again = compiler.compile(GuidedSpec.json_schema(json.dumps({"type": "object", "properties": {"zeta": {"type": "boolean"}}})))
    assert again is first and (compiler.misses, compiler.hits) == (misses + 1, hits + 1)
    small = GrammarCompiler(demo_model_dir, engine.model_config.vocab_size, engine.eos_token_ids, cache_size=2)
    specs = [GuidedSpec.json_schema({"type": "integer", "minimum": i}) for i in range(3)]
    for s in specs:
        small.compile(s)
    assert small.num_cached == 2 and small.misses == 3
    small.compile(specs[0])  # evicted (least recently used): compiled again
    assert small.misses == 4


def test_sampling_params_check_the_constraint():
    with pytest.raises(ValueError, match="GuidedSpec"):
        SamplingParams(guided={"kind": "json_object"})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=8, min_tokens=2, guided=GuidedSpec.json_object())

"""Log-probabilities end to end on a live stack (real Redis, scheduler, Celery worker with the demo
model in float32, the API over HTTP; the official `openai` client and raw SSE): the values the API
returns equal log_softmax of transformers' logits (PEFT for adapters) within 1e-4, at every generated
position and, with echo, every prompt position, for the base and two adapters running concurrently in
the worker; the top-k are the true top-k; streams and batch jobs carry the same values."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from scheduler.queues import Queues

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
TOL = 1e-4
QUESTIONS = ["Name a famous painter.", "What is the capital of Italy?"]
TEXTS = ["The quick brown fox jumps over the lazy dog because", "In 1492, Columbus sailed",
         "def add(a, b):\n    return"]
MAX_DIFF = {"generated": 0.0, "prompt": 0.0}  # the largest |logprob - transformers'| seen, reported at the end


@pytest.fixture(scope="module")
def stack(live_stack, tmp_path_factory, demo_model_dir):
    """The live stack with a second adapter of the same tenant ("qa-bot", other modules and rank)."""
    from adapters.format import inspect_lora_adapter
    from tests.factories import make_peft_adapter

    qa_dir = make_peft_adapter(demo_model_dir, tmp_path_factory.mktemp("qa") / "qa-bot", seed=23, r=16,
                               lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    base_config = json.loads((demo_model_dir / "config.json").read_text())
    live_stack.registry.register("acme", "qa-bot", "lora", live_stack.settings.base_model, qa_dir,
                                 inspect_lora_adapter(qa_dir, base_config))
    live_stack.adapter_dirs = {"support-bot": live_stack.adapter_dir, "qa-bot": qa_dir}
    yield live_stack
    print(f"\nmax |logprob - transformers|: generated {MAX_DIFF['generated']:.3g}, prompt {MAX_DIFF['prompt']:.3g}")


@pytest.fixture(scope="module")
def references(stack, demo_model_dir, hf_demo_model):
    """transformers per model name: the base, PEFT on a fresh base for each adapter (float32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {BASE: hf_demo_model}
    for name, path in stack.adapter_dirs.items():
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, path).eval()
    return models


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0, timeout=300)


def post(stack, path: str, body: dict) -> dict:
    r = httpx.post(stack.url + path, json=body, timeout=300, headers={"Authorization": f"Bearer {stack.key}"})
    assert r.status_code == 200, r.text
    return r.json()


def sse(stack, path: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", stack.url + path, json=body, timeout=300,
                      headers={"Authorization": f"Bearer {stack.key}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def ran_as(stack, response_id: str):
    """(spec, result) of the request behind a one-choice response, as the worker recorded them."""
    queues = Queues(stack.redis)
    rid = "req_" + response_id.split("-", 1)[1]
    return queues.spec(rid), queues.result(rid)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ids: [len(ids), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def near_tie(row: torch.Tensor, k: int) -> bool:
    """Whether ranks around the k-th are closer than the tolerance (their order may differ)."""
    values = row.topk(k + 1).values
    return bool(((values[:-1] - values[1:]) < 2 * TOL).any())


def check_value(got: float, want: float, what: str, where: str) -> None:
    MAX_DIFF[what] = max(MAX_DIFF[what], abs(got - want))
    assert abs(got - want) < TOL, f"{where}: {got} vs transformers' {want}"


def check_top(tokenizer, top: list[tuple[str, float]], row: torch.Tensor, k: int, what: str, where: str) -> None:
    """The listed alternatives are the true top-k of the reference row, best first."""
    ref = row.topk(k)
    assert len(top) == k, where
    for (text, value), want, tid in zip(top, ref.values.tolist(), ref.indices.tolist()):
        check_value(value, want, what, where)
        if not near_tie(row, k):
            assert text == tokenizer.token_text(tid), where


# -- generated tokens -------------------------------------------------------------------------------

def test_chat_logprobs_match_transformers_for_the_base_and_two_adapters_at_once(stack, client, references,
                                                                                demo_tokenizer):
    jobs = [(model, q) for model in (BASE, "support-bot", "qa-bot") for q in QUESTIONS]

    def call(job):
        model, question = job
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(call, jobs))
    ran = [ran_as(stack, r.id) for r in responses]
    # They were in the worker's engine together: every one started before any finished (mixed steps).
    assert max(res.started_at for _, res in ran) < min(res.finished_at for _, res in ran)
    for (model, _), resp, (spec, res) in zip(jobs, responses, ran):
        choice = resp.choices[0]
        content = choice.logprobs.content
        assert len(content) == res.completion_tokens == len(res.token_ids) and choice.logprobs.refusal is None
        ref = hf_logprobs(references[model], spec.prompt_token_ids + res.token_ids)
        for i, (item, token) in enumerate(zip(content, res.token_ids)):
            row = ref[len(spec.prompt_token_ids) - 1 + i]
            where = f"{model} step {i}"
            assert item.token == demo_tokenizer.token_text(token) and item.bytes == list(item.token.encode())
            check_value(item.logprob, row[token].item(), "generated", where)
            check_top(demo_tokenizer, [(t.token, t.logprob) for t in item.top_logprobs], row, 5, "generated", where)
            assert item.top_logprobs[0].logprob == item.logprob  # greedy: the token is the best, the same float
        text = "".join(item.token for item in content)
        assert text.startswith(choice.message.content)  # the text, then what is not shown (EOS)


def test_streamed_logprobs_add_up_to_the_answer(stack, demo_tokenizer):
    body = {"model": "support-bot", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = post(stack, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    chunks = sse(stack, "/v1/chat/completions", {**body, "stream": True})
    streamed = [item for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for item in c["choices"][0]["logprobs"]["content"]]
    assert [i["token"] for i in streamed] == [i["token"] for i in whole]
    for a, b in zip(streamed, whole):
        assert abs(a["logprob"] - b["logprob"]) < TOL and [t["token"] for t in a["top_logprobs"]] == [
            t["token"] for t in b["top_logprobs"]]
    for c in chunks:  # a chunk's entries are those of the tokens its text came with
        delta = c["choices"][0]["delta"] if c["choices"] else {}
        if delta.get("content"):
            assert "".join(i["token"] for i in c["choices"][0]["logprobs"]["content"]).startswith(delta["content"])


# -- prompt tokens (echo) ---------------------------------------------------------------------------

def check_echo(tokenizer, ids: list[int], choice: dict, ref: torch.Tensor, k: int, generated: int,
               where: str) -> None:
    """A legacy echo choice: the prompt's ids exactly (no BOS added), the first position null, every
    other one transformers' value; each top dict the token itself (the very same float) and the true
    top-k, so lm-eval's greedy check (token == max of the dict) holds exactly when it is the argmax."""
    lp = choice["logprobs"]
    assert lp["tokens"][:len(ids)] == [tokenizer.token_text(t) for t in ids], where
    assert len(lp["tokens"]) == len(ids) + generated
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        value, top, row = lp["token_logprobs"][p], lp["top_logprobs"][p], ref[p - 1]
        here = f"{where} position {p}"
        check_value(value, row[ids[p]].item(), "prompt", here)
        listed = {ids[p], *row.topk(k).indices.tolist()}
        if len({tokenizer.token_text(t) for t in listed}) < len(listed):
            assert len(top) < len(listed), here  # two ids with one string: one key (the later wins)
            continue
        assert len(top) == len(listed) and top[tokenizer.token_text(ids[p])] == value, here
        check_value(max(top.values()), row.max().item(), "prompt", here + " best")
        if not near_tie(row, 1):
            assert (value == max(top.values())) == (row.argmax().item() == ids[p]), here
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"]))


def test_echo_scores_every_prompt_token_like_transformers(stack, references, demo_tokenizer):
    """What lm-evaluation-harness's local-completions sends: token-id prompts, echo, max_tokens 1,
    logprobs 1; for the base and an adapter at once, several prompts in one call."""
    prompts = [demo_tokenizer.encode(t) for t in TEXTS]

    def call(model):
        return post(stack, "/v1/completions", {"model": model, "prompt": prompts, "echo": True, "max_tokens": 1,
                                               "logprobs": 1, "temperature": 0})

    with ThreadPoolExecutor(2) as pool:
        answers = dict(zip((BASE, "qa-bot"), pool.map(call, (BASE, "qa-bot"))))
    for model, body in answers.items():
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        for ids, choice in zip(prompts, body["choices"]):
            ref = hf_logprobs(references[model], ids)
            check_echo(demo_tokenizer, ids, choice, ref, 1, 1, f"{model} {demo_tokenizer.decode(ids)!r}")
            assert choice["text"].startswith(demo_tokenizer.decode(ids))
            generated = choice["logprobs"]["token_logprobs"][-1]  # the one generated token follows the prompt
            check_value(generated, ref[-1].max().item(), "generated", f"{model} generated")
        assert body["usage"]["completion_tokens"] == 3 and body["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_echo_with_max_tokens_0_scores_the_prompt_alone(stack, references, demo_tokenizer):
    ids = demo_tokenizer.encode(TEXTS[0])
    body = post(stack, "/v1/completions", {"model": "support-bot", "prompt": TEXTS[0], "echo": True, "max_tokens": 0,
                                           "logprobs": 3})
    choice = body["choices"][0]
    assert choice["text"] == TEXTS[0] and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    check_echo(demo_tokenizer, ids, choice, hf_logprobs(references["support-bot"], ids), 3, 0, "support-bot")
    # Echo without logprobs: the prompt's text, logprobs null.
    plain = post(stack, "/v1/completions", {"model": BASE, "prompt": TEXTS[1], "echo": True, "max_tokens": 0})
    assert plain["choices"][0]["text"] == TEXTS[1] and plain["choices"][0]["logprobs"] is None


def test_streamed_echo_starts_with_the_prompt_and_its_logprobs(stack, demo_tokenizer):
    body = {"model": BASE, "prompt": TEXTS[1], "echo": True, "max_tokens": 6, "logprobs": 2, "temperature": 0}
    whole = post(stack, "/v1/completions", body)["choices"][0]
    chunks = sse(stack, "/v1/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["text"] == TEXTS[1]
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    text = "".join(c["choices"][0]["text"] for c in chunks)
    joined = {k: [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"][k]]
              for k in ("tokens", "token_logprobs", "text_offset")}
    assert text == whole["text"]
    assert joined["tokens"] == whole["logprobs"]["tokens"] and joined["text_offset"] == whole["logprobs"]["text_offset"]
    assert all(a == b or abs(a - b) < TOL for a, b in zip(joined["token_logprobs"][1:],
                                                          whole["logprobs"]["token_logprobs"][1:]))


# -- batch jobs -------------------------------------------------------------------------------------

def run_batch(client, url: str, rows: list[dict]) -> dict[str, dict]:
    data = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"
                   for cid, body in rows).encode()
    uploaded = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=url, completion_window="24h")
    deadline = time.monotonic() + 400
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.failed == 0, batch
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return {line["custom_id"]: line["response"]["body"] for line in lines}


def test_batch_lines_carry_the_same_logprobs_as_live_calls(stack, client, demo_tokenizer):
    score = {"model": "qa-bot", "prompt": demo_tokenizer.encode(TEXTS[2]), "echo": True, "max_tokens": 1,
             "logprobs": 1, "temperature": 0}
    gen = {"model": BASE, "prompt": TEXTS[0], "max_tokens": 5, "logprobs": 2, "temperature": 0}
    chat = {"model": "support-bot", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}
    got = run_batch(client, "/v1/completions", [("score", score), ("gen", gen)])
    got.update(run_batch(client, "/v1/chat/completions", [("chat", chat)]))
    live = {"score": post(stack, "/v1/completions", score), "gen": post(stack, "/v1/completions", gen),
            "chat": post(stack, "/v1/chat/completions", chat)}
    for cid in ("score", "gen"):
        a, b = got[cid]["choices"][0], live[cid]["choices"][0]
        assert a["text"] == b["text"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]
        for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"]):
            assert (x is None and y is None) or abs(x - y) < TOL
        for x, y in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
            assert (x is None and y is None) or (x.keys() == y.keys() and all(abs(x[k] - y[k]) < TOL for k in x))
    assert got["score"]["choices"][0]["text"].startswith(TEXTS[2])
    a, b = got["chat"]["choices"][0]["logprobs"]["content"], live["chat"]["choices"][0]["logprobs"]["content"]
    assert [i["token"] for i in a] == [i["token"] for i in b] and len(a) == got["chat"]["usage"]["completion_tokens"]
    assert all(abs(x["logprob"] - y["logprob"]) < TOL and len(x["top_logprobs"]) == 3 for x, y in zip(a, b))


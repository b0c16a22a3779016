"""Bad input never yields a 500: schemathesis over the API's own OpenAPI spec, on a live stack.

The spec is fetched from the running API (`GET /openapi.json`), so it is exactly what clients see.
Every operation in it is run with a valid key, in schemathesis' examples, coverage (boundary and
invalid values, deterministic) and fuzzing phases, with positive AND negative data (the point is
bad input), checking `not_a_server_error` (no 5xx) and that responses match the documented schema.

Bounded (the issue asks for bounded examples), so the module runs in about 1.5 minutes on a 2-core CPU:
  * the workers run a real model on CPU, so every accepted generation request costs real time: the
    spec we hand to schemathesis caps max_tokens / max_completion_tokens at 8, and caps string and
    array sizes (prompts, messages); see `bounded_spec`;
  * a generated body the server would accept and run long (a limit in 9..context, or a chat body
    with no limit at all, which means "up to the context length") is capped to 8 tokens just before
    it is sent; see `cap_generation`. Invalid limits (0, -1, "5", 10**30, ...) are sent untouched;
  * at most MAX_EXAMPLES examples per operation in the fuzzing phase (positive and negative); no
    deadline (a CPU model is slow), a fixed seed and derandomized generation, so a run is
    reproducible; the stateful phase is off (its links would need an annotated spec).

Some constraints the server enforces are written into the spec we test with (model names it
serves, at most 4 non-empty stop strings, token ids below the vocabulary size, at most 2 prompts
and n <= 2 per request, to keep the fan-out cheap): positive cases then reach the generation path instead of stopping at a 400/404, and
negative cases still break each constraint. Nothing is excluded: DELETE /v1/adapters/{ref} and
DELETE /v1/files/{file_id} get their own scratch adapter and file as examples (so they are tested
on real objects without deleting what the other operations use), and the multipart uploads
(POST /v1/adapters, POST /v1/files) run under the same bounds as the rest — they are cheap, since
random bytes are refused before any weights are read. `test_every_operation_ran` fails if an
operation of the spec got no request, and prints how many cases each one got (`pytest -s`).
A 5xx this run once found (an unhashable content part `type`) is kept as a minimal reproduction.
"""

from __future__ import annotations

import collections
import copy
import json

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
MAX_GEN_TOKENS = 8  # longest generation any accepted request may ask for in this run
MAX_EXAMPLES = 40  # per operation, fuzzing phase (the examples and coverage phases add their own)
SEED = 20250101
MAX_STRING = 200  # chars, strings the spec leaves unbounded (prompts, message contents, ...)
MAX_ITEMS = 4  # items, arrays the spec leaves unbounded (messages, prompt token ids, ...)
SCRATCH_ADAPTER = "scratch-bot"  # what DELETE /v1/adapters/{ref} deletes

# Per operation ("GET /v1/files"): how many cases ran, and the statuses they got.
RAN: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _walk(node, visit):
    """Call visit(schema) on every dict in a JSON tree (schemas, parameters, ...)."""
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _bound_sizes(node) -> None:
    if node.get("type") == "string" and "maxLength" not in node and "enum" not in node and "const" not in node \
            and "contentMediaType" not in node:  # uploaded files are strings too: leave their size alone
        node["maxLength"] = MAX_STRING
    if node.get("type") == "array" and "maxItems" not in node:
        node["maxItems"] = MAX_ITEMS


def _nullable_int(prop: dict) -> dict:
    """The integer branch of an `anyOf: [{type: integer, ...}, {type: null}]` property."""
    return next(branch for branch in prop["anyOf"] if branch.get("type") == "integer")


def bounded_spec(raw: dict, *, models: list[str], vocab_size: int, refs: dict[str, list[str]],
                 file_ids: dict[str, list[str]]) -> dict:
    """The live spec with generation bounded (see the module docstring) and examples for the
    path parameters that name existing objects. `refs`/`file_ids`: HTTP method -> example values."""
    spec = copy.deepcopy(raw)
    schemas = spec["components"]["schemas"]
    chat, completion = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    for props in (chat, completion):
        _nullable_int(props["max_tokens"])["maximum"] = MAX_GEN_TOKENS
        _nullable_int(props["n"])["maximum"] = 2
        ids = next(branch for branch in props["stop_token_ids"]["anyOf"] if branch.get("type") == "array")
        ids["items"]["maximum"] = vocab_size - 1
        props["model"] = {"type": "string", "enum": models, "title": "Model"}
        for branch in props["stop"]["anyOf"]:  # at most 4 stop strings, none empty
            if branch.get("type") == "string":
                branch["minLength"] = 1
            elif branch.get("type") == "array":
                branch["maxItems"] = 4
                branch["items"]["minLength"] = 1
    _nullable_int(chat["max_completion_tokens"])["maximum"] = MAX_GEN_TOKENS
    chat["messages"]["maxItems"] = MAX_ITEMS
    for branch in completion["prompt"]["anyOf"]:  # non-empty prompts: text or token ids, at most 2 of them
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array" and branch["items"].get("type") == "string":
            branch.update(minItems=1, maxItems=2)
            branch["items"]["minLength"] = 1
        elif branch.get("type") == "array" and branch["items"].get("type") == "array":
            branch.update(minItems=1, maxItems=2)
            branch["items"].update(minItems=1, maxItems=16)
            branch["items"]["items"].update(minimum=0, maximum=vocab_size - 1)
        elif branch.get("type") == "array":
            branch.update(minItems=1, maxItems=16)
            branch["items"].update(minimum=0, maximum=vocab_size - 1)
    upload = schemas["Body_upload_v1_files_post"]
    upload["properties"]["purpose"]["enum"] = ["batch"]  # the only purpose the server accepts
    upload["examples"] = [{"file": '{"custom_id": "x"}\n', "purpose": "batch"}]  # the success path too
    _walk(spec["components"], _bound_sizes)
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                _walk(param["schema"], _bound_sizes)
                if path.startswith("/v1/adapters/") and param["name"] == "ref":
                    param["schema"]["examples"] = refs.get(method, refs["get"])
                elif path.startswith("/v1/files/") and param["name"] == "file_id":
                    param["schema"]["examples"] = file_ids.get(method, file_ids["get"])
                elif path.startswith("/v1/models/") and param["name"] == "model":
                    param["schema"]["examples"] = models
    return spec


def cap_generation(case, max_model_len: int) -> None:
    """Cap, just before sending, a generation body the server would accept and run long (see the
    module docstring). Equal limits stay equal, so "max_tokens and max_completion_tokens disagree"
    is still exercised; values the server must refuse (<1, > the context, not ints) are untouched."""
    body = case.body
    if case.method != "POST" or case.path not in ("/v1/chat/completions", "/v1/completions") \
            or not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and MAX_GEN_TOKENS < value <= max_model_len:
            body[key] = 1 + value % MAX_GEN_TOKENS
    if case.path == "/v1/chat/completions" and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = MAX_GEN_TOKENS


@pytest.fixture(scope="module")
def api_schema(live_stack, demo_model_dir):
    url, key = live_stack.url, live_stack.key
    auth = {"Authorization": f"Bearer {key}"}
    config = json.loads((demo_model_dir / "config.json").read_text())

    # Objects the path examples name; the DELETEs get scratch ones of their own.
    files = [live_stack.adapter_dir / "adapter_config.json", live_stack.adapter_dir / "adapter_model.safetensors"]
    r = httpx.post(f"{url}/v1/adapters", headers=auth, data={"name": SCRATCH_ADAPTER}, timeout=120,
                   files=[("files", (p.name, p.read_bytes())) for p in files])
    assert r.status_code == 201, r.text
    jsonl = b'{"custom_id": "a", "body": {"model": "%s", "prompt": "hi"}}\n' % BASE.encode()
    file_ids = []
    for _ in range(2):
        r = httpx.post(f"{url}/v1/files", headers=auth, data={"purpose": "batch"}, timeout=60,
                       files={"file": ("in.jsonl", jsonl)})
        assert r.status_code == 200, r.text
        file_ids.append(r.json()["id"])
    keep, scratch = file_ids

    raw = httpx.get(f"{url}/openapi.json", timeout=30).raise_for_status().json()
    spec = bounded_spec(
        raw, models=[BASE, live_stack.adapter, f"{live_stack.adapter}@1"], vocab_size=config["vocab_size"],
        refs={"get": [live_stack.adapter, f"{live_stack.adapter}@1"], "delete": [SCRATCH_ADAPTER]},
        file_ids={"get": [keep], "delete": [scratch]},
    )
    st_config = schemathesis.Config.from_dict({
        "seed": SEED,
        "base-url": url,
        "headers": auth,
        "request-timeout": 120,
        # Reproductions must show max_tokens & co (a "*token*" key is masked by default); the key is a test's own.
        "output": {"sanitization": {"enabled": False}},
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
                   "stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_dict(spec, config=st_config)


@pytest.fixture(scope="module")
def max_model_len(demo_model_dir) -> int:
    return int(json.loads((demo_model_dir / "config.json").read_text()).get("max_position_embeddings") or 32768)


schema = schemathesis.pytest.from_fixture("api_schema")
CHAT = "/v1/chat/completions"

def _unhashable_part_type_body(part_type) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": [{"type": part_type, "text": "hi"}]}],
            "max_tokens": 1}


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    """schemathesis' lazy loader reads and rewrites `node._nodeid`, which pytest 9.2 no longer has
    (it keeps `_id`): give it a plain attribute to use. Harmless where the attribute exists."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
def test_no_server_errors(case, max_model_len):
    """One subtest per operation: no 5xx, and responses match the documented schema."""
    cap_generation(case, max_model_len)
    response = case.call()
    RAN[case.operation.label][response.status_code] += 1
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


@pytest.mark.parametrize("part_type", [{}, ["text"]], ids=["object", "array"])
def test_unhashable_content_part_type_is_a_400(live_stack, part_type):
    """A 500 this run once found: a content part whose `type` is an object or array (unhashable)."""
    r = httpx.post(live_stack.url + CHAT, json=_unhashable_part_type_body(part_type), timeout=60,
                   headers={"Authorization": f"Bearer {live_stack.key}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("messages")


def test_every_operation_ran(api_schema):
    """Runs after the property test (file order): no operation of the spec was skipped silently."""
    if not RAN:
        pytest.skip("counts what test_no_server_errors ran: run it too")
    operations = {f"{method.upper()} {path}" for path, item in api_schema.raw_schema["paths"].items()
                  for method in item}
    summary = "\n".join(f"  {op}: {sum(RAN[op].values())} cases, statuses {dict(sorted(RAN[op].items()))}"
                        for op in sorted(operations))
    print(f"\nschemathesis ran {sum(sum(c.values()) for c in RAN.values())} cases:\n{summary}")
    assert not operations - set(RAN), f"operations that got no request: {sorted(operations - set(RAN))}"

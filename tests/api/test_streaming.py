"""The streamed chunks of a call with logprobs (api/streaming.py): however the worker's output is cut
into deltas, and whatever text it holds back, the chunks add up to the non-streamed answer: the
same text, and every token's logprob entry exactly once, in order. Pure: the demo tokenizer only."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from api.streaming import ChunkMaker
from hotswap.openai_logprobs import answer
from hotswap.protocol import GenerationRequest, GenerationResult, ModelTarget, SamplingSpec
from scheduler.aio import Delta

PROMPT = [19556, 905, 30]  # "Hello world." in the demo tokenizer


def make_req(kind: str, logprobs: int | None, echo: bool) -> GenerationRequest:
    return GenerationRequest(tenant="t", base_model="b", model="b", target=ModelTarget(kind="base"),
                             prompt_token_ids=PROMPT, echo=echo, stream=True,
                             sampling=SamplingSpec(max_tokens=16, logprobs=logprobs,
                                                   prompt_logprobs=logprobs if echo else None))


def stream(chunks: ChunkMaker, deltas: list[Delta], result: GenerationResult) -> list[dict]:
    out = chunks.opening()
    for delta in deltas:
        out += chunks.delta(0, delta)
    return out + chunks.finish(0, result)


def joined(kind: str, bodies: list[dict]) -> tuple[str, dict | None]:
    """The text and logprobs a client gets by concatenating the chunks."""
    text, content, legacy = "", [], {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    asked = False
    for body in bodies:
        choice = body["choices"][0]
        text += (choice["delta"].get("content") or "") if kind == "chat" else choice["text"]
        if choice["logprobs"] is not None:
            asked = True
            if kind == "chat":
                content += choice["logprobs"]["content"]
            else:
                for key in legacy:
                    legacy[key] += choice["logprobs"][key]
    if not asked:
        return text, None
    return text, {"content": content, "refusal": None} if kind == "chat" else legacy


tokens = st.lists(st.tuples(st.integers(min_value=0, max_value=49151), st.floats(max_value=0, allow_nan=False,
                                                                                  allow_infinity=False),
                            st.booleans()), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["chat", "completion"]), logprobs=st.sampled_from([None, 0, 2]), echo=st.booleans(),
       generated=tokens, split=st.data())
def test_chunks_add_up_to_the_answer(demo_tokenizer, kind, logprobs, echo, generated, split):
    echo = echo and kind == "completion"
    req = make_req(kind, logprobs, echo)
    entries = [(t, v, [(t, v), ((t + 1) % 49152, v - 1)][:logprobs or 0]) for t, v, _ in generated]
    prompt_entries = [None] + [(t, -1.5, [(t, -1.5)][:logprobs or 0]) for t in PROMPT[1:]]
    # The worker's events: one per token, its text held back (empty) or released with everything held so far.
    deltas, held, text = [], "", ""
    for i, ((t, _, release), e) in enumerate(zip(generated, entries)):
        held += demo_tokenizer.token_text(t)
        piece, held = (held, "") if release else ("", held)
        text += piece
        deltas.append(Delta(piece, [e] if logprobs is not None else None,
                            prompt_entries if i == 0 and echo and logprobs is not None else None))
    text += held
    if held:
        deltas.append(Delta(held))  # the flush at the end
    # A reader may also see several events merged into one delta.
    cuts = split.draw(st.lists(st.integers(min_value=1, max_value=len(deltas)), max_size=3, unique=True))
    merged, start = [], 0
    for cut in sorted(cuts) + [len(deltas)]:
        part = deltas[start:cut]
        if part:
            lps = [e for d in part for e in d.logprobs or []] if logprobs is not None else None
            merged.append(Delta("".join(d.text for d in part), lps or None,
                                next((d.prompt_logprobs for d in part if d.prompt_logprobs is not None), None)))
        start = cut
    result = GenerationResult(id=req.id, status="completed", text=text, token_ids=[t for t, _, _ in generated],
                              finish_reason="length", logprobs=entries if logprobs is not None else None,
                              prompt_logprobs=prompt_entries if echo and logprobs is not None else None)
    bodies = stream(ChunkMaker(kind, [req], "id", False, demo_tokenizer), merged, result)
    expected = answer(kind, req, result, demo_tokenizer)
    assert joined(kind, bodies) == (expected.text, expected.logprobs)
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"
    assert all(b["choices"][0]["finish_reason"] is None for b in bodies[:-1])


def test_echo_comes_first_with_the_prompt_logprobs(demo_tokenizer):
    req = make_req("completion", 1, True)
    chunks = ChunkMaker("completion", [req], "id", True, demo_tokenizer)
    prompt_entries = [None, (PROMPT[1], -2.0, [(PROMPT[1], -2.0)]), (PROMPT[2], -1.0, [(7, -0.5)])]
    first = chunks.delta(0, Delta(",", [(28, -0.25, [(28, -0.25)])], prompt_entries))  # 28: ","
    assert [c["choices"][0]["text"] for c in first] == ["Hello world.", ","]
    echo, hi = (c["choices"][0]["logprobs"] for c in first)
    assert echo["token_logprobs"] == [None, -2.0, -1.0] and echo["top_logprobs"][0] is None
    assert echo["text_offset"] == [0, 5, 11] and hi["text_offset"] == [12]
    assert all(c["usage"] is None for c in first)  # include_usage: null until the usage chunk
    # The last chunk has no pending entries: logprobs null, as OpenAI's finishing chunks.
    last = chunks.finish(0, GenerationResult(id=req.id, status="completed", finish_reason="stop"))
    assert last[0]["choices"][0]["logprobs"] is None and last[0]["choices"][0]["finish_reason"] == "stop"


def test_chat_opens_with_roles_and_a_choice_without_logprobs_gets_null(demo_tokenizer):
    reqs = [make_req("chat", None, False), make_req("chat", 0, False)]
    chunks = ChunkMaker("chat", reqs, "id", False, demo_tokenizer)
    assert [c["choices"][0]["delta"] for c in chunks.opening()] == [{"role": "assistant"}] * 2
    plain = chunks.delta(0, Delta("a"))
    asked = chunks.delta(1, Delta("a", [(64, -0.5, [])]))
    assert plain[0]["choices"][0]["logprobs"] is None
    assert asked[0]["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.5
    assert asked[0]["choices"][0]["index"] == 1

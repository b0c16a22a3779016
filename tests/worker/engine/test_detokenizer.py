from worker.engine.detokenizer import IncrementalDetokenizer


def stream(tok, text: str, stop: list[str]):
    detok = IncrementalDetokenizer(tok, stop)
    out = ""
    for t in tok.encode(text, add_special_tokens=False):
        delta, hit = detok.add(t)
        out += delta
        if hit:
            return out, True
    return out + detok.flush(), False


def test_streamed_text_equals_the_full_decode(demo_tokenizer):
    text = "Héllo wörld! 日本語のテキスト, emoji 🎉 and code: def f(x): return x**2"
    out, hit = stream(demo_tokenizer, text, [])
    assert not hit and out == demo_tokenizer.decode(demo_tokenizer.encode(text, add_special_tokens=False))


def test_stop_string_ends_the_text_before_it_even_across_tokens(demo_tokenizer):
    out, hit = stream(demo_tokenizer, "one two three STOP four five", ["STOP"])
    assert hit and out == "one two three "
    out, hit = stream(demo_tokenizer, "alpha beta gamma", ["a g"])  # spans a token boundary
    assert hit and out == "alpha bet"


def test_a_partial_stop_string_is_held_back_then_released(demo_tokenizer):
    detok = IncrementalDetokenizer(demo_tokenizer, ["###"])
    emitted = ""
    for t in demo_tokenizer.encode("value ## more", add_special_tokens=False):
        delta, hit = detok.add(t)
        assert not hit
        emitted += delta
    assert "###" not in emitted
    assert emitted + detok.flush() == "value ## more"


def stream_min_tokens(tok, text: str, stop: list[str], min_tokens: int):
    """As the engine drives it with min_tokens: stop strings looked for from the min_tokens-th token on."""
    detok = IncrementalDetokenizer(tok, stop)
    out = ""
    for i, t in enumerate(tok.encode(text, add_special_tokens=False)):
        delta, hit = detok.add(t, check_stop=i + 1 >= min_tokens)
        out += delta
        if hit:
            return out, True
    return out + detok.flush(), False


def test_min_tokens_ignores_stop_strings_that_end_before_it(demo_tokenizer):
    text = "one STOP two three STOP four"
    n_before = len(demo_tokenizer.encode("one STOP two", add_special_tokens=False))
    out, hit = stream_min_tokens(demo_tokenizer, text, ["STOP"], min_tokens=n_before)
    assert hit and out == "one STOP two three "  # the first STOP came too early, the second counts
    out, hit = stream_min_tokens(demo_tokenizer, text, ["STOP"], min_tokens=100)
    assert not hit and out == text
    out, hit = stream_min_tokens(demo_tokenizer, text, ["STOP"], min_tokens=0)
    assert hit and out == "one "  # min_tokens 0: as before

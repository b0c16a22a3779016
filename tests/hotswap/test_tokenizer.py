"""Our torch-free tokenizer and chat template against transformers' on the demo model."""

import pytest


@pytest.fixture(scope="module")
def hf_tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.mark.parametrize("text", ["Hello world", "  leading spaces\nand lines", "naïve café 🎉", "<|im_start|>user"])
def test_encode_and_decode_match_transformers(demo_tokenizer, hf_tokenizer, text):
    ids = demo_tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    assert demo_tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
])
def test_chat_template_matches_transformers(demo_tokenizer, hf_tokenizer, messages):
    ours = demo_tokenizer.apply_chat_template(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert demo_tokenizer.encode_chat(messages) == hf_tokenizer(theirs, add_special_tokens=False).input_ids

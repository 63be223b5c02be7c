import pytest

from surgery.core.errors import InputError
from surgery.core.tokens import encode_prompt, encode_target, special_prefix


def test_prompt_is_tokenized_as_the_tokenizer_does(tiny_tokenizer):
    assert (
        encode_prompt(tiny_tokenizer, "The capital of France is", 32)
        == tiny_tokenizer("The capital of France is")["input_ids"]
    )


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_blank_prompt(tiny_tokenizer, prompt):
    with pytest.raises(InputError, match="empty"):
        encode_prompt(tiny_tokenizer, prompt, 32)


def test_too_long_prompt(tiny_tokenizer):
    with pytest.raises(InputError, match="33 tokens long; this model's context is 32"):
        encode_prompt(tiny_tokenizer, " ".join(["the"] * 33), 32)


def test_targets(tiny_tokenizer):
    assert len(encode_target(tiny_tokenizer, " Paris")) == 1
    with pytest.raises(InputError, match="empty"):
        encode_target(tiny_tokenizer, " ")
    with pytest.raises(InputError, match="vocabulary"):
        encode_target(tiny_tokenizer, " Zanzibar")


def test_real_gpt2_tokenizer(gpt2_tokenizer):
    assert gpt2_tokenizer("The capital of France is")["input_ids"] == [464, 3139, 286, 4881, 318]
    assert encode_target(gpt2_tokenizer, " Paris") == [6342]
    assert len(encode_prompt(gpt2_tokenizer, "The capital of France is", 1024)) == 5


def test_special_prefix_is_what_the_tokenizer_puts_before_a_text(tiny_tokenizer):
    assert special_prefix(tiny_tokenizer) == []  # GPT-2 style: no BOS

    class WithBos:  # Llama and Gemma style: BOS (id 1) before every text unless told otherwise
        def __call__(self, text, add_special_tokens=True):
            ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([1] if add_special_tokens else []) + list(ids)}

    assert special_prefix(WithBos()) == [1]

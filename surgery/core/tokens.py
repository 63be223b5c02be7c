"""Turning user text into token ids, with the checks every entry point needs.

Prompts are tokenized exactly as the model's tokenizer does by default (GPT-2's adds no BOS token), so the
numbers match a plain ``model(input_ids)`` call. Prepending BOS is an explicit option, never a default.
"""

from __future__ import annotations

import torch

from .errors import InputError


def encode_prompt(tokenizer, prompt: str, n_ctx: int, *, prepend_bos: bool = False) -> list[int]:
    """Token ids of ``prompt``; raises :class:`InputError` if blank, unknown to the vocabulary, or too long."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty: type some text for the model to continue")
    ids = list(tokenizer(prompt)["input_ids"])
    if prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise InputError("this tokenizer has no BOS token to prepend")
        ids = [bos] + ids
    _check_known(tokenizer, ids, prompt, "prompt")
    if not ids:
        raise InputError("the prompt tokenizes to nothing")
    if len(ids) > n_ctx:
        raise InputError(f"the prompt is {len(ids)} tokens long; this model's context is {n_ctx} tokens")
    return ids


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (Gemma, Llama: BOS; GPT-2: none)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    return full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []


def encode_target(tokenizer, text: str, what: str = "target") -> list[int]:
    """Token ids of an answer text (no special tokens). The first id is the one diagnosed and trained."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(
            f"the {what} is empty: give the answer text, e.g. ' Paris' "
            "(GPT-2, Llama and Gemma words start with a space)"
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InputError(f"the {what} {text!r} tokenizes to nothing")
    _check_known(tokenizer, ids, text, what)
    return ids


def _check_known(tokenizer, ids: list[int], text: str, what: str) -> None:
    unk = tokenizer.unk_token_id
    # GPT-2's unk token is <|endoftext|> (= EOS), which is a real token: only flag a distinct unknown token.
    if unk is not None and unk != tokenizer.eos_token_id and unk in ids:
        raise InputError(f"the {what} {text!r} contains words this model's vocabulary does not have")


def token_text(tokenizer, token_id: int) -> str:
    """The text of one token as it would be printed (GPT-2: with its leading space)."""
    return tokenizer.decode([int(token_id)])


def pad_right(sequences: list[list[int]], pad_id: int | None, device=None):
    """Right-pad token id lists into ``input_ids`` Long[Tensor, "B T"] and ``lengths`` Long[Tensor, "B"].

    With a causal model the real positions never attend to right padding, so every real position's output
    equals an unpadded run (an attention mask, :func:`real_positions`, changes nothing for them; passing one
    only keeps transformers from warning about padding).
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id if pad_id is not None else 0, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in sequences], dtype=torch.long, device=device)


def real_positions(lengths, width: int):
    """Bool[Tensor, "B T"]: True at each row's real (non-padding) positions of a right-padded batch."""
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]

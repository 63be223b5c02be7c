"""Greedy continuation of a prompt, for showing what a (patched) model now says."""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .arch import layout_of
from .tokens import encode_prompt


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy continuation of ``prompt`` (the new text only), at most ``max_new_tokens`` tokens and never past
    the context window. Works on a base model and on a :func:`~surgery.patch.patched_model` view alike."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    n_ctx = layout_of(model).n_ctx
    ids = encode_prompt(tokenizer, prompt, n_ctx)
    room = n_ctx - len(ids)
    if room < 1:
        raise InputError(f"the prompt fills the whole context ({n_ctx} tokens): nothing can be generated")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=min(max_new_tokens, room),
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
        )
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

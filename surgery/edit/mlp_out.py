"""What the key-value editors (ROME, FT-L) share: one block's MLP output projection read as a matrix, run with
other values, and the teacher-forced answers they are trained on.

The projection computes ``out = W k + b``, ``W`` ``[d_model, d_mlp]`` (:meth:`~surgery.arch.base.Layout.mlp_out_matrix`
reads it from the family's stored layout), ``k`` the key: the MLP's hidden activation at one position. Editors never
write into the model: :func:`projection_replaced` runs the model with ``W`` swapped for a tensor of their own (a
forward hook recomputes the module's output from its input), inside a ``with`` block that always removes the hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import layout_of
from ..core.hooks import hooked, main_output
from ..core.tokens import encode_prompt, encode_target
from ..evaluation.facts import Fact


def out_projection(model: nn.Module, layer: int) -> tuple[str, Tensor, Tensor | None]:
    """``(module path, W [d_model, d_mlp] (a view of the stored weight), bias or None)`` of block ``layer``."""
    layout = layout_of(model)
    path = layout.adapter.path("mlp_out", layer)
    module = model.get_submodule(path)
    return path, layout.mlp_out_matrix(module.weight), module.bias


@contextmanager
def projection_replaced(model: nn.Module, layer: int, matrix: Tensor, add: dict[int, Tensor] | None = None) -> Iterator:
    """Run ``model`` with block ``layer``'s output projection computing ``matrix @ k + b`` (``matrix``
    ``[d_model, d_mlp]``, may require grad), and ``add[pos]`` (``[d_model]``) added to its output at position ``pos``
    of every row (ROME's delta). The model's own weights are neither read for the output nor written."""
    path, _, bias = out_projection(model, layer)

    def replace(module, args, output):
        out = F.linear(args[0], matrix.to(args[0].dtype), bias)  # (B, T, d_model)
        if add:
            out = out.clone()
            for pos, vec in add.items():
                out[:, pos] = out[:, pos] + vec.to(out.dtype)
        return out if not isinstance(output, tuple) else (out, *output[1:])

    with hooked(model, forward={path: replace}):
        yield model


def keys_at(model: nn.Module, layer: int, ids: Tensor, position: int) -> Tensor:
    """The key (the output projection's input) at ``position`` of ``ids`` (1, T). Float[Tensor, "d_mlp"]."""
    path, _, _ = out_projection(model, layer)
    got: list[Tensor] = []
    with torch.no_grad(), hooked(model, pre={path: lambda m, args: got.append(args[0].detach())}):
        model(input_ids=ids)
    return got[0][0, position]


def module_output_at(model: nn.Module, layer: int, ids: Tensor, position: int) -> Tensor:
    """The output projection's output (``W k + b``) at ``position`` of ``ids`` (1, T). Float[Tensor, "d_model"]."""
    path, _, _ = out_projection(model, layer)
    got: list[Tensor] = []
    with torch.no_grad(), hooked(model, forward={path: lambda m, a, out: got.append(main_output(out).detach())}):
        model(input_ids=ids)
    return got[0][0, position]


@dataclass(frozen=True)
class Answer:
    """One fact, teacher-forced: ``ids`` (1, T) = prompt + every answer piece but the last; ``positions`` (P,)
    where each piece is predicted, ``labels`` (P,) the pieces; ``prompt_len`` tokens of prompt."""

    ids: Tensor
    positions: Tensor
    labels: Tensor
    prompt_len: int


def teacher_forced(tokenizer, fact: Fact, n_ctx: int, device: torch.device) -> Answer:
    """The prompt tokenized as the model's tokenizer does by default, followed by the answer's pieces."""
    prompt = encode_prompt(tokenizer, fact.prompt, n_ctx)
    target = encode_target(tokenizer, fact.target)
    ids = torch.tensor([prompt + target[:-1]], device=device)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target), device=device)
    return Answer(ids, positions, torch.tensor(target, device=device), len(prompt))


def answer_logits(model: nn.Module, answer: Answer) -> Tensor:
    """Logits where each piece of the answer is predicted. Float[Tensor, "P d_vocab"] (float32). Those are the last
    P positions, so only their logits are computed (``logits_to_keep``: the unembedding dominates a short pass)."""
    return model(input_ids=answer.ids, logits_to_keep=len(answer.positions)).logits[0].float()


def all_top1(logits: Tensor, labels: Tensor) -> bool:
    """Every piece is the top-1 token where it is predicted (greedy decoding then says the whole answer)."""
    return bool((logits.argmax(-1) == labels).all())


def subject_position(tokenizer, fact: Fact, n_ctx: int) -> tuple[int, str]:
    """Where ROME reads the key: the last token of ``fact.subject`` in the prompt when the fact names a subject
    that the prompt contains and whose tokens are the prompt's own; else the prompt's last token. Returns
    ``(position, what it is)``."""
    prompt = encode_prompt(tokenizer, fact.prompt, n_ctx)
    subject = fact.subject
    if subject and subject in fact.prompt:
        end = fact.prompt.index(subject) + len(subject)
        head = list(tokenizer(fact.prompt[:end])["input_ids"])
        if head and prompt[: len(head)] == head:
            return len(head) - 1, f"the subject's last token ({subject!r})"
    return len(prompt) - 1, "the prompt's last token"

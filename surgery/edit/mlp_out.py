"""What the key-value editors (ROME, FT-L, MEMIT, AlphaEdit) share: a block's MLP output projection read as a
matrix, run with other values, and the teacher-forced answers they are trained on.

The projection computes ``out = W k + b``, ``W`` ``[d_model, d_mlp]`` (:meth:`~surgery.arch.base.Layout.mlp_out_matrix`
reads it from the family's stored layout), ``k`` the key: the MLP's hidden activation at one position. Editors never
write into the model: :func:`projections_replaced` runs the model with the ``W`` of one or several blocks swapped for
tensors of their own (a forward hook recomputes each module's output from its input), inside a ``with`` block that
always removes the hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def projected(matrix: Tensor, bias: Tensor | None, keys: Tensor) -> Tensor:
    """``W k + b`` in float64 for one key ``(d_mlp,)`` or a column of keys ``(d_mlp, n)``: what the projection with
    weight ``matrix`` ``[d_model, d_mlp]`` outputs there."""
    keys = keys.double()
    out = matrix.double().to(keys.device) @ keys
    if bias is None:
        return out
    b = bias.detach().to(keys.device, torch.float64)
    return out + (b if keys.dim() == 1 else b[:, None])


def _replacing(matrix: Tensor, bias: Tensor | None) -> Callable:
    """A forward hook making a projection compute ``matrix @ k + b`` from its input ``k``."""

    def replace(module, args, output):
        out = F.linear(args[0], matrix.to(args[0].dtype), bias)  # (B, T, d_model)
        return out if not isinstance(output, tuple) else (out, *output[1:])

    return replace


def _adding(add: dict[int, Tensor]) -> Callable:
    """A forward hook adding ``add[pos]`` (``[d_model]``) to a module's output at position ``pos`` of every row."""

    def plus(module, args, output):
        out = main_output(output).clone()  # (B, T, d_model)
        for pos, vec in add.items():
            out[:, pos] = out[:, pos] + vec.to(out.dtype)
        return out if not isinstance(output, tuple) else (out, *output[1:])

    return plus


@contextmanager
def projections_replaced(
    model: nn.Module, matrices: dict[int, Tensor], add: dict[int, Tensor] | None = None, add_to: str | None = None
) -> Iterator:
    """Run ``model`` with each block ``l``'s output projection computing ``matrices[l] @ k + b`` (``[d_model,
    d_mlp]``, may require grad), and ``add[pos]`` (``[d_model]``) added to the output of module ``add_to`` (a module
    path: a projection for ROME, a block for MEMIT) at position ``pos`` of every row. The model's own weights are
    neither read for those outputs nor written."""
    forward: dict[str, Callable] = {}
    for layer, matrix in matrices.items():
        path, _, bias = out_projection(model, layer)
        forward[path] = _replacing(matrix, bias)
    if add:
        plus, first = _adding(add), forward.get(add_to)
        forward[add_to] = plus if first is None else lambda m, a, o: plus(m, a, first(m, a, o))
    with hooked(model, forward=forward):
        yield model


def projection_replaced(model: nn.Module, layer: int, matrix: Tensor, add: dict[int, Tensor] | None = None):
    """:func:`projections_replaced` for block ``layer`` alone, ``add`` added to its projection's output (ROME's
    delta)."""
    return projections_replaced(model, {layer: matrix}, add, out_projection(model, layer)[0])


def keys_at(model: nn.Module, layer: int, ids: Tensor, position: int) -> Tensor:
    """The key (the output projection's input) at ``position`` of ``ids`` (1, T). Float[Tensor, "d_mlp"]."""
    path, _, _ = out_projection(model, layer)
    got: list[Tensor] = []
    with torch.no_grad(), hooked(model, pre={path: lambda m, args: got.append(args[0].detach())}):
        model(input_ids=ids)
    return got[0][0, position]


def module_output_at(model: nn.Module, layer: int, ids: Tensor, position: int) -> Tensor:
    """The output projection's output (``W k + b``) at ``position`` of ``ids`` (1, T). Float[Tensor, "d_model"]."""
    return output_at(model, out_projection(model, layer)[0], ids, position)


def output_at(model: nn.Module, path: str, ids: Tensor, position: int) -> Tensor:
    """Module ``path``'s output (its hidden states) at ``position`` of ``ids`` (1, T). Float[Tensor, "d_model"]."""
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

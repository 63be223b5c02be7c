"""Where a multi-token answer goes wrong: teacher-force the target's pieces and find the first one the model misses.

A target such as " Tirana" is several tokens (" Tir" + "ana") for most vocabularies. The model *says* it only if its
greedy prediction is each piece in turn, so the piece to diagnose is the **divergence**: the first piece ``k`` where
the prediction at the position before it (the prompt's last token for ``k = 0``, else piece ``k - 1``) is not
piece ``k``. The diagnosis then reads that position: its input is ``prompt + target[:k]`` and its target token is
``target[k]``. When the model predicts every piece there is no divergence and piece 0 is diagnosed (verdict
``correct``), exactly as a single-token target is.

**Generic first piece.** When the divergence is at piece 0, a repair at that position teaches piece 0 only. That
is the fact when, fed piece 0, the model goes on to say the rest (" Tir" -> "ana"); it is not when the piece
starts other answers too and the model, fed it, goes on to one of them (" D" -> "akar" for Doha, " New" ->
" York" for New Delhi). So a missed first piece is **generic** when teacher forcing finds another miss at a later
piece: the same pass, no list of other answers needed. (Rejected: "the piece is a word fragment", which flagged
" Tir" of " Tirana" and " Ou" of " Ouagadougou" — 18 of 40 Gemma 3 capitals — although the model completes them;
and "the piece starts two targets of the relation", which needs a dataset and flags " New" even where the model
goes on to " Delhi".)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Layout
from ..core.tokens import pad_right, real_positions


@dataclass
class Divergence:
    """Which piece of the target a diagnosis reads, and where. ``piece_index``: the diagnosed piece ``k``;
    ``before``: the text of the pieces fed before it; ``position``: its prediction's token index in the diagnosed
    input (``prompt + pieces[:k]``, so the input's last token); ``diverges``: the model misses the diagnosed piece
    (False when it predicts every piece: then ``k = 0``); ``forced``: ``k`` was found by teacher forcing (False for
    a single-token target, or with teacher forcing off, when piece 0 is diagnosed whatever the model says);
    ``generic_first_piece``: the divergence is at piece 0 and, fed that piece, the model misses a later one too
    (``missed_after``: the first such piece).
    """

    piece_index: int
    piece: str
    pieces: list[str]
    position: int
    before: str  # the text of the pieces fed before the diagnosed one ("" for piece 0)
    diverges: bool
    forced: bool = True
    generic_first_piece: bool = False
    missed_after: int | None = None

    def sentence(self) -> str:
        """One sentence on the piece diagnosed; empty for a single-token target that is not generic."""
        n = len(self.pieces)
        if self.generic_first_piece:
            return (
                f" The first piece {self.piece!r} of {n} {self.pieces} is generic: fed it, the model still misses "
                f"{self.pieces[self.missed_after]!r}, so a repair here would only teach {self.piece!r}."
            )
        if n == 1:
            return ""
        if not self.forced:
            return f" Only the first of {n} pieces {self.pieces} is diagnosed (teacher forcing off)."
        if not self.diverges:
            return f" The model predicts all {n} pieces {self.pieces}; the first is diagnosed."
        lead = f"after {self.before!r} " if self.piece_index else ""
        return (
            f" Diagnosed at piece {self.piece_index + 1} of {n} {self.pieces}: the model diverges {lead}at "
            f"{self.piece!r} (token position {self.position})."
        )


def missed_pieces(
    model: nn.Module, layout: Layout, prompts: list[list[int]], targets: list[list[int]], pad_id: int | None
) -> list[list[int]]:
    """For each row, the pieces of ``targets[b]`` (indices, in order) that the model's greedy prediction misses
    when the earlier pieces are fed (teacher forcing): the first is the divergence, none when it predicts every
    piece it has room for in the context.

    ``prompts``/``targets``: token ids. One forward pass of ``prompt + target[:-1]`` for all rows (right-padded:
    a causal model's real positions never see the padding, so rows equal unbatched runs); the logits are computed
    only at the positions that predict a piece. (A diagnosis calls this for multi-token targets only: for a single
    token, the diagnosis' own output rank says whether the model predicts it.)
    """
    device = next(model.parameters()).device
    pieces = [t[: max(1, layout.n_ctx - len(p) + 1)] for p, t in zip(prompts, targets)]  # what fits the context
    seqs = [p + t[:-1] for p, t in zip(prompts, pieces)]
    input_ids, lengths = pad_right(seqs, pad_id, device)
    mask = real_positions(lengths, input_ids.shape[1]).long() if len(set(lengths.tolist())) > 1 else None
    rows = torch.tensor([b for b, t in enumerate(pieces) for _ in t], device=device)
    cols = torch.tensor([len(p) - 1 + j for p, t in zip(prompts, pieces) for j in range(len(t))], device=device)
    with torch.no_grad():
        hidden = model.get_submodule(layout.adapter.base)(input_ids=input_ids, attention_mask=mask, use_cache=False)[0]
        # The base output is already final-normed; the soft-cap (Gemma) is monotonic, so the argmax skips it.
        predicted = model.get_output_embeddings()(hidden[rows.to(hidden.device), cols.to(hidden.device)]).argmax(-1)
    predicted = iter(predicted.tolist())
    return [[j for j, piece in enumerate(t) if next(predicted) != piece] for t in pieces]

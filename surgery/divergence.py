"""Where a multi-token answer goes wrong: teacher-force the target's pieces and find the first one the model misses.

A target such as " Tirana" is several tokens (" Tir" + "ana") for most vocabularies. The model *says* it only if its
greedy prediction is each piece in turn, so the piece to diagnose is the **divergence**: the first piece ``k`` where
the prediction at the position before it (the prompt's last token for ``k = 0``, else piece ``k - 1``) is not
piece ``k``. The diagnosis then reads that position: its input is ``prompt + target[:k]`` and its target token is
``target[k]``. When the model predicts every piece there is no divergence and piece 0 is diagnosed (verdict
``correct``), exactly as a single-token target is.

**Generic first piece.** When the divergence is at piece 0 and that piece is a *word fragment* — it ends inside
the target's first word (" D" of " Doha", " Tir" of " Tirana") — the piece starts many other words too
(" Dakar", " Dushanbe"), so a repair at that position would only teach the fragment, not the fact. A census also
calls a first piece generic when it starts at least two different targets of the same relation in the dataset
(" New" of " New York" and " New Delhi"; :mod:`surgery.census`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import Layout
from .tokens import pad_right, real_positions

GENERIC_FRAGMENT = "fragment"  # piece 0 ends inside the target's first word
GENERIC_SHARED = "shared"  # piece 0 starts >= 2 different targets of the relation (census only)


@dataclass
class Divergence:
    """Which piece of the target a diagnosis reads, and where. ``piece_index``: the diagnosed piece ``k``;
    ``position``: its prediction's token index in the diagnosed input (``prompt + pieces[:k]``, so the input's last
    token); ``diverges``: the model misses the diagnosed piece (False when it predicts every piece: then
    ``k = 0``); ``forced``: ``k`` was found by teacher forcing (False for a single-token target, or with teacher
    forcing off, when piece 0 is diagnosed whatever the model says); ``generic_first_piece``: the divergence is
    at piece 0 and that piece is generic, ``generic_reason`` says why (``"fragment"`` or ``"shared"``, else None).
    """

    piece_index: int
    piece: str
    pieces: list[str]
    position: int
    diverges: bool
    forced: bool = True
    generic_first_piece: bool = False
    generic_reason: str | None = None

    def sentence(self) -> str:
        """One sentence on the piece diagnosed; empty for a single-token target that is not generic."""
        n = len(self.pieces)
        if self.generic_first_piece:
            why = ("a word fragment" if self.generic_reason == GENERIC_FRAGMENT
                   else "the first piece of other answers of this relation")
            return (f" The model misses the first piece {self.piece!r} of {n} {self.pieces}, which is generic "
                    f"({why}): a repair here would only teach {self.piece!r}.")
        if n == 1:
            return ""
        if not self.forced:
            return f" Only the first of {n} pieces {self.pieces} is diagnosed (teacher forcing off)."
        if not self.diverges:
            return f" The model predicts all {n} pieces {self.pieces}; the first is diagnosed."
        said = "".join(self.pieces[: self.piece_index])
        lead = f"after {said!r} " if self.piece_index else ""
        return (f" Diagnosed at piece {self.piece_index + 1} of {n} {self.pieces}: the model diverges {lead}at "
                f"{self.piece!r} (token position {self.position}).")


def is_word_fragment(piece: str, target: str) -> bool:
    """Whether ``piece`` (the target's first token, as text) ends inside the target's first word: " D" of
    " Doha" does (and a piece that is only a space), " New" of " New York" and " Paris" of " Paris" do not."""
    words = target.split()
    head = piece.strip()  # a piece that is only a space (SentencePiece's lone "▁") ends before the word: a fragment
    return bool(words) and len(head) < len(words[0]) and words[0].startswith(head)


def divergence_pieces(model: nn.Module, layout: Layout, prompts: list[list[int]], targets: list[list[int]],
                      pad_id: int | None) -> list[int | None]:
    """For each row, the first piece of ``targets[b]`` the model's greedy prediction misses when the earlier pieces
    are fed (teacher forcing), or None when it predicts every piece it has room for in the context.

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
    out: list[int | None] = []
    for t in pieces:
        misses = [j for j, piece in enumerate(t) if next(predicted) != piece]
        out.append(misses[0] if misses else None)
    return out

"""The rules of ``surgery verify``: does a corrected model say its facts without breaking what its base knew?

A corrected model is verified against its base only if it says every fact, no more paraphrases are wrong than
before, each panel list broke at most ``floor(probe_tolerance * len)`` probes (0 for lists under 20) and perplexity
rose by at most ``perplexity_tolerance`` (:func:`surgery.evaluation.report.regressions`). Everything is judged by
what the models say (greedy generation, the whole answer at a word boundary). The CLI (``surgery verify``) and the
app's Verify tab both call :func:`verify`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..core.errors import InputError
from .facts import Fact
from .panels import Panel, panel_for_model
from .report import PERPLEXITY_TOLERANCE, PROBE_TOLERANCE, Comparison, compare, regressions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Verification:
    """A corrected model checked against its base: ``verified`` only if ``reasons`` is empty."""

    comparison: Comparison  # facts, panels, fluency and KL of both models, side by side
    reasons: list[str]  # one per failed check

    @property
    def verified(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"verified": self.verified, "reasons": list(self.reasons), **self.comparison.to_dict()}


def check_same_vocabulary(base: nn.Module, corrected: nn.Module, base_tokenizer, corrected_tokenizer) -> None:
    """Raise :class:`InputError` unless the two models share one vocabulary (a base and its fix always do)."""
    if base.config.vocab_size != corrected.config.vocab_size or (
        base_tokenizer.get_vocab() != corrected_tokenizer.get_vocab()
    ):
        raise InputError("the base and the corrected model use different vocabularies: not a base/fix pair")


def verify(
    base: nn.Module,
    corrected: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact] | None = None,
    panel: Panel | None = None,
    perplexity_tolerance: float = PERPLEXITY_TOLERANCE,
    probe_tolerance: float = PROBE_TOLERANCE,
) -> Verification:
    """Check ``corrected`` against ``base`` (same tokenizer) on ``facts`` and ``panel``.

    ``panel`` defaults to the bundled panel for ``base`` (:func:`surgery.evaluation.panels.panel_for_model`);
    ``facts`` to the panel's facts. Neither model is modified.
    """
    panel = panel if panel is not None else panel_for_model(base)
    if facts is None:
        facts = list(panel.facts)
        if not facts:
            raise InputError(f"panel {panel.name!r} has no facts: pass --facts FILE")
    comparison = compare(base, corrected, tokenizer, facts, panel)
    return Verification(comparison, regressions(comparison, perplexity_tolerance, probe_tolerance))

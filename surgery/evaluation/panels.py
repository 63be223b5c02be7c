"""Evaluation panels and facts files: what an edit is trained on and judged by.

A panel is a JSON file (format in ``docs/panels.md``) holding, in one model's vocabulary:

* ``facts``: the reference facts (prompt + answer) surgery is meant to fix or keep;
* ``absence``: facts the model never learnt (diagnosis shows them as absence; surgery does not apply);
* ``general``: prompts the model completes correctly, to catch lost general capability;
* ``side_effects``: prompts unrelated to the facts, to catch collateral changes;
* ``neighbourhood``: prompts close to the facts whose right answer is a function word (" the", " a") or another
  entity, so that an edit that merely suppresses " the" or says the capital everywhere is caught;
* ``relation``: other facts of the same relation, never edited (relation generalization: does a repair carry
  to them, and do the ones already right stay right?);
* ``preserve``: other facts of the same relation, never edited and never scored: surgery keeps what the model
  says after each of these prompts unchanged (part of the preservation term), so that a repair does not carry
  over to the relation's other subjects (disjoint from ``relation``, which judges exactly that);
* ``perplexity_text``: a held-out passage whose perplexity must not rise;
* ``unrelated_text``: passages for the preservation (KL) loss during training.

A fact may carry ``paraphrases``: other wordings of its prompt with the same answer, scored but never trained.
Panels are chosen per model by :func:`panel_for_model` and fitted to its tokenizer by :func:`fit_panel`
(probes the vocabulary cannot encode are dropped and listed). Each probe is a :class:`~surgery.evaluation.facts.Fact`
(prompt, answer, paraphrases); a facts list is read by :func:`~surgery.evaluation.facts.load_facts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from ..core.errors import InputError
from .facts import Fact, facts_from_json, read_json

PANELS_DIR = Path(__file__).resolve().parents[2] / "assets" / "panels"
DEMO_PANEL = PANELS_DIR / "demo.json"
GPT2_PANEL = PANELS_DIR / "gpt2.json"
ENGLISH_PANEL = PANELS_DIR / "english.json"
PROBE_LISTS = ("facts", "absence", "general", "side_effects", "neighbourhood", "relation", "preserve")
GPT2_VOCAB_SIZE = 50257  # gpt2, distilgpt2, gpt2-medium/large/xl share this BPE vocabulary


@dataclass(frozen=True)
class Panel:
    """All probes used to judge an edit of one model (see the module docstring)."""

    name: str
    description: str = ""
    facts: tuple[Fact, ...] = ()
    absence: tuple[Fact, ...] = ()
    general: tuple[Fact, ...] = ()
    side_effects: tuple[Fact, ...] = ()
    perplexity_text: str = ""
    unrelated_text: tuple[str, ...] = field(default=())
    neighbourhood: tuple[Fact, ...] = ()
    relation: tuple[Fact, ...] = ()
    preserve: tuple[Fact, ...] = ()

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description}
        d.update({key: [p.to_dict() for p in getattr(self, key)] for key in PROBE_LISTS})
        d.update(perplexity_text=self.perplexity_text, unrelated_text=list(self.unrelated_text))
        return d

    def paraphrases_of(self, prompt: str) -> tuple[str, ...]:
        """The paraphrases this panel gives for the fact with ``prompt`` (none if it has no such fact)."""
        return next((f.paraphrases for f in self.facts if f.prompt == prompt), ())

    @classmethod
    def from_dict(cls, d: dict, where: str = "panel") -> Panel:
        if not isinstance(d, dict):
            raise InputError(f"{where}: a panel is a JSON object with 'general', 'side_effects', ... (docs/panels.md)")
        texts = d.get("unrelated_text", ())
        if isinstance(texts, str):
            texts = [texts]
        lists = {key: tuple(facts_from_json(d.get(key, []), f"{where} {key}", allow_empty=True)) for key in PROBE_LISTS}
        panel = cls(
            name=str(d.get("name", where)),
            description=str(d.get("description", "")),
            perplexity_text=str(d.get("perplexity_text", "")),
            unrelated_text=tuple(str(t) for t in texts if str(t).strip()),
            **lists,
        )
        if not (panel.general or panel.side_effects or panel.neighbourhood):
            raise InputError(
                f"{where}: a panel needs at least one of 'general', 'side_effects' or 'neighbourhood' (docs/panels.md)"
            )
        return panel


def load_panel(path: str | os.PathLike) -> Panel:
    """Read a panel JSON file; raises :class:`InputError` naming what is wrong."""
    return Panel.from_dict(read_json(path, "panel file"), where=Path(path).name)


def panel_path_for_model(model: nn.Module) -> Path:
    """Which bundled panel ``model`` is judged by: the demo panel for the demo model, the GPT-2 panel for GPT-2's
    vocabulary, the English panel for any other model (fitted to its tokenizer by :func:`fit_panel`)."""
    config = model.config
    if getattr(config, "surgery_panels", None) == "demo":
        return DEMO_PANEL
    if getattr(config, "model_type", None) == "gpt2" and config.vocab_size == GPT2_VOCAB_SIZE:
        return GPT2_PANEL
    return ENGLISH_PANEL


@dataclass(frozen=True)
class FittedPanel:
    """A panel reduced to what one tokenizer can score, and what was left out and why (for the report)."""

    panel: Panel
    unavailable: tuple[str, ...] = ()  # one line per probe list, text or probe left out

    def to_dict(self) -> dict:
        return {"panel": self.panel.name, "unavailable": list(self.unavailable)}


def fit_panel(panel: Panel, tokenizer, n_ctx: int) -> FittedPanel:
    """Drop the probes ``tokenizer`` cannot encode (a word outside its vocabulary, or longer than the context) and
    the texts it cannot encode, listing each list that lost probes. English panels thus serve any English
    tokenizer; a word-level vocabulary (the demo model's) keeps only what it has words for."""
    from ..core.tokens import encode_prompt, encode_target

    def usable(probe: Fact) -> bool:
        try:
            encode_prompt(tokenizer, probe.prompt, n_ctx)
            encode_target(tokenizer, probe.target)
        except InputError:
            return False
        return True

    def encodable(text: str) -> bool:
        try:
            encode_target(tokenizer, text, "text")  # no special tokens; unknown words refused
        except InputError:
            return False
        return True

    unavailable, kept = [], {}
    for key in PROBE_LISTS:
        probes = getattr(panel, key)
        ok = [replace(p, paraphrases=tuple(x for x in p.paraphrases if encodable(x))) for p in probes if usable(p)]
        if len(ok) < len(probes):
            unavailable.append(
                f"{key}: {len(probes) - len(ok)} of {len(probes)} probes cannot be scored "
                f"(words outside this tokenizer's vocabulary, or too long)"
            )
        kept[key] = tuple(ok)
    perplexity_text = panel.perplexity_text if encodable(panel.perplexity_text or " ") else ""
    if panel.perplexity_text and not perplexity_text:
        unavailable.append("perplexity: the passage has words outside this tokenizer's vocabulary")
    texts = tuple(t for t in panel.unrelated_text if encodable(t))
    if len(texts) < len(panel.unrelated_text):
        unavailable.append(
            f"unrelated text: {len(panel.unrelated_text) - len(texts)} of "
            f"{len(panel.unrelated_text)} passages have words outside this tokenizer's vocabulary"
        )
    fitted = replace(panel, perplexity_text=perplexity_text, unrelated_text=texts, **kept)
    return FittedPanel(fitted, tuple(unavailable))


def panel_for_model(model: nn.Module) -> Panel:
    """The bundled panel for ``model`` (see :func:`panel_path_for_model`)."""
    return load_panel(panel_path_for_model(model))

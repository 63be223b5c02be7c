"""Evaluation panels and facts files: what an edit is trained on and judged by.

A panel is a JSON file (format in ``docs/panels.md``) holding, in one model's vocabulary:

* ``facts``: the reference facts (prompt + answer) surgery is meant to fix or keep;
* ``absence``: facts the model never learnt (diagnosis shows them as absence; surgery does not apply);
* ``general``: prompts the model completes correctly, to catch lost general capability;
* ``side_effects``: prompts unrelated to the facts, to catch collateral changes;
* ``perplexity_text``: a held-out passage whose perplexity must not rise;
* ``unrelated_text``: passages for the preservation (KL) loss during training.

Panels are chosen per model by :func:`panel_for_model`; a facts file is a JSON list of ``{"prompt","target"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .errors import InputError

PANELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "panels"
DEMO_PANEL = PANELS_DIR / "demo.json"
GPT2_PANEL = PANELS_DIR / "gpt2.json"
GPT2_VOCAB_SIZE = 50257  # gpt2, distilgpt2, gpt2-medium/large/xl share this BPE vocabulary


@dataclass(frozen=True)
class Probe:
    """One prompt and the answer text expected next (GPT-2 style: ``" Paris"`` with its leading space)."""

    prompt: str
    target: str

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("a probe has an empty prompt")
        if not isinstance(self.target, str) or not self.target.strip():
            raise InputError(f"the probe {self.prompt!r} has an empty target")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Panel:
    """All probes used to judge an edit of one model (see the module docstring)."""

    name: str
    description: str = ""
    facts: tuple[Probe, ...] = ()
    absence: tuple[Probe, ...] = ()
    general: tuple[Probe, ...] = ()
    side_effects: tuple[Probe, ...] = ()
    perplexity_text: str = ""
    unrelated_text: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.general or not self.side_effects:
            raise InputError(f"panel {self.name!r} needs non-empty 'general' and 'side_effects' probe lists")
        if not self.perplexity_text.strip():
            raise InputError(f"panel {self.name!r} has no 'perplexity_text'")
        if not any(t.strip() for t in self.unrelated_text):
            raise InputError(f"panel {self.name!r} has no 'unrelated_text' for the preservation loss")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("facts", "absence", "general", "side_effects", "unrelated_text"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "panel") -> "Panel":
        if not isinstance(d, dict):
            raise InputError(f"{where}: a panel is a JSON object with 'general', 'side_effects', ... (docs/panels.md)")
        texts = d.get("unrelated_text", ())
        if isinstance(texts, str):
            texts = [texts]
        return cls(
            name=str(d.get("name", where)),
            description=str(d.get("description", "")),
            facts=tuple(probes_from_json(d.get("facts", []), f"{where} facts", allow_empty=True)),
            absence=tuple(probes_from_json(d.get("absence", []), f"{where} absence", allow_empty=True)),
            general=tuple(probes_from_json(d.get("general", []), f"{where} general", allow_empty=True)),
            side_effects=tuple(probes_from_json(d.get("side_effects", []), f"{where} side_effects", allow_empty=True)),
            perplexity_text=str(d.get("perplexity_text", "")),
            unrelated_text=tuple(str(t) for t in texts),
        )


def probes_from_json(items, where: str, allow_empty: bool = False) -> list[Probe]:
    """``[{"prompt": ..., "target": ...}, ...]`` -> probes, with a message naming the bad entry."""
    if not isinstance(items, list):
        raise InputError(f"{where}: expected a list of {{\"prompt\", \"target\"}} objects")
    if not items and not allow_empty:
        raise InputError(f"{where} is empty: give at least one {{\"prompt\", \"target\"}} fact")
    probes = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"{where}: entry {i + 1} is not an object with 'prompt' and 'target'")
        for key in ("prompt", "target"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise InputError(f"{where}: entry {i + 1} has no {key!r} (each fact needs 'prompt' and 'target')")
        probes.append(Probe(item["prompt"], item["target"]))
    return probes


def _read_json(path: str | os.PathLike, what: str):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None
    if not text.strip():
        raise InputError(f"{what} {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def load_panel(path: str | os.PathLike) -> Panel:
    """Read a panel JSON file; raises :class:`InputError` naming what is wrong."""
    return Panel.from_dict(_read_json(path, "panel file"), where=Path(path).name)


def load_facts(path: str | os.PathLike) -> list[Probe]:
    """Read a facts file: a JSON list of ``{"prompt","target"}``, or a panel object (its ``facts`` are used)."""
    data = _read_json(path, "facts file")
    if isinstance(data, dict) and "facts" in data:
        data = data["facts"]
    return probes_from_json(data, f"facts file {Path(path).name}")


def panel_path_for_model(model: nn.Module) -> Path:
    """Which bundled panel fits ``model``: the demo panel for the demo model, the GPT-2 panel for GPT-2's
    vocabulary; otherwise :class:`InputError` asking for ``--panels FILE``."""
    config = model.config
    if getattr(config, "surgery_panels", None) == "demo":
        return DEMO_PANEL
    if config.vocab_size == GPT2_VOCAB_SIZE:
        return GPT2_PANEL
    raise InputError(
        f"no bundled evaluation panel fits this model (vocabulary of {config.vocab_size} tokens); "
        "pass your own with --panels FILE (format: docs/panels.md)"
    )


def panel_for_model(model: nn.Module) -> Panel:
    """The bundled panel for ``model`` (see :func:`panel_path_for_model`)."""
    return load_panel(panel_path_for_model(model))

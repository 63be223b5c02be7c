"""Transformer Surgery — the Gradio app (the Hugging Face Space): ``python app.py``.

The UI only. :func:`build_demo` lays out a model picker and four tabs — Diagnose, Heads, Surgery, Verify — whose
callbacks are the methods of :class:`SurgeryApp`: each adapts UI values to one call into the ``surgery`` library
and its result back to components. Nothing happens at import: the models are listed and the configured one loaded
by :func:`build_demo`, and the environment (``SURGERY_MODEL``, ``GRADIO_SERVER_NAME``/``PORT``, ``SPACE_ID``) is
read only by :func:`main`.

The picker offers the configured model and the other supported models this machine has
(:func:`surgery.serve.registry.local_models`); each is loaded once, on first use, into a
:class:`surgery.serve.registry.ModelRegistry` shared by every session, and never modified. Every callback takes the
picker's value last and works on that model. A session's edits live in its ``gr.State`` as a
:class:`surgery.serve.sessions.SessionEdits` — at most one :class:`~surgery.serve.sessions.SessionEdit` (patch +
report + its own download folder) per model, handed out only for the model it was made on — and that session's
requests run on a patched *view* of the base (:func:`surgery.io.edit_file.patched_model`), so sessions never see
each other's edits and an edit never reaches another model. Surgery runs through the queue one at a time (its own
concurrency group); diagnosis, generation, patching and verification have their own groups, so they stay responsive
while someone operates.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from surgery.arch import SITES, count_parameters
from surgery.core.errors import InputError, SurgeryError
from surgery.diagnosis import plots
from surgery.diagnosis.diagnose import Diagnosis, diagnose
from surgery.diagnosis.static_heads import head_table
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.generation import generate
from surgery.evaluation.panels import Panel, Probe, probes_from_json
from surgery.evaluation.report import Comparison, format_rows
from surgery.evaluation.verify import Verification, verify
from surgery.io.export import is_hub_id, write_output
from surgery.io.hub import push_folder
from surgery.io.loading import load_model
from surgery.patching import plots as patching_plots
from surgery.patching.activations import ActivationPatching, ActivationPatchingConfig, patch_activations
from surgery.patching.weights import WeightPatching, patch_weights
from surgery.serve.registry import ModelChoice, ModelRegistry, ServedModel, local_models, start_registry
from surgery.serve.sessions import SessionEdit, SessionEdits, StartUp, write_downloads

try:  # On a ZeroGPU Space, surgery and generation get a GPU for the duration of the call.
    import spaces

    gpu = spaces.GPU
except ImportError:  # Elsewhere a no-op with the same call forms: @gpu and @gpu(duration=...).

    def gpu(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)



DEFAULT_MODEL = "gpt2"
MAX_PROMPT_CHARS = 1000
MAX_NEW_TOKENS = 64
TOP_HEADS = 12
PROMOTES_TARGET, PROMOTES_COMPETITOR = "promotes the target", "promotes the competitor"
# answers: what each model says (greedy generation); then the corrected model's top-1 first token (diagnostic)
SIDE_BY_SIDE_COLUMNS = ["kind", "prompt", "target", "original answer", "corrected answer", "correct",
                        "first token (corrected)"]
DEFAULT_CORRUPT = "The capital of Poland is"  # "France" -> "Poland": one token in the demo, GPT-2 and Gemma vocabularies
HEAD_COLUMNS = ["head", "module", "QK overlap", "QK norm", "OV norm", "copying score",
                "key response: proper nouns", "key response: function words"]
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="rose", neutral_hue="slate")
CSS = """
.block.banner { border: 1px solid #f59e0b; background: #fffbeb; border-radius: 8px; padding: 2px 14px; }
.block.banner p { color: #78350f !important; }
.block.verdict { border-left: 4px solid var(--color-accent); padding: 0 14px; font-size: 1.05rem; }
.muted p { color: var(--body-text-color-subdued); font-size: 0.92rem; }
"""


# ----------------------------------------------------------------------------------------------------------------
# User errors become one gr.Error line (in the UI and for API clients), never a traceback.
# ----------------------------------------------------------------------------------------------------------------


def user_errors(fn):
    """Convert :class:`surgery.core.errors.SurgeryError` raised by a callback into ``gr.Error``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    return wrapper


def check_prompt(prompt, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the {what} is empty: type some text for the model to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the {what} is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS:,}")
    return prompt


def parse_facts(facts) -> list[Probe]:
    """Facts from the JSON editor (a string), a list of ``{"prompt","target"}`` or table rows."""
    if isinstance(facts, str):
        if not facts.strip():
            raise InputError("no facts given: add at least one {\"prompt\", \"target\"} to fix")
        try:
            facts = json.loads(facts)
        except json.JSONDecodeError as e:
            raise InputError(f"the facts are not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(facts, pd.DataFrame):
        facts = facts.values.tolist()
    if isinstance(facts, list) and facts and isinstance(facts[0], (list, tuple)):  # table rows; blank rows skipped
        facts = [{"prompt": r[0], "target": r[1] if len(r) > 1 else None} for r in facts
                 if any(str(c or "").strip() for c in r)]
    probes = probes_from_json(facts, "facts")
    for p in probes:
        check_prompt(p.prompt, "fact prompt")
    return probes


def parse_layer(layer) -> int | None:
    """``"auto"``/blank/None -> None (the prescribed layer); ``"5"`` or 5 -> 5."""
    if layer is None or str(layer).strip().lower() in ("", "auto"):
        return None
    try:
        return int(str(layer).strip())
    except ValueError:
        raise InputError(f"layer must be a block index (0, 1, ...) or auto, not {layer!r}") from None


def head_label(layer: int, head: int) -> str:
    return f"L{layer + 1} H{head}"


# ----------------------------------------------------------------------------------------------------------------
# Work that runs on the GPU when there is one (on ZeroGPU inside @spaces.GPU, possibly in another process: the
# arguments are plain objects, no closures).
# ----------------------------------------------------------------------------------------------------------------


class TrainingProgress:
    """The library's ``progress(step, total, loss)`` callback, shown on a ``gr.Progress`` bar."""

    def __init__(self, progress, site: str):
        self.progress, self.site = progress, site

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.progress((step, total), desc=f"training {self.site}: step {step}/{total}, loss {loss:.3f}",
                      unit="steps")


@gpu(duration=120)
def run_surgery(model, tokenizer, facts, config, panel, progress):
    return operate(model, tokenizer, facts, config, panel=panel, progress=progress)


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
# The callbacks. Each takes the picker's value (a model key) last; None means the registry's default model.
# ----------------------------------------------------------------------------------------------------------------


class SurgeryApp:
    """The app's event functions, serving the registry's shared base models (never modified)."""

    def __init__(self, registry: ModelRegistry, *, allow_local_models: bool = True, work_dir: str | None = None):
        self.registry = registry
        self.fallback_reason = registry.fallback_reason
        self.allow_local_models = allow_local_models
        self.work_dir = work_dir

    def served(self, model: str | None = None) -> ServedModel:
        """The picked model (loaded on first use; shared by every session)."""
        return self.registry.get(model or None)

    @staticmethod
    def edit_of(edits: SessionEdits | None, served: ServedModel) -> SessionEdit | None:
        """This session's edit of ``served``, never one made on another model."""
        return edits.get(served.key) if edits is not None else None

    # --- The model picker ------------------------------------------------------------------------------------

    @user_errors
    def select_model(self, model: str, edits: SessionEdits | None, progress=gr.Progress()):
        """Switch this session to ``model`` (loading it on first use). Returns, in the order of ``model_view`` in
        :func:`build_demo`: the model line, the examples, the Diagnose prompt/target/competitor, the Surgery tab's
        site, layer, facts note, facts table and JSON, generation prompt and repository name, and — when this
        session already edited this model — that edit's results (:func:`surgery_outputs`) and their visibility."""
        if not self.registry.is_loaded(model):
            progress(0, desc=f"loading {model} (first use: it stays loaded for everyone)")
        served = self.served(model)
        first = first_fact(served)
        edit = self.edit_of(edits, served)
        return (model_line(served), examples_update(served), first.prompt, first.target, "",
                gr.Radio(choices=site_choices(served), value="wv"),
                gr.Dropdown(choices=layer_choices(served), value="auto"),
                facts_note(served), [[p.prompt, p.target] for p in served.facts] or None, facts_json(served),
                first.prompt, repo_name(served),
                *surgery_outputs(edit), gr.Column(visible=edit is not None))

    # --- Diagnose --------------------------------------------------------------------------------------------

    @user_errors
    def diagnose(self, prompt: str, target: str, competitor: str = "", model: str | None = None):
        """Why does the model (not) answer ``target`` after ``prompt``? Returns the verdict sentence, the
        logit-lens chart, the layer×head heatmap, the top heads and the whole diagnosis as JSON."""
        check_prompt(prompt)
        served = self.served(model)
        d = diagnose(served.model, served.tokenizer, prompt, target, (competitor or "").strip() or None)
        return (verdict_markdown(d), plots.cumulative_logit_plot(d), plots.attribution_heatmap(d),
                top_heads(d, TOP_HEADS), d.to_dict())

    @user_errors
    def patch_activations(self, prompt: str, corrupt: str, target: str, competitor: str = "",
                          kind: str = "resid", model: str | None = None):
        """Activation patching from the diagnosed (clean) prompt into ``corrupt``: which block outputs at which
        positions (``kind``: resid, attn or mlp) and which heads carry the target's lead? Returns a summary, the
        block×position and block×head heatmaps, and the result as JSON."""
        check_prompt(prompt)
        check_prompt(corrupt, "corrupted prompt")
        if kind not in ("resid", "attn", "mlp"):
            raise InputError(f"unknown grid {kind!r}: choose resid, attn or mlp")
        served = self.served(model)
        result = run_activation_patching(served.model, served.tokenizer, prompt, corrupt, target,
                                         (competitor or "").strip() or None,
                                         ActivationPatchingConfig(kinds=(kind, "head")))
        return (activation_markdown(result, kind), patching_plots.patching_heatmap(result, kind),
                patching_plots.patching_heatmap(result, "head"), result.to_dict())

    # --- Surgery ---------------------------------------------------------------------------------------------

    @user_errors
    def operate(self, facts: str, site: str, layer, edits: SessionEdits | None, model: str | None = None,
                progress=gr.Progress()):
        """Train one site of the picked model so that the facts come out right. The edit is kept in this session
        only, as this model's edit (replacing this session's earlier edit of the same model)."""
        probes = parse_facts(facts)
        config = SurgeryConfig(site=site, layer=parse_layer(layer))
        served = self.served(model)

        progress(0, desc="diagnosing the facts, capturing the frozen layers")
        result = run_surgery(served.model, served.tokenizer, probes, config, served.panel,
                             TrainingProgress(progress, site))
        progress(1, desc="writing the patch and the report")
        folder = Path(tempfile.mkdtemp(prefix="surgery-session-", dir=self.work_dir))
        files = write_downloads(folder, served.loaded, result)
        new = SessionEdit(result=result, facts=probes, folder=folder, files=list(files), model_key=served.key)
        edits = edits if edits is not None else SessionEdits()
        edits.put(new)
        return (*surgery_outputs(new), edits)

    @user_errors
    def generate(self, prompt: str, max_new_tokens: int, edits: SessionEdits | None, model: str | None = None):
        """Greedy continuations of ``prompt``: the original model, and this session's corrected model."""
        check_prompt(prompt)
        n = max(1, min(int(max_new_tokens or 20), MAX_NEW_TOKENS))
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if edit is None:
            (original,) = run_generation([served.model], served.tokenizer, prompt, n)
            return original, "(no surgery on this model in this session yet)"
        original, corrected = run_generation([served.model, edit.model(served.model)], served.tokenizer, prompt, n)
        return original, corrected

    @user_errors
    def push(self, repo_name: str, private: bool, edits: SessionEdits | None, model: str | None = None,
             oauth_token: gr.OAuthToken | None = None, profile: gr.OAuthProfile | None = None):
        """Push this session's corrected model (model folder, patch, report, model card) to the signed-in user's
        own namespace."""
        if oauth_token is None or profile is None:
            raise gr.Error("Sign in with Hugging Face first: the model is pushed to your own account, with your "
                           "permission.", print_exception=False)
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if edit is None:
            raise InputError("nothing to push yet: perform surgery on this model first")
        name = (repo_name or "").strip().split("/")[-1]
        if not name:
            raise InputError("give the new model repository a name, e.g. gpt2-capitals-fixed")
        folder = edit.folder / "model"
        if not folder.exists():
            write_output(folder, served.loaded, edit.result)
        url = push_folder(folder, f"{profile.username}/{name}", token=oauth_token.token, private=bool(private))
        return f"Pushed to [{profile.username}/{name}]({url})."

    # --- Verify ----------------------------------------------------------------------------------------------

    @user_errors
    def verify(self, corrected: str, edits: SessionEdits | None, model: str | None = None):
        """The facts (and their paraphrases) and the panels on the original and on a corrected model, side by
        side. ``corrected``: a Hub id or a folder, or blank for this session's edit of the picked model."""
        source = (corrected or "").strip()
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if source:
            if not self.allow_local_models and not is_hub_id(source):
                raise InputError("give a Hub model id (user/name); local folders are not read on the Space")
            other = load_model(source, device=device_of(served))
            if other.tokenizer.get_vocab() != served.tokenizer.get_vocab():
                raise InputError(f"{source} uses another vocabulary than the base model: it is not a fix of it")
            corrected_model, label = other.model, source
        elif edit is not None:
            corrected_model, label = edit.model(served.model), "this session's edit"
        else:
            raise InputError("nothing to verify yet: perform surgery on this model in this session, or give a Hub "
                             "id or a folder")
        facts = served.facts + ([f for f in edit.facts if f not in served.facts] if edit is not None and not source
                                else [])
        return verification_outputs(verify(served.model, corrected_model, served.tokenizer, facts, served.panel), label)

    @user_errors
    def patch_weights(self, granularity: str, edits: SessionEdits | None, model: str | None = None):
        """Weight patching of this session's edit: copy each changed component (a site, or a head's V/O slice)
        of the corrected model into the original, one at a time, and score the edit's facts on each hybrid."""
        served = self.served(model)
        edit = self.edit_of(edits, served)
        if edit is None:
            raise InputError("no edit to take apart yet: perform surgery on this model in this session first")
        result = run_weight_patching(served.model, edit.model(served.model), served.tokenizer, edit.facts,
                                     granularity)
        return weight_markdown(result), patching_plots.weight_patching_chart(result), result.to_dict()

    # --- Heads -----------------------------------------------------------------------------------------------

    @user_errors
    def heads(self, model: str | None = None):
        """Static, input-free views of every head (the table is computed once per model and cached)."""
        served = self.served(model)
        table = head_table(served.model, served.tokenizer, cache=served.head_cache)
        rows = [[s.label, f"{served.layout.adapter.block(s.layer)} head {s.head}", *(_round(v) for v in (
                    s.qk_overlap, s.qk_norm, s.ov_norm, s.copying_score, s.key_response.get("proper_noun"),
                    s.key_response.get("function_word")))] for s in table]
        return plots.qk_overlap_heatmap(table), plots.key_response_plot(table), rows


def device_of(served: ServedModel) -> torch.device:
    return next(served.model.parameters()).device


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------------------------------------------
# Result -> Markdown and table rows.
# ----------------------------------------------------------------------------------------------------------------


def top_heads(d: Diagnosis, k: int) -> pd.DataFrame:
    """The ``k`` heads with the largest |target − competitor| attribution, for a bar chart (the chart orders
    them from the strongest push towards the target to the strongest push towards the competitor)."""
    heads = d.top_heads(k)
    return pd.DataFrame({
        "head": [head_label(a.layer, a.head) for a in heads],
        "target − competitor": [a.target - a.competitor for a in heads],
        "pushes": [PROMOTES_TARGET if a.target > a.competitor else PROMOTES_COMPETITOR for a in heads],
        "target": [a.target for a in heads],
        "competitor": [a.competitor for a in heads],
    })


def verdict_markdown(d: Diagnosis) -> str:
    """The verdict sentence, headed by what the model actually answers."""
    v = d.divergence
    after = f" after {v.before!r}" if v is not None and v.before else ""  # read at the answer's first missed piece
    head = (f"**{d.verdict.capitalize()}** · the model answers **{d.prediction.text!r}**{after}; "
            f"target {d.target.text!r} is rank {d.target.rank} ({d.target.logit:.2f}) vs "
            f"{d.competitor.text!r} ({d.competitor.logit:.2f})")
    return f"{head}\n\n{d.summary()}"


def side_by_side_rows(c: Comparison) -> list[list[str]]:
    """What the original and the corrected model say (:data:`SIDE_BY_SIDE_COLUMNS`): the facts, then each
    fact's paraphrases; ✓ when the corrected model says the whole answer, and its top-1 first token beside."""
    def row(kind: str, f) -> list[str]:
        first = f"{f.first_token_after!r} {'✓' if f.first_token_correct_after else '✗'}"
        return [kind, f.prompt, f.target, f.before, f.after, "✓" if f.correct_after else "✗", first]

    return [row("fact", f) for f in c.facts] + [row("paraphrase", p) for p in c.paraphrases]


def evaluation_markdown(rows: list[tuple[str, str, str]], c: Comparison) -> str:
    """The before/after table (efficacy, paraphrases, unedited facts, neighbourhood, side effects, perplexity,
    fluency, KL, ...; counts of what the model says, lenient and first-token counts beside), what the corrected
    model says wherever it is wrong, and what this tokenizer could not score."""
    text = ("*Counts of what each model **says** (greedy generation: the whole answer, at a word boundary); "
            "beside them the lenient count (the answer within the first few words) and the first-token count "
            "(top-1 next token only, a diagnostic).*\n\n" + format_rows(rows, markdown=True))
    text += "\n\n" + wrong_markdown(c)
    if c.unavailable:
        text += "\n\n*Not scored with this tokenizer: " + "; ".join(c.unavailable) + ".*"
    return text


def wrong_markdown(c: Comparison) -> str:
    """What the corrected model says wherever it is wrong: facts and paraphrases not said, probes broken or
    changed (:meth:`~surgery.evaluation.report.Comparison.wrong_after`)."""
    wrong = c.wrong_after()
    if not wrong:
        return "**What the corrected model says:** every fact and paraphrase right, no probe broken or changed."
    cell = lambda text: repr(text).replace("|", "\\|")  # noqa: E731
    lines = ["**What the corrected model says where it is wrong**", "",
             "| kind | | prompt | says | expected | original said |", "|---|---|---|---|---|---|"]
    lines += [f"| {w.kind} | {w.why} | {cell(w.prompt)} | {cell(w.after)} | {cell(w.target)} | {cell(w.before)} |"
              for w in wrong]
    return "\n".join(lines)


def operation_markdown(report) -> str:
    c = report.comparison
    n = len(c.facts)
    where = f"`{report.block}`" if report.block else f"block {report.layer}"
    para = c.evaluation()["paraphrase"]
    paraphrases = (f" Paraphrases: {para['before']}/{para['total']} → **{para['after']}/{para['total']}**."
                   if para["total"] else "")
    return (f"**Surgery done** on `{report.site}` of {where} (L{report.layer + 1}) — "
            f"{report.params_in_site:,} parameters ({100 * report.fraction:.2f}% of the model), "
            f"{report.steps} steps in {report.train_time_s:.1f} s. Facts said: **{c.facts_before}/{n} → "
            f"{c.facts_after}/{n}**.{paraphrases}\n\n*Layer: {report.layer_reason}.*")


NO_EDIT_YET = "The shared model is never changed: your edit lives in your session only."


def surgery_outputs(edit: SessionEdit | None) -> tuple:
    """What the Surgery tab shows for an edit (summary, evaluation table, side-by-side rows, downloads, report
    JSON), or its empty state."""
    if edit is None:
        return NO_EDIT_YET, "", None, None, None
    report = edit.result.report
    return (operation_markdown(report), evaluation_markdown(report.rows(), report.comparison),
            side_by_side_rows(report.comparison), [str(p) for p in edit.files], edit.result.to_dict())


def verification_outputs(v: Verification, label: str):
    """Verdict line, side-by-side rows, evaluation table and JSON of a verification (the rules of
    ``surgery verify``: :func:`surgery.evaluation.verify.verify`)."""
    c, reasons = v.comparison, v.reasons
    n = len(c.facts)
    verdict = (f"**✓ Verified — {label}**: the corrected model says {c.facts_after}/{n} facts (original "
               f"{c.facts_before}/{n}), no panel regressed." if not reasons else
               f"**✗ Not verified — {label}**: " + "; ".join(reasons) + ".")
    return verdict, side_by_side_rows(c), evaluation_markdown(c.rows(), c), {
        "verified": not reasons, "reasons": reasons, "corrected": label, **c.to_dict()}


def activation_markdown(r: ActivationPatching, kind: str) -> str:
    """Both runs' logit differences and the units restoring the most of it."""
    layer, pos, value = r.grids[kind].best()
    clean, corrupt = r.clean_tokens[pos], r.corrupt_tokens[pos]
    token = repr(clean) if clean == corrupt else f"{clean!r}→{corrupt!r}"
    h_layer, head, h_value = r.grids["head"].best()
    what = {"resid": "block output", "attn": "attention output", "mlp": "MLP output"}[kind]
    return (f"`d = logit({r.target.text!r}) − logit({r.competitor.text!r})` ({r.competitor_source}): clean "
            f"**{r.logit_diff_clean:+.3f}**, corrupted **{r.logit_diff_corrupt:+.3f}**. Restoring the most: the "
            f"{what} of **L{layer + 1}** at {token} (**{value:.2f}** of the difference) and head "
            f"**{head_label(h_layer, head)}** at every position (**{h_value:.2f}**). 1 = the clean run's "
            f"difference, 0 = the corrupted run's.")


def weight_markdown(w: WeightPatching) -> str:
    """Which changed component of the edit moves the facts, as weight patching scores it."""
    n = w.facts_total
    text = (f"Facts right: original **{w.recipient_correct}/{n}**, this session's edit **{w.donor_correct}/{n}**. ")
    best = w.best()
    if best is None:
        return text + "The edit changed no component's weights."
    name = f"L{best.layer + 1} {best.name}" if best.head is None else f"{head_label(best.layer, best.head)} {best.name}"
    return text + (f"Copying **{name}** alone into the original raises the target logit most "
                   f"({best.mean_target_logit_change:+.3f} on average; {best.facts_correct}/{n} facts right on "
                   f"that hybrid). {len(w.components)} changed components scored, {w.skipped_identical} left out "
                   "(identical in both models).")


# ----------------------------------------------------------------------------------------------------------------
# The page.
# ----------------------------------------------------------------------------------------------------------------

INTRO = """# Transformer Surgery
*Diagnose why a language model answers wrong, edit one site of one layer, verify and ship the fix.*"""


def build_demo(model_name: str | os.PathLike | None = None, *, registry: ModelRegistry | None = None,
               startup: StartUp | None = None, device=None, panel: Panel | None = None, login: bool = False,
               allow_local_models: bool = True, work_dir: str | None = None) -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (not launched).

    ``model_name``: the configured model — a Hub id, a folder, a ``.gguf`` file or ``gemma3-270m`` (default
    ``gpt2``) — loaded now and listed first in the picker, followed by the other supported models this machine
    has (:func:`surgery.serve.registry.local_models`), each loaded on first use. When it cannot be loaded (e.g. the Hub
    is unreachable) the bundled demo model is served first and a banner says so. ``registry``: the models to
    serve instead (tests); ``startup``: one already loaded model to serve alone (tests), judged by ``panel``
    (default: its bundled panel). ``login``: show "Sign in with Hugging Face" (needs a Space with
    ``hf_oauth: true``: elsewhere Gradio can only mock it with a locally saved HF token, and refuses to start
    without one). ``allow_local_models``: let Verify read local folders (off on a public Space). ``work_dir``:
    where per-session files go (default: temp).
    """
    if registry is None:
        if startup is not None:
            registry = single_model_registry(startup, panel)
        else:
            registry = start_registry(model_name or DEFAULT_MODEL, device=device, others=local_models())
    app = SurgeryApp(registry, allow_local_models=allow_local_models, work_dir=work_dir)
    served = app.served()
    # delete_cache: downloads copied into Gradio's cache are removed after a few hours (a Space runs for weeks).
    with gr.Blocks(title="Transformer Surgery", delete_cache=(3600, 4 * 3600)) as demo:
        gr.Markdown(INTRO)
        if app.fallback_reason:
            reason = app.fallback_reason.split("; offline, use the bundled demo model")[0]  # the banner says it
            gr.Markdown(f"⚠️ **Running the bundled demo model** — {html.escape(reason)}. It is a small "
                        "GPT-2 trained to reproduce the reference failure (six capitals answered with *the*).",
                        elem_classes="banner", elem_id="fallback-banner")
        with gr.Row(equal_height=True):
            picker = gr.Dropdown([(c.label, c.key) for c in registry.choices], value=served.key, label="Model",
                                 info="each model is loaded once, on first use, and shared; your edits stay in "
                                      "your session, one per model", scale=1, min_width=280, elem_id="model-picker")
            line = gr.Markdown(model_line(served), elem_classes="muted", elem_id="model-line")
        edits = gr.State(None, delete_callback=lambda e: e.discard() if e is not None else None)
        with gr.Tabs():
            with gr.Tab("Diagnose", id="diagnose"):
                diag = diagnose_tab(app, served, demo, picker)
            with gr.Tab("Heads", id="heads") as tab:
                heads = heads_tab(app, tab, picker)
            with gr.Tab("Surgery", id="surgery"):
                surg = surgery_tab(app, served, edits, picker, login)
            with gr.Tab("Verify", id="verify"):
                ver = verify_tab(app, edits, picker)

        # Switching models: results of the previous model are cleared at once, then the new model is loaded (on
        # first use) and every tab set up for it, then its first example is diagnosed.
        stale = diag["patching"] + heads + surg["generated"] + ver
        model_view = [line, diag["examples"], diag["prompt"], diag["target"], diag["competitor"], *surg["setup"],
                      *surg["results"], surg["results_box"]]
        picker.change(lambda: [None] * len(stale), None, stale, queue=False, api_visibility="private",
                      ).then(app.select_model, [picker, edits], model_view, api_visibility="private",
                             concurrency_limit=4, concurrency_id="select", show_progress_on=line,
                             ).success(app.diagnose, [diag["prompt"], diag["target"], diag["competitor"], picker],
                                       diag["outputs"], api_visibility="private", concurrency_limit=4,
                                       concurrency_id="diagnose")
    demo.queue(default_concurrency_limit=2)
    return demo


def single_model_registry(startup: StartUp, panel: Panel | None = None) -> ModelRegistry:
    """A registry serving one already loaded model (tests, and embedding the app around a model in memory)."""
    loaded = startup.loaded
    key = "assets/demo-model" if loaded.is_demo else loaded.source
    choice = ModelChoice(key, "bundled demo model" if loaded.is_demo else Path(loaded.source).name, loaded.source)
    return ModelRegistry([choice], loaded={key: loaded}, panels={key: panel} if panel is not None else None,
                         fallback_reason=startup.fallback_reason)


def model_line(served: ServedModel) -> str:
    lay, loaded = served.layout, served.loaded
    name = "bundled demo model" if loaded.is_demo else Path(served.key).name if Path(served.key).is_absolute() \
        else served.key
    return (f"Model: **{name}** ({loaded.model.config.model_type}) · {count_parameters(loaded.model) / 1e6:.1f}M "
            f"parameters · {lay.n_layer} layers × {lay.n_head} heads · running on "
            f"{device_of(served).type.upper()}. Layers are shown 1-indexed as in the reference write-up "
            f"(L{lay.n_layer} = `{lay.adapter.block(lay.n_layer - 1)}`).")


def first_fact(served: ServedModel) -> Probe:
    """What the Diagnose and generation boxes start with: the panel's first fact (France without one)."""
    return served.facts[0] if served.facts else Probe("The capital of France is", " Paris")


def facts_json(served: ServedModel) -> str:
    return json.dumps([p.to_dict() for p in served.facts], indent=1)


def repo_name(served: ServedModel) -> str:
    return f"{Path(served.key).name}-surgery"


def example_fields(served: ServedModel) -> dict:
    """The Diagnose tab's examples: the model's fact panel, one click each (``gr.Dataset`` arguments)."""
    facts = served.facts
    return {"samples": [[f.prompt, f.target] for f in facts], "sample_labels": [example_label(f) for f in facts],
            "label": f"The {len(facts)} capitals of the fact panel (click one to diagnose it)",
            "visible": bool(facts)}


def examples_update(served: ServedModel) -> gr.Dataset:
    return gr.Dataset(**example_fields(served))


def pick_example(sample) -> tuple[str, str, str]:
    return sample[0], sample[1], ""


def diagnose_tab(app: SurgeryApp, served: ServedModel, demo: gr.Blocks, picker: gr.Dropdown) -> dict:
    with gr.Row():
        with gr.Column(scale=2):
            first = first_fact(served)
            prompt = gr.Textbox(label="Prompt", value=first.prompt, max_lines=4)
            with gr.Row():
                target = gr.Textbox(label="Target (the right answer)", value=first.target,
                                    info="words usually start with a space: ' Paris'")
                competitor = gr.Textbox(label="Competitor (optional)", placeholder="default: the model's answer")
            run = gr.Button("Diagnose", variant="primary")
            examples = gr.Dataset(components=[prompt, target], samples_per_page=12, elem_id="examples",
                                  **example_fields(served))
        with gr.Column(scale=3):
            verdict = gr.Markdown("Press **Diagnose**.", elem_classes="verdict", elem_id="verdict")
            lens = gr.Plot(label="Logit lens: target vs competitor after each layer", show_label=False,
                           elem_id="lens-plot")
    with gr.Row():
        heatmap = gr.Plot(label="Per-head direct logit attribution: target − competitor", show_label=False,
                          elem_id="head-heatmap", scale=3)
        bars = gr.BarPlot(x="head", y="target − competitor", color="pushes", sort="-y", x_label_angle=-40,
                          color_map={PROMOTES_TARGET: "#2563eb", PROMOTES_COMPETITOR: "#dc2626"},
                          tooltip=["head", "target", "competitor", "target − competitor"],
                          title=f"Top {TOP_HEADS} heads by |target − competitor|", show_label=False,
                          elem_id="top-heads", height=440, scale=2)
    with gr.Accordion("Full diagnosis (JSON)", open=False):
        raw = gr.JSON(label="diagnosis")
    outputs = [verdict, lens, heatmap, bars, raw]
    inputs = [prompt, target, competitor, picker]
    gr.on([run.click, prompt.submit, target.submit, competitor.submit], app.diagnose, inputs, outputs,
          api_name="diagnose", concurrency_limit=4, concurrency_id="diagnose")
    # The page opens on the first example already diagnosed, rather than on empty charts.
    demo.load(app.diagnose, inputs, outputs, api_visibility="private", concurrency_limit=4, concurrency_id="diagnose")
    examples.click(pick_example, examples, [prompt, target, competitor], queue=False, api_visibility="private",
                   ).then(app.diagnose, inputs, outputs, api_visibility="private", concurrency_limit=4,
                          concurrency_id="diagnose")
    patching = activation_patching_view(app, prompt, target, competitor, picker)
    return {"prompt": prompt, "target": target, "competitor": competitor, "examples": examples,
            "outputs": outputs, "patching": patching}


def activation_patching_view(app: SurgeryApp, prompt, target, competitor, picker) -> list:
    with gr.Accordion("Causal check: activation patching", open=False, elem_id="activation-patching"):
        gr.Markdown("Run the prompt above (clean) and a corrupted prompt of the same token length, then run the "
                    "corrupted one again with one activation taken from the clean run — every block at every "
                    "position, and every head at all positions. Each cell is the fraction of the clean run's "
                    "lead of the target over the competitor that this one activation restores. The target and "
                    "competitor are the ones above (default competitor: the corrupted run's answer).",
                    elem_classes="muted")
        with gr.Row():
            corrupt = gr.Textbox(label="Corrupted prompt", value=DEFAULT_CORRUPT, scale=3,
                                 info="same number of tokens as the prompt: swap a word for one of the same length")
            kind = gr.Radio([("block output", "resid"), ("attention output", "attn"), ("MLP output", "mlp")],
                            value="resid", label="Block × position grid", scale=2)
            go = gr.Button("Patch activations", scale=1)
        summary = gr.Markdown(elem_id="activation-summary")
        with gr.Row():
            positions = gr.Plot(label="Block × position", show_label=False, elem_id="patching-positions")
            heads = gr.Plot(label="Block × head", show_label=False, elem_id="patching-heads")
        raw = gr.JSON(visible=False)
    gr.on([go.click, corrupt.submit], app.patch_activations, [prompt, corrupt, target, competitor, kind, picker],
          [summary, positions, heads, raw], api_name="patch_activations", concurrency_limit=1,
          concurrency_id="patching")
    return [summary, positions, heads, raw]


def example_label(fact: Probe) -> str:
    """'France → Paris' for 'The capital of France is' / ' Paris' (the last word of the prompt otherwise)."""
    words = fact.prompt.strip().removesuffix(" is").split()
    return f"{words[-1] if words else fact.prompt} → {fact.target.strip()}"


def heads_tab(app: SurgeryApp, tab: gr.Tab, picker: gr.Dropdown) -> list:
    gr.Markdown("Input-free views of every attention head, from the weights alone (computed when this tab is "
                "opened, once per model): how much each head's query and key read the same input dimensions (QK "
                "overlap), and how strongly its keys respond to each class of token.", elem_classes="muted")
    with gr.Row():
        overlap = gr.Plot(label="QK overlap per head", show_label=False, scale=3)
        keys = gr.Plot(label="Key response by token class, per layer", show_label=False, scale=2)
    table = gr.Dataframe(headers=HEAD_COLUMNS, label="Every head (click a column to sort)", interactive=False,
                         max_height=420)
    tab.select(app.heads, picker, [overlap, keys, table], api_name="heads", concurrency_limit=1,
               concurrency_id="heads")
    return [overlap, keys, table]


def site_choices(served: ServedModel) -> list[tuple[str, str]]:
    total = count_parameters(served.model)
    out = []
    for site in SITES:
        n = served.layout.site_size(served.model, site, 0)
        out.append((f"{site} · {n:,} params ({100 * n / total:.2f}%)", site))
    return out


def layer_choices(served: ServedModel) -> list[tuple[str, str]]:
    prescribed = served.prescribed_layer
    block = served.layout.adapter.block
    auto = (f"auto — prescribed: L{prescribed + 1} ({block(prescribed)})" if prescribed is not None
            else "auto — prescribed by the diagnosis")
    return [(auto, "auto")] + [(f"L{l + 1} ({block(l)})", str(l)) for l in range(served.layout.n_layer)]


def facts_note(served: ServedModel) -> str:
    """Which panel facts the base model gets wrong (surgery should fix them) and right (the edit must keep them)."""
    if not served.facts:
        return "No bundled fact fits this model's vocabulary: write the facts to fix as JSON."
    try:
        scores = served.fact_scores
    except SurgeryError as e:  # a panel that does not fit this tokenizer: say so instead of failing to start
        return f"The fact panel does not fit this model: {html.escape(str(e), quote=False)}."
    wrong = [r for r in scores.results if not r.correct]
    right = [r for r in scores.results if r.correct]
    text = f"The base model gets **{len(wrong)} of {scores.total}** panel facts wrong"
    if wrong:
        text += ": " + ", ".join(f"{r.target.strip()} (answers {r.answer.strip()!r})" for r in wrong)
    if right:
        text += ". Right now, and kept in the facts so the edit must not break them: " + \
            ", ".join(r.target.strip() for r in right)
    return text + "."


def facts_table(facts_json: str):
    try:
        return [[p.prompt, p.target] for p in parse_facts(facts_json)]
    except SurgeryError:
        return gr.skip()


def table_to_json(rows) -> str:
    try:
        return json.dumps([p.to_dict() for p in parse_facts(rows)], indent=1)
    except SurgeryError:
        return gr.skip()


def surgery_tab(app: SurgeryApp, served: ServedModel, edits: gr.State, picker: gr.Dropdown, login: bool) -> dict:
    facts_list = served.facts
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            note = gr.Markdown(facts_note(served), elem_classes="muted")
            with gr.Tabs():
                with gr.Tab("Facts (table)"):
                    table = gr.Dataframe(value=[[p.prompt, p.target] for p in facts_list] or None,
                                         headers=["prompt", "target"], datatype=["str", "str"],
                                         interactive=True, row_count=len(facts_list) or 1, show_label=False,
                                         column_widths=["70%", "30%"])
                with gr.Tab("Facts (JSON)"):
                    facts = gr.Code(value=facts_json(served), language="json",
                                    interactive=True, show_label=False, elem_id="facts-json")
        with gr.Column(scale=2):
            site = gr.Radio(site_choices(served), value="wv", label="Site (trainable parameters)",
                            info="wv trains only the value projection of one layer: Q, K and everything "
                                 "else stay bitwise identical")
            layer = gr.Dropdown(layer_choices(served), value="auto", label="Layer")
            go = gr.Button("Perform surgery", variant="primary", elem_id="operate")
    summary = gr.Markdown(NO_EDIT_YET, elem_classes="verdict", elem_id="surgery-summary", min_height=64)
    with gr.Column(visible=False) as results:
        gr.Markdown("**Original vs corrected** on the edited facts and their paraphrases (never trained on), and "
                    "the evaluation of the edit: efficacy, generalization (paraphrases, unedited facts of the same "
                    "relation) and specificity (neighbourhood prompts, side effects, perplexity, KL).",
                    elem_classes="muted")
        with gr.Row(equal_height=False):
            outcome = gr.Dataframe(headers=SIDE_BY_SIDE_COLUMNS, label="Original vs corrected", interactive=False,
                                   wrap=True, scale=3, elem_id="side-by-side")
            with gr.Column(scale=2, min_width=420):
                metrics = gr.Markdown(elem_id="surgery-evaluation")
        downloads = gr.File(label="Downloads: patch.safetensors (only the changed weights) and report.json",
                            file_count="multiple", interactive=False)
        report = gr.JSON(visible=False)
    table.input(table_to_json, table, facts, api_visibility="private", queue=False)
    facts.input(facts_table, facts, table, api_visibility="private", queue=False)

    gr.Markdown("### Original vs corrected, any prompt\nThe same greedy continuation from the shared original "
                "model and from this session's corrected model (filled in after surgery with the first fact).")
    with gr.Row():
        gen_prompt = gr.Textbox(label="Prompt", value=facts_list[0].prompt if facts_list else "", scale=4)
        tokens = gr.Slider(1, MAX_NEW_TOKENS, value=8, step=1, label="New tokens", scale=2)
        gen = gr.Button("Generate", scale=1)
    with gr.Row():
        original = gr.Textbox(label="Original model", lines=2, elem_id="gen-original")
        corrected = gr.Textbox(label="Corrected model (this session)", lines=2, elem_id="gen-corrected")
    gr.on([gen.click, gen_prompt.submit], app.generate, [gen_prompt, tokens, edits, picker], [original, corrected],
          api_name="generate", concurrency_limit=2, concurrency_id="generate")
    go.click(app.operate, [facts, site, layer, edits, picker], [summary, metrics, outcome, downloads, report, edits],
             api_name="operate", concurrency_limit=1, concurrency_id="surgery", show_progress_on=summary,
             ).success(lambda: gr.Column(visible=True), None, results, api_visibility="private", queue=False,
                       ).then(app.generate, [gen_prompt, tokens, edits, picker], [original, corrected],
                              api_visibility="private", concurrency_limit=2, concurrency_id="generate")

    gr.Markdown("### Ship it\nPush the corrected model (model folder, patch, report and model card) to a new "
                "repository in your own Hugging Face account." + ("" if login else
                " Signing in works on the Space; locally, use `python -m surgery push` with `HF_TOKEN`."))
    with gr.Row():
        if login:
            gr.LoginButton(scale=1)
        repo = gr.Textbox(label="Repository name", value=repo_name(served), scale=3)
        private = gr.Checkbox(label="private", value=False, scale=1)
        push = gr.Button("Push to Hub", scale=1)
    pushed = gr.Markdown()
    push.click(app.push, [repo, private, edits, picker], pushed, api_name="push", concurrency_limit=1,
               concurrency_id="push")
    return {"setup": [site, layer, note, table, facts, gen_prompt, repo],
            "results": [summary, metrics, outcome, downloads, report], "results_box": results,
            "generated": [original, corrected, pushed]}


def verify_tab(app: SurgeryApp, edits: gr.State, picker: gr.Dropdown) -> list:
    gr.Markdown("The facts, their paraphrases and the evaluation panels on the original and on a corrected model, "
                "side by side: this session's edit of the picked model, or any Hub id or folder (e.g. a model "
                "pushed from here).", elem_classes="muted")
    with gr.Row():
        source = gr.Textbox(label="Corrected model", placeholder="blank: this session's edit; or user/model",
                            scale=4)
        go = gr.Button("Verify", variant="primary", scale=1)
    verdict = gr.Markdown(elem_classes="verdict", elem_id="verify-verdict")
    with gr.Row():
        facts = gr.Dataframe(headers=SIDE_BY_SIDE_COLUMNS, label="Original vs corrected", interactive=False,
                             wrap=True, scale=3)
        with gr.Column(scale=2, min_width=320):
            panels = gr.Markdown(elem_id="verify-evaluation")
    raw = gr.JSON(visible=False)
    go.click(app.verify, [source, edits, picker], [verdict, facts, panels, raw], api_name="verify",
             concurrency_limit=1, concurrency_id="verify")

    gr.Markdown("### Which weights carry the fix? (weight patching)\nEach component this session's edit changed "
                "— the trained site, or one head's V or O slice — is copied alone from the corrected model into "
                "the original, and the edit's facts are scored on that hybrid.", elem_classes="muted")
    with gr.Row():
        granularity = gr.Radio([("each site", "site"), ("each head's V and O slices", "head")], value="site",
                               label="Components", scale=3)
        patch = gr.Button("Patch weights", scale=1)
    summary = gr.Markdown(elem_id="weight-summary")
    chart = gr.Plot(label="Weight patching", show_label=False, elem_id="weight-chart")
    weights = gr.JSON(visible=False)
    patch.click(app.patch_weights, [granularity, edits, picker], [summary, chart, weights], api_name="patch_weights",
                concurrency_limit=1, concurrency_id="patching")
    return [verdict, facts, panels, raw, summary, chart, weights]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    on_space = bool(os.environ.get("SPACE_ID"))
    oauth = on_space and bool(os.environ.get("OAUTH_CLIENT_ID"))  # set by the Space when hf_oauth: true
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    demo = build_demo(os.environ.get("SURGERY_MODEL", DEFAULT_MODEL), device=device, login=oauth,
                      allow_local_models=not on_space)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), theme=THEME, css=CSS,
                footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()

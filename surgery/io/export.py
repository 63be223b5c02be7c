"""Writing an edit to disk: a full model folder, the edit file, the report and a model card — atomically.

An output folder holds:

* the corrected model, loadable with ``from_pretrained`` (``config.json`` — keeping a ``surgery_panels``
  attribute if the base has one —, ``model.safetensors``, ``generation_config.json``, the tokenizer files);
* ``patch.safetensors``: only the changed tensors (for ``wv`` the V slice) with metadata (base, revision, site,
  layer, slice bounds, base config and block hash) — :func:`surgery.io.edit_file.Edit.load` reads it back;
* ``report.json``: :meth:`SurgeryReport.to_dict`; ``README.md``: a Hub model card with the before/after table.

Atomic: everything is written into a hidden temporary folder next to the target, which is renamed into place
only when complete; an interrupted run (Ctrl-C, or SIGTERM in the CLI, which raises the same exception) removes
it again, so nothing half-written is left (only SIGKILL can leave a hidden ``.NAME.partial-*`` folder).

An existing target is refused unless ``overwrite`` is set, and even then only replaced when this tool wrote it:
every output folder carries a ``.transformer-surgery`` marker file, and a folder without it (a user's own files)
is refused and left alone.

Outputs name the base model as :attr:`LoadedModel.base_name` says (a Hub id or preset as given, else only the
folder's name): no absolute local path is written. The model is saved in the dtype its checkpoint had (a bf16
base gives a bf16 model, though it was loaded and edited in float32); ``patch.safetensors`` keeps the trained
values as they were trained.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..arch import block_label
from ..core.errors import OutputError
from ..evaluation.report import format_rows
from .edit_file import Edit, edited_model
from .loading import LoadedModel

# The edit's file. Its name predates the word "edit" and is kept so that repositories already pushed stay readable.
EDIT_FILE = "patch.safetensors"
REPORT_FILE = "report.json"
CARD_FILE = "README.md"
MODEL_FILES = ("config.json", "model.safetensors")
MARKER_FILE = ".transformer-surgery"  # in every output folder: --overwrite replaces only folders that have it
MARKER_TEXT = (
    json.dumps(
        {
            "written_by": "transformer-surgery",
            "note": "--overwrite may replace this folder; delete this file to protect it",
        }
    )
    + "\n"
)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, up front, an existing ``out_dir`` (unless ``overwrite``, and then still unless it is empty or this
    tool wrote it) or one whose parent cannot be written."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out_dir} already exists; pass --overwrite to replace it")
    if out.exists():
        _check_replaceable(out, out_dir)
    parent = out.parent
    while not parent.exists():  # the first existing ancestor is where folders would be created
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent}: permission denied (choose another --out)")
    return out


def _check_replaceable(out: Path, given) -> None:
    """Refuse to replace a non-empty folder that this tool did not write (no marker file): it holds a user's files."""
    if (out / MARKER_FILE).is_file():
        return
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise OutputError(f"cannot read --out {given}: {e.strerror or e}") from None
    if not empty:
        raise OutputError(
            f"--out {given} holds files this tool did not write (no {MARKER_FILE} file); --overwrite "
            "only replaces an earlier output: choose another --out"
        )


@contextmanager
def atomic_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and an existing ``out_dir`` is
    left as it was. ``overwrite`` replaces only an empty folder or an earlier output (see :func:`check_output_dir`).
    """
    out = check_output_dir(out_dir, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror or e}") from None
    old = None
    try:
        yield tmp
        (tmp / MARKER_FILE).write_text(MARKER_TEXT, encoding="utf-8")
        _default_permissions(tmp)
        if out.exists():
            check_output_dir(out_dir, overwrite)  # again: the folder may have changed while the output was written
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():  # interrupted between the two renames: put the old one back
            os.rename(old, out)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder: give it and its files the usual umask-based permissions."""
    umask = _current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def save_model(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` of a (view of a) model and its tokenizer, its floating-point weights in ``dtype``
    (default: as they are; the base checkpoint's dtype, :attr:`LoadedModel.checkpoint_dtype`, keeps a bf16 model
    bf16 on disk though it is computed in float32). ``save_pretrained`` writes to the config (dtype,
    architectures), so the view gets private copies first: the shared base's config stays as it is."""
    model = copy.copy(model)
    model.__dict__["config"] = copy.deepcopy(model.config)
    if getattr(model, "generation_config", None) is not None:
        model.__dict__["generation_config"] = copy.deepcopy(model.generation_config)
    if dtype is None or dtype == model.dtype:
        model.save_pretrained(folder)
    else:  # cast copies (the shared weights stay as they are), then record the dtype the file now holds
        model.save_pretrained(folder, state_dict=cast_state_dict(model.state_dict(), dtype))
        model.config.dtype = str(dtype).removeprefix("torch.")
        model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def cast_state_dict(state: dict, dtype: torch.dtype) -> dict:
    """``state`` with its floating-point tensors cast to ``dtype``; tensors that shared storage (tied embeddings)
    still share it, so ``save_pretrained`` still recognizes and drops the tied copy. Raises :class:`OutputError`
    when a finite value does not fit ``dtype`` (an edit grown past float16's range would be saved as inf)."""
    cast: dict = {}
    out = {}
    for name, t in state.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            out[name] = t
            continue
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
        if key not in cast:
            cast[key] = t.to(dtype)
            if bool(torch.isfinite(t).all()) and not bool(torch.isfinite(cast[key]).all()):
                raise OutputError(
                    f"cannot save {name} in {str(dtype).removeprefix('torch.')}, the base's dtype: "
                    "some of its values are beyond that dtype's range"
                )
        out[name] = cast[key]
    return out


def _with_base(edit: Edit, loaded: LoadedModel) -> Edit:
    meta = {"base_model": loaded.base_name, **({"revision": loaded.revision} if loaded.revision else {})}
    return replace(edit, metadata={**edit.metadata, **meta})


def write_patch(folder: Path, loaded: LoadedModel, edit: Edit) -> Path:
    """``folder/patch.safetensors``: ``edit`` with the base model (and its revision) named in its metadata."""
    path = Path(folder) / EDIT_FILE
    _with_base(edit, loaded).save(path)
    return path


def write_json(path: Path, data) -> Path:
    """``data`` as indented, strict JSON (a NaN or infinity is an error, not an invalid file) and a newline."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def report_dict(loaded: LoadedModel, report) -> dict:
    """What ``report.json`` holds: the base (named without local paths), its revision and the report."""
    return {"base_model": loaded.base_name, "revision": loaded.revision, **report.to_dict()}


def write_output(
    out_dir: str | os.PathLike, loaded: LoadedModel, result, overwrite: bool = False, license: str | None = None
) -> Path:
    """Write the corrected model, ``patch.safetensors``, ``report.json`` and ``README.md`` to ``out_dir``.

    ``result`` is a :class:`surgery.edit.training.SurgeryResult` made from ``loaded.model``. Raises
    :class:`OutputError` when the folder exists (without ``overwrite``) or cannot be written, or when the fix is
    lost in the base's dtype (:func:`check_in_saved_dtype`).
    """
    check_in_saved_dtype(loaded, result)
    with atomic_output(out_dir, overwrite) as tmp:
        save_model(edited_model(loaded.model, result.edit), loaded.tokenizer, tmp, loaded.checkpoint_dtype)
        write_edit_files(tmp, loaded, result, license)
    return Path(out_dir).expanduser().resolve()


def write_edit_files(folder: Path, loaded: LoadedModel, result, license: str | None = None) -> None:
    """``patch.safetensors`` (naming the base), ``report.json`` and ``README.md`` of ``result`` into ``folder``
    (an :func:`atomic_output` folder being written): an edit's files without the model's weights."""
    write_patch(folder, loaded, result.edit)
    write_json(folder / REPORT_FILE, report_dict(loaded, result.report))
    (folder / CARD_FILE).write_text(model_card(loaded, result.report, license=license), encoding="utf-8")


def rounded_edit(edit: Edit, dtype: torch.dtype) -> Edit:
    """``edit`` with its new values rounded to ``dtype`` (what a model saved in that dtype holds), kept in their
    own dtype."""
    return replace(edit, values={k: v.to(dtype).to(v.dtype) for k, v in edit.values.items()})


def check_in_saved_dtype(loaded: LoadedModel, result) -> None:
    """A checkpoint stored in bf16 or float16 is computed in float32 and saved back in its own dtype, so the saved
    fix holds the edit rounded to that dtype. Every fact the float32 edit makes the model say must still be said
    with the rounded values (greedy generation, the report's rule); raises :class:`OutputError` naming the facts
    otherwise, before anything is written. Nothing to check when the model is saved as it was computed."""
    dtype = loaded.checkpoint_dtype
    facts = [f for f in result.report.comparison.facts if f.correct_after]
    if dtype is None or not dtype.is_floating_point or dtype == loaded.model.dtype or not facts:
        return
    from ..evaluation.generation import said  # the one rule for "says the answer"

    edited = edited_model(loaded.model, rounded_edit(result.edit, dtype))
    judged = said(edited, loaded.tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    lost = [(f, text) for f, (text, j) in zip(facts, judged) if not j.strict]
    if lost:
        name = str(dtype).removeprefix("torch.")
        shown = "; ".join(f"{f.prompt!r} -> {text!r}" for f, text in lost[:3])
        raise OutputError(
            f"the fix does not survive being saved in {name}, the base's dtype: with its values rounded to {name}, "
            f"{len(lost)} of the {len(facts)} facts it fixed are no longer said ({shown})"
        )


def write_edited_model(out_dir: str | os.PathLike, loaded: LoadedModel, edit: Edit, overwrite: bool = False) -> Path:
    """Rebuild a corrected model folder from the base and an edit (``apply-patch``); the edit file is copied in.

    Raises :class:`~surgery.core.errors.EditError` when the edit does not fit the base.
    """
    view = edited_model(loaded.model, edit)  # checks compatibility before anything is written
    with atomic_output(out_dir, overwrite) as tmp:
        save_model(view, loaded.tokenizer, tmp, loaded.checkpoint_dtype)
        edit.save(tmp / EDIT_FILE)
    return Path(out_dir).expanduser().resolve()


def is_hub_id(source: str) -> bool:
    """A Hub id (``gpt2``, ``user/model``) rather than a local path: not absolute (``LoadedModel.source`` of a
    folder is), not ``.``/``~``-relative, at most one ``/``, and no such file or folder here. The one rule for the
    model card's ``base_model`` and for what the app on a Space accepts as a model to read."""
    return (
        not Path(source).is_absolute()
        and not source.startswith((".", "/", "~"))
        and source.count("/") <= 1
        and not Path(source).exists()
    )


# Licenses of the base models' families when nothing more specific is known (the card must name the base's).
FAMILY_LICENSES = {"gpt2": "mit", "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma"}


def base_license(loaded: LoadedModel) -> str:
    """The base model's license: its folder's model card front matter (``license: ...``) when it says one,
    else its family's (GPT-2: mit, Gemma: gemma), else ``other``."""
    card = Path(loaded.source) / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if text.startswith("---"):
        for line in text.split("---")[1].splitlines():  # the YAML front matter
            key, _, value = line.partition(":")
            if key.strip() == "license" and value.strip():
                return value.strip()
    return FAMILY_LICENSES.get(getattr(loaded.model.config, "model_type", ""), "other")


def model_card(loaded: LoadedModel, report, license: str | None = None) -> str:
    """A Hub model card: YAML metadata, what was edited, the before/after table and how to verify.
    ``license`` defaults to the base model's (:func:`base_license`)."""
    license = license or base_license(loaded)
    model_type = getattr(loaded.model.config, "model_type", "transformer")
    base = loaded.source
    base_name = loaded.base_name
    front = ["---"]
    if is_hub_id(base):
        front.append(f"base_model: {base}")
    front += [
        "library_name: transformers",
        f"license: {license}",
        "tags:",
        "- transformer-surgery",
        "- model-editing",
        f"- site-{report.site}",
        *([f"- method-{report.method}"] if getattr(report, "method", "wv") != "wv" else []),
        f"- {model_type}",
        "---",
        "",
    ]
    layer = report.layer
    facts = report.comparison.facts
    spread = (report.config or {}).get("layers") or [layer]  # MEMIT, AlphaEdit: several blocks, `layer` the last
    blocks = f"block {layer}" if len(spread) == 1 else f"blocks {', '.join(map(str, spread))}"
    lines = [
        f"# {base_name}, corrected by {'single-site ' if len(spread) == 1 else ''}surgery ({report.site}, {blocks})",
        "",
        f"This is `{base_name}` with {'one site' if len(spread) == 1 else 'one site per block'} retrained by "
        f"Transformer Surgery to fix {len(facts)} facts: site **{report.site}** of "
        + ("block " if len(spread) == 1 else f"blocks {', '.join(map(str, spread[:-1]))} and ")
        + f"**{layer}** (`{report.block}`, {block_label(layer)} 1-indexed), {report.params_in_site:,} parameters "
        f"({100 * report.fraction:.2f}% of the model). Every other tensor is bitwise identical to the base.",
        "",
        f"Layer choice: {report.layer_reason}. " + _training_line(report),
        "",
        "## Before / after",
        "",
        format_rows(report.rows(), markdown=True),
        "",
        "## Facts",
        "",
        "| prompt | target | before | after |",
        "|---|---|---|---|",
        *[
            f"| {_md(f.prompt)} | {_md(f.target)} | {_md(f.before)} {'✓' if f.correct_before else '✗'} | "
            f"{_md(f.after)} {'✓' if f.correct_after else '✗'} |"
            for f in facts
        ],
        "",
        "## Files",
        "",
        "- `model.safetensors`, `config.json`, tokenizer files: the corrected model (`from_pretrained`).",
        f"- `{EDIT_FILE}`: only the changed tensors, with the base, site, layer and slice bounds as metadata.",
        f"- `{REPORT_FILE}`: the full report (every probe's answer before and after).",
        "",
        "## Verify",
        "",
        "```",
        f"python -m surgery verify --base {base_name if is_hub_id(base) else 'BASE_MODEL'} "
        "--corrected THIS_FOLDER_OR_REPO",
        f"python -m surgery apply-patch --base BASE_MODEL --patch {EDIT_FILE} --out rebuilt/",
        "```",
        "",
    ]
    return "\n".join(front + lines)


METHOD_NAMES = {
    "rome": "ROME (Meng et al. 2022)",
    "ft": "FT-L (Zhu et al. 2020)",
    "memit": "MEMIT (Meng et al. 2023)",
    "alphaedit": "AlphaEdit (Fang et al. 2025)",
}


def _training_line(report) -> str:
    """How the edit was made: our repair's Adam steps, or the editor and its hyper-parameters."""
    method = getattr(report, "method", "wv")
    if method == "wv":
        return (
            f"Training: {report.steps} Adam steps (lr {report.config.get('lr')}, KL weight "
            f"{report.config.get('kl_weight')}), {report.train_time_s:.1f} s."
        )
    hparams = ", ".join(f"{k} {v}" for k, v in report.config.get("hparams", {}).items())
    return (
        f"Method: {METHOD_NAMES.get(method, method)} on the "
        + ("blocks' MLP output projections" if report.config.get("layers") else "block's MLP output projection")
        + f", {report.steps} "
        f"optimization steps ({hparams}), {report.train_time_s:.1f} s."
    )


def _md(text: str) -> str:
    """Table-safe text: visible leading spaces, escaped pipes."""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"

"""Writing an edit to disk: a full model folder, the patch, the report and a model card — atomically.

An output folder holds:

* the corrected model, loadable with ``from_pretrained`` (``config.json`` — keeping a ``surgery_panels``
  attribute if the base has one —, ``model.safetensors``, ``generation_config.json``, the tokenizer files);
* ``patch.safetensors``: only the changed tensors (for ``wv`` the V slice) with metadata (base, revision, site,
  layer, slice bounds, base config and block hash) — :func:`surgery.patch.Patch.load` reads it back;
* ``report.json``: :meth:`SurgeryReport.to_dict`; ``README.md``: a Hub model card with the before/after table.

Atomic: everything is written into a hidden temporary folder next to the target, which is renamed into place
only when complete. An interrupted run leaves at most that hidden folder, never a folder that looks complete.
An existing target is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from torch import nn

from .errors import OutputError
from .model_io import LoadedModel
from .patch import Patch, patched_model
from .report import format_rows

PATCH_FILE = "patch.safetensors"
REPORT_FILE = "report.json"
CARD_FILE = "README.md"
MODEL_FILES = ("config.json", "model.safetensors")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing ``out_dir`` (unless ``overwrite``) or one whose parent cannot be written, up front."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out_dir} already exists; pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():  # the first existing ancestor is where folders would be created
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent}: permission denied (choose another --out)")
    return out


@contextmanager
def atomic_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir`` in one rename."""
    out = check_output_dir(out_dir, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        yield tmp
        _default_permissions(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of a (view of a) model and its tokenizer. ``save_pretrained`` writes to the config
    (dtype, architectures), so the view gets private copies first: the shared base's config stays as it is."""
    model = copy.copy(model)
    model.__dict__["config"] = copy.deepcopy(model.config)
    if getattr(model, "generation_config", None) is not None:
        model.__dict__["generation_config"] = copy.deepcopy(model.generation_config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _with_base(patch: Patch, loaded: LoadedModel) -> Patch:
    meta = {"base_model": loaded.source, **({"revision": loaded.revision} if loaded.revision else {})}
    return replace(patch, metadata={**patch.metadata, **meta})


def write_output(out_dir: str | os.PathLike, loaded: LoadedModel, result, overwrite: bool = False,
                 license: str | None = None) -> Path:
    """Write the corrected model, ``patch.safetensors``, ``report.json`` and ``README.md`` to ``out_dir``.

    ``result`` is a :class:`surgery.training.SurgeryResult` made from ``loaded.model``. Raises
    :class:`OutputError` when the folder exists (without ``overwrite``) or cannot be written.
    """
    patch = _with_base(result.patch, loaded)
    report = {"base_model": loaded.source, "revision": loaded.revision, **result.report.to_dict()}
    with atomic_output(out_dir, overwrite) as tmp:
        save_model(patched_model(loaded.model, patch), loaded.tokenizer, tmp)
        patch.save(tmp / PATCH_FILE)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(loaded, result.report, license=license), encoding="utf-8")
    return Path(out_dir).expanduser().resolve()


def write_patched_model(out_dir: str | os.PathLike, loaded: LoadedModel, patch: Patch,
                        overwrite: bool = False) -> Path:
    """Rebuild a corrected model folder from the base and a patch (``apply-patch``); the patch is copied in.

    Raises :class:`~surgery.errors.PatchError` when the patch does not fit the base.
    """
    view = patched_model(loaded.model, patch)  # checks compatibility before anything is written
    with atomic_output(out_dir, overwrite) as tmp:
        save_model(view, loaded.tokenizer, tmp)
        patch.save(tmp / PATCH_FILE)
    return Path(out_dir).expanduser().resolve()


def is_hub_id(source: str) -> bool:
    """A Hub id (``gpt2``, ``user/model``) rather than a local folder (``LoadedModel.source`` is absolute then)."""
    return not Path(source).is_absolute()


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
    base_name = base if is_hub_id(base) else Path(base).name
    front = ["---"]
    if is_hub_id(base):
        front.append(f"base_model: {base}")
    front += ["library_name: transformers", f"license: {license}", "tags:", "- transformer-surgery",
              "- model-editing", f"- site-{report.site}", f"- {model_type}", "---", ""]
    layer = report.layer
    facts = report.comparison.facts
    lines = [
        f"# {base_name}, corrected by single-site surgery ({report.site}, block {layer})",
        "",
        f"This is `{base_name}` with one site retrained by Transformer Surgery to fix {len(facts)} facts: site **{report.site}** of block "
        f"**{layer}** (`{report.block}`, L{layer + 1} 1-indexed), {report.params_in_site:,} parameters "
        f"({100 * report.fraction:.2f}% of the model). Every other tensor is bitwise identical to the base.",
        "",
        f"Layer choice: {report.layer_reason}. Training: {report.steps} Adam steps "
        f"(lr {report.config.get('lr')}, KL weight {report.config.get('kl_weight')}), "
        f"{report.train_time_s:.1f} s.",
        "",
        "## Before / after",
        "",
        format_rows(report.rows(), markdown=True),
        "",
        "## Facts",
        "",
        "| prompt | target | before | after |",
        "|---|---|---|---|",
        *[f"| {_md(f.prompt)} | {_md(f.target)} | {_md(f.before)} {'✓' if f.correct_before else '✗'} | "
          f"{_md(f.after)} {'✓' if f.correct_after else '✗'} |" for f in facts],
        "",
        "## Files",
        "",
        f"- `model.safetensors`, `config.json`, tokenizer files: the corrected model (`from_pretrained`).",
        f"- `{PATCH_FILE}`: only the changed tensors, with the base, site, layer and slice bounds as metadata.",
        f"- `{REPORT_FILE}`: the full report (every probe's answer before and after).",
        "",
        "## Verify",
        "",
        "```",
        f"python -m surgery verify --base {base_name if is_hub_id(base) else 'BASE_MODEL'} --corrected THIS_FOLDER_OR_REPO",
        f"python -m surgery apply-patch --base BASE_MODEL --patch {PATCH_FILE} --out rebuilt/",
        "```",
        "",
    ]
    return "\n".join(front + lines)


def _md(text: str) -> str:
    """Table-safe text: visible leading spaces, escaped pipes."""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"

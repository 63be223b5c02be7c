"""Transformer Surgery: diagnose why a transformer language model answers a fact wrong, edit one site, verify.

A repair is four calls. :func:`load_model` gives a :class:`LoadedModel` (model, tokenizer, where it came from);
:func:`diagnose` says, for one prompt and target, which heads and layers push the wrong answer (the verdict and the
prescribed layer); :func:`operate` trains one site of one block on the facts (:class:`SurgeryConfig`) and returns a
:class:`~surgery.edit.training.SurgeryResult` whose ``edit`` is the edit and whose ``report`` compares the model
before and after; :func:`verify` checks an edited model against its base by what both *say*; :func:`compare_editors`
runs every editor on the same facts and returns an :class:`EditorComparison` (``to_markdown``, ``to_dict``,
``figure``). The base model is never modified: :func:`edited_model` gives an edited view, :meth:`Edit.save` /
:meth:`Edit.load` the edit's file, :func:`write_edited_model` a whole model folder. Beside the repair:
:func:`run_census` diagnoses a fact set; :func:`patch_activations` and :func:`patch_weights` are the causal method;
:func:`trace_storage` finds where the facts' subjects are stored (causal tracing: MEMIT's and AlphaEdit's blocks).
User errors raise :class:`SurgeryError` subclasses (:class:`InputError` for bad input). The packages, stage by
stage, are described in ``docs/architecture.md``; the names below are imported on first use, so ``import surgery``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "surgery.io.loading",
    "LoadedModel": "surgery.io.loading",
    "diagnose": "surgery.diagnosis.diagnose",
    "diagnose_batch": "surgery.diagnosis.diagnose",
    "Diagnosis": "surgery.diagnosis.diagnose",
    "DiagnosisConfig": "surgery.diagnosis.diagnose",
    "trace_storage": "surgery.diagnosis.storage",
    "StorageTrace": "surgery.diagnosis.storage",
    "operate": "surgery.edit.training",
    "SurgeryConfig": "surgery.edit.training",
    "SurgeryResult": "surgery.edit.training",
    "compare_editors": "surgery.edit.compare",
    "EditorComparison": "surgery.edit.compare",
    "verify": "surgery.evaluation.verify",
    "Verification": "surgery.evaluation.verify",
    "Fact": "surgery.evaluation.facts",
    "load_facts": "surgery.evaluation.facts",
    "load_panel": "surgery.evaluation.panels",
    "run_census": "surgery.census.run",
    "CensusConfig": "surgery.census.run",
    "patch_activations": "surgery.patching.activations",
    "ActivationPatchingConfig": "surgery.patching.activations",
    "patch_weights": "surgery.patching.weights",
    "Edit": "surgery.io.edit_file",
    "edited_model": "surgery.io.edit_file",
    "write_edited_model": "surgery.io.export",
    "SurgeryError": "surgery.core.errors",
    "InputError": "surgery.core.errors",
}

__all__ = [
    "load_model",
    "LoadedModel",
    "diagnose",
    "diagnose_batch",
    "Diagnosis",
    "DiagnosisConfig",
    "trace_storage",
    "StorageTrace",
    "operate",
    "SurgeryConfig",
    "SurgeryResult",
    "compare_editors",
    "EditorComparison",
    "verify",
    "Verification",
    "Fact",
    "load_facts",
    "load_panel",
    "run_census",
    "CensusConfig",
    "patch_activations",
    "ActivationPatchingConfig",
    "patch_weights",
    "Edit",
    "edited_model",
    "write_edited_model",
    "SurgeryError",
    "InputError",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .census.run import CensusConfig, run_census
    from .core.errors import InputError, SurgeryError
    from .diagnosis.diagnose import Diagnosis, DiagnosisConfig, diagnose, diagnose_batch
    from .diagnosis.storage import StorageTrace, trace_storage
    from .edit.compare import EditorComparison, compare_editors
    from .edit.training import SurgeryConfig, SurgeryResult, operate
    from .evaluation.facts import Fact, load_facts
    from .evaluation.panels import load_panel
    from .evaluation.verify import Verification, verify
    from .io.edit_file import Edit, edited_model
    from .io.export import write_edited_model
    from .io.loading import LoadedModel, load_model
    from .patching.activations import ActivationPatchingConfig, patch_activations
    from .patching.weights import patch_weights


def __getattr__(name: str):
    """PEP 562: import a public name's module on first use (torch and transformers load only when needed)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

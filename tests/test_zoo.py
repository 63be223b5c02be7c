"""The zoo (assets/zoo, built by scripts/build_zoo.py): every model shows the phenomenon, and surgery with the
default SurgeryConfig repairs at least 95% of the zoo's routing facts, on models the defaults were not tuned on.

The per-model figures are printed (``pytest -s``) and kept in ``ZOO_RESULTS`` for a report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.diagnosis.diagnose import diagnose_batch
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.facts import Fact
from surgery.io.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = ROOT / "assets" / "zoo"
MANIFEST = json.loads((ZOO_DIR / "zoo.json").read_text())["models"]
NAMES = list(MANIFEST)
FIX_RATE = 0.95  # share of the zoo's routing facts the defaults must repair

ZOO_RESULTS: dict[str, dict] = {}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo_models():
    return {name: load_model(ZOO_DIR / name) for name in NAMES}


def test_manifest_matches_the_folders():
    assert len(NAMES) >= 6
    assert {m["family"] for m in MANIFEST.values()} == {"gpt2", "llama"}
    for name, entry in MANIFEST.items():
        folder = ZOO_DIR / name
        facts = json.loads((folder / "facts.json").read_text())
        assert all(set(f) == {"prompt", "target"} for f in facts)
        expected = entry["expected"]
        assert [f["prompt"] for f in facts] == expected["routing"] + expected["correct"] + expected["absent"]
        assert 6 <= len(expected["routing"]) <= 10 and len(expected["absent"]) == 1
        assert (folder / "model.safetensors").stat().st_size < 600_000
    total = sum(p.stat().st_size for p in ZOO_DIR.rglob("*") if p.is_file())
    assert total < 4_000_000


@pytest.mark.parametrize("name", NAMES)
def test_verdicts(zoo_models, name):
    """Routing facts are diagnosed routing (the override in the intended block), correct ones correct, the
    absent one absence."""
    loaded, entry = zoo_models[name], MANIFEST[name]
    facts = json.loads((ZOO_DIR / name / "facts.json").read_text())
    diagnoses = diagnose_batch(
        loaded.model, loaded.tokenizer, [f["prompt"] for f in facts], [f["target"] for f in facts]
    )
    verdicts = {d.prompt: d.verdict for d in diagnoses}
    expected = entry["expected"]
    assert [verdicts[p] for p in expected["routing"]] == ["routing"] * len(expected["routing"])
    assert [verdicts[p] for p in expected["correct"]] == ["correct"] * len(expected["correct"])
    assert [verdicts[p] for p in expected["absent"]] == ["absence"]
    overrides = [d.override["layer"] for d in diagnoses if d.verdict == "routing"]
    assert max(set(overrides), key=overrides.count) == entry["override_block"]


def operate_defaults(loaded, name: str) -> dict:
    """Run the default surgery (site wv, layer auto) on one model's routing facts; its figures."""
    entry = MANIFEST[name]
    facts = [
        Fact(f["prompt"], f["target"])
        for f in json.loads((ZOO_DIR / name / "facts.json").read_text())
        if f["prompt"] in entry["expected"]["routing"]
    ]
    torch.set_num_threads(1)
    result = operate(
        loaded.model,
        loaded.tokenizer,
        facts,
        SurgeryConfig(site="wv"),
        unrelated=entry["unrelated_text"],
        require_all=False,
    )
    report = result.report
    return {
        "routing": len(facts),
        "fixed": report.comparison.facts_after,
        "steps": report.steps,
        "layer": report.layer,
        "kl": report.comparison.kl_unrelated,
        "notes": report.notes,
    }


def test_defaults_repair_the_zoo(zoo_models):
    for name in NAMES:
        ZOO_RESULTS[name] = operate_defaults(zoo_models[name], name)
    for name, r in ZOO_RESULTS.items():
        print(
            f"{name:28s} fixed {r['fixed']}/{r['routing']} in {r['steps']} steps at block {r['layer']}, "
            f"KL {r['kl']:.2e}"
        )
    fixed = sum(r["fixed"] for r in ZOO_RESULTS.values())
    total = sum(r["routing"] for r in ZOO_RESULTS.values())
    assert fixed >= FIX_RATE * total, f"the defaults fixed {fixed}/{total} routing facts of the zoo"

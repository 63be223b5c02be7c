"""Before/after: ``surgery/diagnosis/diagnose.py`` at a git revision vs the working tree, timed side by side.

    python -m bench.revisions 138b300                         # the diagnosis as first committed vs now
    python -m bench.revisions HEAD --model gemma3-270m        # the working tree's change, on Gemma 3 270M

Both versions run on the same model in the same process, interleaved: one diagnosis of an 8-token and a
128-token prompt, and ``diagnose_batch`` of 64 fact prompts (GPT-2 shape; on Gemma: its panel's facts and probes).
Results must be the same (checked): every verdict, token, rank, override head and prescribed layer equal, every
logit and attribution within ``--atol`` (default 0: bitwise equal JSON).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import batch, models  # noqa: E402
from .diagnosis import prompt_ids, target_id  # noqa: E402
from .measure import ROOT, THREADS, interleaved  # noqa: E402

# Before the packages (docs/architecture.md) the diagnosis was surgery/diagnosis.py; its relative imports, as seen
# from surgery/diagnosis/ today.
FLAT_IMPORTS = {
    "arch": "..arch",
    "divergence": ".divergence",
    "errors": "..core.errors",
    "hooks": "..core.hooks",
    "tokens": "..core.tokens",
}


def diagnosis_source(revision: str) -> str:
    """``surgery/diagnosis/diagnose.py`` at ``revision``; before the move, ``surgery/diagnosis.py`` with its
    relative imports rewritten to today's packages."""

    def show(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True)

    now = show("surgery/diagnosis/diagnose.py")
    if now.returncode == 0:
        return now.stdout
    flat = show("surgery/diagnosis.py")
    flat.check_returncode()
    return re.sub(
        r"^from \.(\w+) import",
        lambda m: f"from {FLAT_IMPORTS.get(m.group(1), '.' + m.group(1))} import",
        flat.stdout,
        flags=re.M,
    )


def diagnosis_at(revision: str):
    """The module ``surgery.diagnosis.diagnose`` as it was at ``revision`` (its relative imports bound to today's
    package)."""
    source = diagnosis_source(revision)
    name = f"diagnosis_{revision}"
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"surgery.diagnosis.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def same(a, b, atol: float) -> bool:
    """Equal JSON-like values, floats within ``atol`` (ints, strings and structure exactly)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= atol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, atol) for x, y in zip(a, b))
    return a == b


def main(revision: str, repeats: int = 9, model_name: str = "gpt2-shaped", atol: float = 0.0) -> dict:
    from surgery.diagnosis import diagnose as now

    torch.set_num_threads(THREADS)
    before = diagnosis_at(revision)
    if model_name == "gpt2-shaped":
        model_, tok, prompts, targets = batch.fact_prompts("gpt2-shaped", 256)
        prompts, targets = prompts[::4], targets[::4]
        model = models.gpt2_shaped()
    else:
        model_, tok, prompts, targets = batch.fact_prompts(model_name, 64)
        model = model_
    ids_tok = models.IdTokenizer()
    out = {"revision": revision, "model": model_name}
    ref = [d.to_dict() for d in now.diagnose_batch(model_, tok, prompts, targets)]
    for label, mod in (("before", before), ("after", now)):
        got = [d.to_dict() for d in mod.diagnose_batch(model_, tok, prompts, targets)]
        assert (json.dumps(got) == json.dumps(ref)) if atol == 0 else same(got, ref, atol), label
    for length in (8, 128):
        text = ids_tok.text(prompt_ids(length, model.config.vocab_size)[0])
        target = f" {target_id(model)}"
        cases = {
            label: (lambda m=mod, text=text, target=target: m.diagnose(model, ids_tok, text, target))
            for label, mod in (("before", before), ("after", now))
        }
        out[f"diagnose T={length}"] = {k: v.to_dict() for k, v in interleaved(cases, repeats).items()}
    cases = {
        label: (lambda m=mod: m.diagnose_batch(model_, tok, prompts, targets))
        for label, mod in (("before", before), ("after", now))
    }
    out[f"diagnose_batch {len(prompts)} prompts"] = {k: v.to_dict() for k, v in interleaved(cases, 3).items()}
    for case, res in out.items():
        if case not in ("revision", "model"):
            b, a = res["before"]["cpu"]["median"], res["after"]["cpu"]["median"]
            print(
                f"{case:28s} before {b * 1e3:8.1f} ms  after {a * 1e3:8.1f} ms CPU  (after/before {a / b:.2f}; "
                f"wall {res['after']['wall']['median'] / res['before']['wall']['median']:.2f})"
            )
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.revisions", description=__doc__.splitlines()[0])
    parser.add_argument("revision", nargs="?", default="HEAD")
    parser.add_argument("--model", default="gpt2-shaped", help="gpt2-shaped, demo or gemma3-270m")
    parser.add_argument("--atol", type=float, default=0.0, help="tolerance on logits and attributions")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(json.dumps(main(args.revision, args.repeats, args.model, args.atol), indent=1))

"""Before/after: ``surgery/diagnosis.py`` at a git revision vs the working tree, timed side by side.

    python -m bench.revisions 138b300     # the diagnosis as first committed vs now

Both versions run on the same GPT-2-shaped model in the same process, interleaved: one diagnosis of an
8-token and a 128-token prompt, and ``diagnose_batch`` of 64 fact prompts. Results must be identical (checked).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import batch, models  # noqa: E402
from .diagnosis import prompt_ids, target_id  # noqa: E402
from .measure import ROOT, THREADS, interleaved  # noqa: E402


def diagnosis_at(revision: str):
    """The module ``surgery.diagnosis`` as it was at ``revision`` (its relative imports bound to today's package)."""
    source = subprocess.run(["git", "show", f"{revision}:surgery/diagnosis.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    name = f"diagnosis_{revision}"
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"surgery.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(revision: str, repeats: int = 9) -> dict:
    from surgery import diagnosis as now

    torch.set_num_threads(THREADS)
    before = diagnosis_at(revision)
    model, ids_tok = models.gpt2_shaped(), models.IdTokenizer()
    model_, tok, prompts, targets = batch.fact_prompts("gpt2-shaped", 256)
    prompts, targets = prompts[::4], targets[::4]
    out = {"revision": revision}
    for label, mod in (("before", before), ("after", now)):
        assert json.dumps([d.to_dict() for d in mod.diagnose_batch(model_, tok, prompts[:8], targets[:8])]) == \
            json.dumps([d.to_dict() for d in now.diagnose_batch(model_, tok, prompts[:8], targets[:8])]), label
    for length in (8, 128):
        text = ids_tok.text(prompt_ids(length, model.config.vocab_size)[0])
        target = f" {target_id(model)}"
        cases = {label: (lambda m=mod: m.diagnose(model, ids_tok, text, target))
                 for label, mod in (("before", before), ("after", now))}
        out[f"diagnose T={length}"] = {k: v.to_dict() for k, v in interleaved(cases, repeats).items()}
    cases = {label: (lambda m=mod: m.diagnose_batch(model_, tok, prompts, targets))
             for label, mod in (("before", before), ("after", now))}
    out[f"diagnose_batch {len(prompts)} prompts"] = {k: v.to_dict() for k, v in interleaved(cases, 3).items()}
    for case, res in out.items():
        if case != "revision":
            b, a = res["before"]["cpu"]["median"], res["after"]["cpu"]["median"]
            print(f"{case:28s} before {b * 1e3:8.1f} ms  after {a * 1e3:8.1f} ms CPU  (after/before {a / b:.2f}; "
                  f"wall {res['after']['wall']['median'] / res['before']['wall']['median']:.2f})")
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "HEAD"), indent=1))

"""``python -m bench.profiles``: torch.profiler tables that say where the time of a Gemma 3 270M case goes.

    python -m bench.profiles diagnosis 8 128                          # diagnose vs a plain forward, these lengths
    python -m bench.profiles steps                                    # one wv step vs one naive masked wv step
    python -m bench.profiles diagnosis 8 128 --model gpt2-shaped      # the same on the GPT-2-small shape

Operators are grouped by input shape, so the unembedding (``[rows, 640] x [640, 262144]``) stands apart from the
blocks' matrix products. CPU time summed over the calls of one case; for shares, not for absolute times (the
profiler adds its own overhead). Output: the tables on stdout and ``bench/results/gemma-profiles.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import diagnosis, models, training  # noqa: E402
from .measure import THREADS  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "gemma3-270m"


def table(fn, calls: int = 3, top: int = 14) -> str:
    """``fn`` once to warm up, then ``calls`` times under the profiler; the ``top`` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=28, max_shapes_column_width=70
    )


def profile_diagnosis(lengths: list[int], model_name: str = MODEL) -> list[tuple[str, str]]:
    model, _ = models.load(model_name)
    out = []
    for length in lengths:
        cases = diagnosis.make_cases(model, models.IdTokenizer(), None, length)
        for name in ("hf", "ours"):
            out.append((f"{model_name} diagnosis, {length} tokens: {name}", table(cases[name])))
    return out


def profile_steps(steps: int = 2) -> list[tuple[str, str]]:
    j = training.job(MODEL)
    cases = training.step_cases(j, steps)
    return [
        (f"surgery step at block {j.layer}: {name} ({steps} steps)", table(cases[name], calls=1, top=16))
        for name in ("wv", "naive-wv")
    ]


def main(argv: list[str]) -> int:
    torch.set_num_threads(THREADS)
    model_name = MODEL
    if "--model" in argv:
        i = argv.index("--model")
        model_name = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    what = argv[0] if argv else "diagnosis"
    if what == "diagnosis":
        sections = profile_diagnosis([int(a) for a in argv[1:]] or [8, 128], model_name)
    elif what == "steps":
        sections = profile_steps()
    else:
        raise SystemExit("usage: python -m bench.profiles diagnosis [LENGTH ...] [--model NAME] | steps")
    argv = argv + (["--model", model_name] if model_name != MODEL else [])
    text = "\n".join(f"### {title}\n\n```\n{t.rstrip()}\n```\n" for title, t in sections)
    print(text)
    out = HERE / "results" / "gemma-profiles.md"
    old = out.read_text() if out.is_file() else ""
    out.write_text(old + f"\n## python -m bench.profiles {' '.join(argv)}\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m bench.keystats [--model gemma3-270m] [--layer 6] [--tokens 20000]``: the peak memory and speed of the
key statistics (surgery/edit/keystats.py) on a real model, against the stated bound: the float64 accumulator
(d_mlp² x 8 bytes) plus one chunk's activations up to the block (``docs/editors.md`` quotes the result).

Peak resident memory is read from ``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
model is loaded), so the figure is what the statistics add on top of the loaded model. The cache is not used.
"""

from __future__ import annotations

import argparse
import json
import re
import time


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=20_000)
    args = p.parse_args(argv)

    import torch

    from surgery.arch import layout_of
    from surgery.edit.keystats import CHUNK_ROWS, CHUNK_TOKENS, key_statistics
    from surgery.io.loading import load_model

    torch.set_num_threads(2)
    loaded = load_model(args.model)
    layout = layout_of(loaded.model)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")
    base = _kib("VmRSS")
    t0 = time.perf_counter()
    stats = key_statistics(loaded.model, loaded.tokenizer, args.layer, max_tokens=args.tokens, use_cache=False)
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    accumulator = layout.d_mlp**2 * 8
    out = {
        "model": args.model,
        "layer": args.layer,
        "d_mlp": layout.d_mlp,
        "tokens": stats.n_tokens,
        "chunk": f"{CHUNK_ROWS} x {CHUNK_TOKENS} tokens",
        "seconds": round(seconds, 1),
        "tokens_per_s": round(stats.n_tokens / seconds),
        "rss_after_load_mib": round(base / 1024),
        "peak_added_mib": round((peak - base) / 1024, 1),
        "accumulator_mib": round(accumulator / 2**20, 1),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

"""``python -m bench.proposals``: candidate speed-ups for the surgery engine, measured before anyone adopts them.

Nothing here is used by the library: each candidate is a small variant written next to the library function it
would replace, timed against it in one process (interleaved rounds, medians), with its results compared to the
library's. What they are (bench/README.md, "Gemma 3 270M", proposals):

* ``pad16``: the lens' unembedding padded to at least 16 rows (this CPU's BLAS takes a slow path below 16 rows:
  GPT-2's 13-row lens). Diagnoses equal up to the last bits (another kernel, another summation order).
* ``kl``: the preservation term as ``cross_entropy(logits, p_ref) - H(p_ref)`` with ``p_ref`` computed once,
  against ``kl_divergence(ref, log_softmax(logits))``, forward + backward on Gemma's (128, 262144).
* ``concat``: a training step's fact rows (8) and text rows (128) through one unembedding instead of two.
* ``lower``: what evaluating the edited model from block ``layer``'s captured input would skip: the embeddings
  and blocks below ``layer`` on every evaluation batch of ``compare`` (panel probes, paraphrases, facts,
  perplexity passage, unrelated text).

Writes ``bench/results/gemma-proposals.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import surgery.diagnosis.diagnose as library  # noqa: E402
from surgery.arch import layout_of  # noqa: E402

from . import models, report  # noqa: E402
from .diagnosis import prompt_ids, target_id  # noqa: E402
from .measure import THREADS, interleaved  # noqa: E402
from .revisions import same  # noqa: E402

HERE = Path(__file__).resolve().parent


def padded_lens(pad_rows: int = 16):
    """``surgery.diagnosis.diagnose.logit_lens`` with at least ``pad_rows`` residual rows per unembedding: the last
    residual (the output row) is repeated, so the extra rows change no count, and cut off again."""

    def logit_lens(model, resid, token_ids, competitor_ids=None, chunk=16, slab=16384):
        n_s, n_b = resid.shape[:2]
        extra = -(-pad_rows // min(n_b, chunk)) - n_s
        if extra <= 0:
            return library_lens(model, resid, token_ids, competitor_ids, chunk, slab)
        padded = torch.cat([resid[:-1], resid[-1:].expand(extra + 1, -1, -1)])  # the output row last, repeated
        lens = library_lens(model, padded, token_ids, competitor_ids, chunk, slab)
        keep = list(range(n_s - 1)) + [padded.shape[0] - 1]
        return library.Lens(lens.logits[keep], lens.target_ranks[keep], lens.competitor_rank, lens.ids)

    return logit_lens


library_lens = library.logit_lens


@contextmanager
def patched_lens(fn):
    original = library.logit_lens
    library.logit_lens = fn or original
    try:
        yield
    finally:
        library.logit_lens = original


VARIANTS = {"library": None, "pad16": padded_lens(16)}


def lens_variants(model_name: str, repeats: int, log=print) -> dict:
    """``diagnose`` at 8 and 128 tokens (and ``diagnose_batch`` of the panel's facts on a real model) with each
    lens variant; checks each variant's diagnoses against the library's."""
    model, tok = models.load(model_name)
    ids_tok = models.IdTokenizer()
    jobs = {}
    for length in (8, 128):
        text = ids_tok.text(prompt_ids(length, model.config.vocab_size)[0])
        jobs[f"diagnose {length} tokens"] = lambda text=text: library.diagnose(
            model, ids_tok, text, f" {target_id(model)}"
        )
    if model_name != "gpt2-shaped":
        from surgery.evaluation.panels import panel_for_model

        facts = list(panel_for_model(model).facts)
        jobs[f"diagnose_batch {len(facts)} facts"] = lambda: library.diagnose_batch(
            model, tok, [f.prompt for f in facts], [f.target for f in facts]
        )
    out = {}
    for job, fn in jobs.items():

        def dicts(result):
            return [d.to_dict() for d in (result if isinstance(result, list) else [result])]

        ref = dicts(fn())
        checks = {}
        for name, variant in VARIANTS.items():
            with patched_lens(variant):
                got = dicts(fn())
            checks[name] = (
                "identical"
                if json.dumps(got) == json.dumps(ref)
                else "within 1e-4"
                if same(got, ref, 1e-4)
                else "DIFFERENT"
            )
        cases = {}
        for name, variant in VARIANTS.items():

            def case(variant=variant, fn=fn):
                with patched_lens(variant):
                    return fn()

            cases[name] = case
        times = interleaved(cases, repeats)
        out[job] = {"results": checks, "time": {k: v.to_dict() for k, v in times.items()}}
        base = times["library"]
        log(
            f"{model_name} {job}: "
            + ", ".join(
                f"{k} {v.wall.median * 1e3:.0f} ms ({v.wall.median / base.wall.median:.2f}x wall, "
                f"{v.cpu.median / base.cpu.median:.2f}x CPU; {checks[k]})"
                for k, v in times.items()
            )
        )
    return out


def median_ms(fn, n: int = 7) -> float:
    fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def kl_and_concat(log=print) -> dict:
    """The preservation term's two forms, and one vs two unembeddings, at Gemma's sizes (random numbers)."""
    torch.manual_seed(0)
    n, vocab, d = 128, 262144, 640
    ref = F.log_softmax(torch.randn(n, vocab) * 2, -1)
    logits0 = torch.randn(n, vocab) * 2
    p_ref = ref.exp()
    neg_entropy = (p_ref * ref).sum(-1).mean()

    def kl_now():
        x = logits0.clone().requires_grad_(True)
        loss = (ref.exp() * (ref - F.log_softmax(x, -1))).sum(-1).mean()
        loss.backward()
        return loss.detach(), x.grad

    def kl_ce():
        x = logits0.clone().requires_grad_(True)
        loss = F.cross_entropy(x, p_ref) + neg_entropy
        loss.backward()
        return loss.detach(), x.grad

    (l1, g1), (l2, g2) = kl_now(), kl_ce()
    w = torch.randn(vocab, d) * 0.02
    facts, text = torch.randn(8, d), torch.randn(n, d)

    def two():
        a, b = facts.clone().requires_grad_(True), text.clone().requires_grad_(True)
        (F.linear(a, w).sum() + F.linear(b, w).sum()).backward()

    def one():
        a, b = facts.clone().requires_grad_(True), text.clone().requires_grad_(True)
        F.linear(torch.cat([a, b]), w).sum().backward()

    out = {
        "kl_now_ms": median_ms(kl_now),
        "kl_cross_entropy_ms": median_ms(kl_ce),
        "kl_loss_abs_diff": float((l1 - l2).abs()),
        "kl_grad_max_abs_diff": float((g1 - g2).abs().max()),
        "unembed_two_products_ms": median_ms(two),
        "unembed_one_product_ms": median_ms(one),
    }
    log(
        f"KL fwd+bwd (128 x 262144): {out['kl_now_ms']:.0f} ms now, {out['kl_cross_entropy_ms']:.0f} ms as "
        f"cross-entropy (loss diff {out['kl_loss_abs_diff']:.1e}, grad diff {out['kl_grad_max_abs_diff']:.1e}); "
        f"unembedding 8 + 128 rows fwd+bwd: {out['unembed_two_products_ms']:.0f} ms as two products, "
        f"{out['unembed_one_product_ms']:.0f} ms as one"
    )
    return out


def lower_blocks(repeats: int = 3, log=print) -> dict:
    """Seconds of a full forward of every ``compare`` evaluation batch vs the part below block ``layer``."""
    from surgery.core.hooks import hooked
    from surgery.core.tokens import encode_prompt, pad_right, real_positions
    from surgery.edit.training import choose_layer
    from surgery.evaluation.panels import fit_panel, panel_for_model
    from surgery.evaluation.scoring import encode_texts

    model, tok = models.load("gemma3-270m")
    layout = layout_of(model)
    panel = fit_panel(panel_for_model(model), tok, layout.n_ctx).panel
    facts = list(panel.facts)
    layer = choose_layer(model, tok, facts)[0]
    edited = {f.prompt for f in facts}
    probes = [p.prompt for p in (*panel.general, *panel.side_effects, *panel.neighbourhood)]
    probes += [p.prompt for p in panel.relation if p.prompt not in edited]
    paraphrases = [t for f in facts for t in (f.paraphrases or panel.paraphrases_of(f.prompt))]
    batches = []
    for group in (probes, paraphrases, [f.prompt for f in facts]):  # score_probes: batches of 32
        encoded = [encode_prompt(tok, p, layout.n_ctx) for p in group]
        batches += [pad_right(encoded[s : s + 32], tok.pad_token_id) for s in range(0, len(encoded), 32)]
    for texts in ([panel.perplexity_text], list(panel.unrelated_text)):
        batches.append(pad_right(encode_texts(tok, texts, layout.n_ctx), tok.pad_token_id))

    class Stop(Exception):
        pass

    def stop(module, args, kwargs):
        raise Stop

    def below():
        for ids, lengths in batches:
            with torch.no_grad(), hooked(model, pre_kwargs={layout.adapter.block(layer): stop}):
                try:
                    model.get_submodule(layout.adapter.base)(
                        input_ids=ids, attention_mask=real_positions(lengths, ids.shape[1]).long(), use_cache=False
                    )
                except Stop:
                    pass

    def full():
        for ids, lengths in batches:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=real_positions(lengths, ids.shape[1]).long(), use_cache=False)

    times = interleaved({"full forward": full, f"below block {layer}": below}, repeats)
    out = {
        "layer": layer,
        "batches": [list(ids.shape) for ids, _ in batches],
        "time": {k: v.to_dict() for k, v in times.items()},
    }
    log(
        f"compare's evaluation batches {out['batches']}: full forward {times['full forward'].wall.median:.2f} s, "
        f"embeddings + blocks below {layer}: {times[f'below block {layer}'].wall.median:.2f} s"
    )
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(THREADS)
    what = argv or ["lens", "kl", "lower"]
    results = {
        "command": "python -m bench.proposals " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": report.machine(),
        "load_start": report.load_average(),
    }
    if "lens" in what:
        results["lens"] = {name: lens_variants(name, 7) for name in ("gemma3-270m", "gpt2-shaped")}
    if "kl" in what:
        results["kl_and_concat"] = kl_and_concat()
    if "lower" in what:
        results["lower_blocks"] = lower_blocks()
    results["load_end"] = report.load_average()
    out = HERE / "results" / "gemma-proposals.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"load {results['load_start']} -> {results['load_end']}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

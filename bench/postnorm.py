"""``python -m bench.postnorm --model gemma3-270m --layer 12 --facts F --n 2``: what one ROME update of one fact
does to the tokens it was not meant for, measured on a model with or without a norm after the MLP (issue 20,
``docs/editors.md``: "the norm after the MLP").

For each of the first ``--n`` facts, on the base model: ``k*``, ``v*`` (``rome.compute_value``, ROME's defaults),
then the rank-one update with ``C = E[k kᵀ]`` (and on a family with a post-MLP norm, also with ``v*`` rescaled to
``s v*``: ``rome.post_norm_value``). For each update, over the tokens
of three texts (the key-statistics corpus' first rows, in-sample; the panel's unrelated text; the panel's general
probes), per token:

* ``rel_out`` = ‖ΔW k‖ / ‖W k + b‖: the projection output's relative change;
* ``rel_resid`` = ‖Δ(what the MLP adds to the residual)‖ / ‖residual after the block‖ (a post-norm family: the
  change of the post-norm's output; otherwise ``ΔW k`` itself);

and the number of general probes whose answer is no longer every piece top-1 (teacher-forced). Prints one JSON
object. Uses the cached key statistics (``~/.cache/transformer-surgery/keystats``).
"""

from __future__ import annotations

import argparse
import json
import time


def _summary(x) -> dict:
    import torch

    x = x.double()
    return {
        "median": round(float(x.median()), 4),
        "p90": round(float(torch.quantile(x, 0.9)), 4),
        "max": round(float(x.max()), 4),
        "mean": round(float(x.mean()), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--facts", default="assets/examples/gemma_multitoken_capitals.json")
    p.add_argument("--n", type=int, default=2, help="how many facts (the first N)")
    p.add_argument("--corpus-rows", type=int, default=4, help="rows of 256 tokens of the key-statistics text")
    args = p.parse_args(argv)

    import torch

    from surgery.arch import layout_of
    from surgery.core.hooks import hooked, main_output
    from surgery.core.tokens import special_prefix
    from surgery.edit.keystats import corpus_texts, key_statistics, token_rows
    from surgery.edit.mlp_out import (
        all_top1,
        answer_logits,
        out_projection,
        projected,
        projections_replaced,
        teacher_forced,
    )
    from surgery.edit.rome import RomeHparams, compute_key, compute_value, post_norm_value, rank_one_update
    from surgery.evaluation.facts import load_facts
    from surgery.evaluation.panels import panel_for_model
    from surgery.io.loading import load_model

    torch.set_num_threads(1)
    t0 = time.time()
    g = load_model(args.model)
    model, tok = g.model, g.tokenizer
    model.eval()
    layout = layout_of(model)
    a = layout.adapter
    L = args.layer
    path, w_view, bias = out_projection(model, L)
    W = w_view.detach().double()
    post = model.get_submodule(a.path("mlp_post_norm", L)) if a.mlp_post_norm else None
    panel = panel_for_model(model)
    facts = load_facts(args.facts)[: args.n]

    # the texts' tokens: keys, projection outputs and residuals after block L
    prefix = special_prefix(tok)
    width = min(256, layout.n_ctx - len(prefix))
    rows = [prefix + r for r in token_rows(tok, corpus_texts(), width, width * args.corpus_rows)]
    texts = {
        "corpus": rows,
        "unrelated": [list(tok(t)["input_ids"])[: layout.n_ctx] for t in panel.unrelated_text],
        "general": [list(tok(f.prompt)["input_ids"]) for f in panel.general],
    }

    got: dict = {}
    fw = {
        path: lambda m, args_, out: got.__setitem__("m", main_output(out)[0].detach()),
        a.block(L): lambda m, args_, out: got.__setitem__("h", main_output(out)[0].detach()),
    }
    pre = {path: lambda m, args_: got.__setitem__("k", args_[0][0].detach())}

    def capture(ids_rows):
        ks, ms, hs = [], [], []
        for r in ids_rows:
            with torch.no_grad(), hooked(model, forward=fw, pre=pre):
                model(input_ids=torch.tensor([r]), logits_to_keep=1)
            skip = len(prefix)
            ks.append(got["k"][skip:])
            ms.append(got["m"][skip:])
            hs.append(got["h"][skip:])
        return torch.cat(ks).double(), torch.cat(ms).double(), torch.cat(hs).double()

    caught = {name: capture(r) for name, r in texts.items()}

    def added(m):  # what the MLP adds to the residual, given the projection's output
        if post is None:
            return m
        with torch.no_grad():
            return post(m.float()).double()

    def effect(dw):
        out = {}
        for name, (k, m, h) in caught.items():
            dm = k @ dw.T
            rel_out = dm.norm(dim=-1) / m.norm(dim=-1)
            rel_resid = (added(m + dm) - added(m)).norm(dim=-1) / h.norm(dim=-1)
            out[name] = {"tokens": k.shape[0], "rel_out": _summary(rel_out), "rel_resid": _summary(rel_resid)}
        return out

    def broken(matrix):
        n = 0
        with torch.no_grad(), projections_replaced(model, {L: matrix.float()}):
            for f in panel.general:
                ans = teacher_forced(tok, f, layout.n_ctx, torch.device("cpu"))
                n += not all_top1(answer_logits(model, ans), ans.labels)
        return n

    base_broken = broken(W)
    stats = {"C": key_statistics(model, tok, L).second_moment}
    result = {"model": args.model, "layer": L, "base_general_not_top1": base_broken, "facts": []}
    for name, (_, m, h) in caught.items():  # the sizes involved, unedited
        result[f"{name}: |W k + b|, |added|, |h|"] = [
            _summary(m.norm(dim=-1)),
            _summary(added(m).norm(dim=-1)),
            _summary(h.norm(dim=-1)),
        ]
    if post is not None:
        result["post-norm gain g"] = _summary(a.norm.gain(post).abs())
    hp = RomeHparams()
    for fact in facts:
        key, position, _ = compute_key(model, tok, fact, L)
        v, steps, nll, kl = compute_value(model, tok, fact, position, hp, {L: W.float()}, path)
        m_star = projected(W, bias, key)
        with torch.no_grad(), hooked(model, forward=fw, pre=pre):
            model(input_ids=torch.tensor([list(tok(fact.prompt)["input_ids"])]), logits_to_keep=1)
        h_star = got["h"][position].double()
        row = {
            "prompt": fact.prompt,
            "v_steps": steps,
            "v_nll": round(nll, 4),
            "v_kl": round(kl, 4),
            "|v*-m*|/|m*|": round(float((v - m_star).norm() / m_star.norm()), 3),
            "cos(v*,m*)": round(float(v @ m_star / v.norm() / m_star.norm()), 3),
            "|added(v*)-added(m*)|/|h*|": round(float((added(v) - added(m_star)).norm() / h_star.norm()), 3),
            "updates": {},
        }
        variants = [("C", stats["C"], v)]
        if post is not None:
            vs = post_norm_value(m_star, v)
            row["rescale"] = round(float(vs.norm() / v.norm()), 3)
            row["|s v*-m*|/|m*|"] = round(float((vs - m_star).norm() / m_star.norm()), 3)
            variants.append(("C + rescaled v*", stats["C"], vs))
        for name, c, value in variants:
            new = rank_one_update(W, bias, key, value, c)
            dw = new - W
            row["updates"][name] = {
                "dL2": round(float(dw.norm()), 3),
                "general_not_top1": broken(new),
                "effect": effect(dw),
            }
        result["facts"].append(row)
        print(json.dumps(row), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

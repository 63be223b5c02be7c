"""How much of the vocabulary an exact bound lets the logit lens skip, on Gemma 3 270M's residuals.

    .venv/bin/python -m bench.lens_bounds [--facts 32] [--threads 2]

For a residual ``x`` (after the final norm) and a token ``t``, a split of the unembedding row into a k-dim
projection and a remainder, ``u_t = P u_t + r_t``, bounds the logit on both sides:
``|u_t . x - (P u_t) . (P x)| <= |r_t| |(I - P) x|`` (k = 0: Cauchy-Schwarz, ``|u_t . x| <= |u_t| |x|``).
A token is decided without its dot product when the whole interval lies above or below the target's logit; the
rest would need the exact product. Prints, per residual (embeddings, then after each block), the mean fraction of
the vocabulary left undecided for the target's rank, for P = the top-k principal directions of the unembedding
(from 16,384 sampled rows) and of the residuals of other facts (the first half of the facts; measured on the second).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from surgery.arch import layout_of
from surgery.core.tokens import encode_prompt, encode_target
from surgery.diagnosis.diagnose import accumulated_resid, capture_last_position
from surgery.io.loading import load_model

from .census import pick_facts


def undecided(x: Tensor, thr: Tensor, w_u: Tensor, basis: Tensor) -> Tensor:
    """Fraction of the vocabulary whose bound straddles ``thr``. x: (S, B, d), thr: (S, B), basis: (d, k) -> (S,)."""
    u_norm2 = (w_u * w_u).sum(-1)
    u_p = w_u @ basis  # (V, k)
    r_u = (u_norm2 - (u_p * u_p).sum(-1)).clamp_min(0).sqrt()  # (V,)
    x_p = x @ basis  # (S, B, k)
    r_x = ((x * x).sum(-1) - (x_p * x_p).sum(-1)).clamp_min(0).sqrt()  # (S, B)
    out = []
    for s in range(x.shape[0]):
        centre, radius = x_p[s] @ u_p.T, r_x[s][:, None] * r_u  # (B, V)
        t = thr[s][:, None]
        out.append(((centre + radius >= t) & (centre - radius <= t)).float().mean())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("gemma3-270m")
    model, tok = loaded.model, loaded.tokenizer
    layout = layout_of(model)
    facts = pick_facts(args.facts)
    ids = [encode_prompt(tok, f.prompt, layout.n_ctx, prepend_bos=True) for f in facts]
    lengths = torch.tensor([len(i) for i in ids])
    input_ids = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, i in enumerate(ids):
        input_ids[row, : len(i)] = torch.tensor(i)
    mask = (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        resid = accumulated_resid(capture_last_position(model, input_ids, lengths - 1, mask))  # (S, B, d)
        x = model.get_submodule(layout.adapter.final_norm)(resid)
        w_u = layout.w_u(model)
        targets = torch.tensor([encode_target(tok, f.target)[0] for f in facts])
        thr = torch.einsum("sbd,bd->sb", x, w_u[targets])  # (S, B)
        sample = w_u[torch.randperm(w_u.shape[0], generator=torch.Generator().manual_seed(0))[:16384]]
        pcs_u = torch.linalg.eigh(sample.T.double() @ sample.double()).eigenvectors.flip(-1).float()  # (d, d)
        half = len(facts) // 2
        calib = x[:, :half].reshape(-1, x.shape[-1])
        pcs_x = torch.linalg.svd(calib / calib.norm(dim=-1, keepdim=True), full_matrices=False).Vh.T  # (d, d')
        rows = {"Cauchy-Schwarz (k = 0)": undecided(x, thr, w_u, pcs_u[:, :0])}
        for k in (64, 128):
            rows[f"unembedding PCA, k = {k}"] = undecided(x, thr, w_u, pcs_u[:, :k])
        for k in (64, 128):
            rows[f"residual PCA (other facts), k = {k}"] = undecided(x[:, half:], thr[:, half:], w_u, pcs_x[:, :k])
    n = x.shape[0]
    print(
        f"Gemma 3 270M, {len(facts)} facts: fraction of the vocabulary a bound leaves undecided (needs the exact "
        f"product), per residual"
    )
    print("| bound | " + " | ".join("emb" if s == 0 else f"{s - 1}" for s in range(n)) + " |")
    print("|---|" + "---:|" * n)
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values.tolist()) + " |")


if __name__ == "__main__":
    main()

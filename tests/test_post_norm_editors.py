"""ROME, MEMIT and AlphaEdit on a family with a norm after the MLP (Gemma 2/3's post_feedforward_layernorm,
``docs/editors.md``): ROME writes v*'s normalized output exactly, MEMIT's per-block target is mapped back through the
norm, and the families without that norm edit exactly as the papers do."""

import pytest
import torch
from conftest import make_family_model
from test_editors import TEXTS, wrong_facts

from surgery.arch import layout_of
from surgery.edit import editors
from surgery.edit.keystats import key_statistics
from surgery.edit.memit import post_norm_target
from surgery.edit.mlp_out import out_projection
from surgery.edit.rome import RomeHparams, apply_rome, compute_key, compute_value, post_norm_value

LAYER = 1


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def post_model(request, tiny_tokenizer):
    return make_family_model(request.param, len(tiny_tokenizer))


def post_norm_of(model, layer=LAYER):
    return model.get_submodule(layout_of(model).adapter.path("mlp_post_norm", layer))


def stats(model, tokenizer, tmp_path):
    return key_statistics(
        model, tokenizer, LAYER, texts=TEXTS, corpus="tiny", max_tokens=400, chunk_tokens=16, cache_dir=tmp_path
    )


def test_the_rescaled_value_has_the_same_normalized_output_and_is_closer(post_model):
    gen = torch.Generator().manual_seed(0)
    d = layout_of(post_model).d_model
    norm = post_norm_of(post_model)
    for _ in range(5):
        m = torch.randn(d, generator=gen, dtype=torch.float64)
        v = m + 4 * m.norm() * torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
        s_v = post_norm_value(m, v)
        assert torch.linalg.matrix_rank(torch.stack([s_v, v])) == 1 and float(s_v @ v) > 0  # a positive multiple
        torch.testing.assert_close(s_v.norm(), m.norm())  # m*'s length
        with torch.no_grad():
            torch.testing.assert_close(norm(s_v.float()), norm(v.float()), rtol=1e-4, atol=1e-4)
        assert (s_v - m).norm() < (v - m).norm() / 2  # a turn, not a stretch: a smaller change


def test_rome_writes_v_star_exactly_through_the_post_norm(post_model, tiny_tokenizer, tmp_path):
    model = post_model
    fact = wrong_facts(model, tiny_tokenizer, 1)[0]
    path, w, bias = out_projection(model, LAYER)
    key, position, _ = compute_key(model, tiny_tokenizer, fact, LAYER)
    v_star, *_ = compute_value(model, tiny_tokenizer, fact, position, RomeHparams(), {LAYER: w.detach()}, path)
    weight, (done,) = apply_rome(
        model, tiny_tokenizer, [fact], LAYER, stats(model, tiny_tokenizer, tmp_path), post_norm=True
    )
    new = layout_of(model).mlp_out_matrix(weight).double()
    out = new @ key + (0.0 if bias is None else bias.double())
    torch.testing.assert_close(out, done.value, rtol=1e-4, atol=1e-4)  # W' k* + b = s v*
    norm = post_norm_of(model)
    with torch.no_grad():
        written, wanted = norm(out.float()).double(), norm(v_star.float()).double()
    torch.testing.assert_close(written, wanted, rtol=1e-4, atol=1e-4)  # the norm's output of v*, exactly


def test_memit_targets_are_written_through_the_post_norm(post_model):
    """A wanted change ``r`` the norm can produce (``g ⊙ u − g ⊙ m / σ``, rms(u) = 1): solving ``ΔW K = R'``
    exactly makes the norm output ``g ⊙ u``; one far beyond what it can write gives that change's direction."""
    model = post_model
    gen = torch.Generator().manual_seed(1)
    layout = layout_of(model)
    _, w, bias = out_projection(model, LAYER)
    norm = post_norm_of(model)
    g = layout.adapter.norm.gain(norm).double()[:, None]
    k = torch.randn(layout.d_mlp, 3, generator=gen, dtype=torch.float64)
    w = w.detach().double()
    b = 0.0 if bias is None else bias.double()[:, None]
    with torch.no_grad():
        before = norm((w @ k + b).T.float()).double().T  # what the block adds now
    u = torch.randn(layout.d_model, 3, generator=gen, dtype=torch.float64)
    u = u / u.pow(2).mean(0, keepdim=True).sqrt()
    for scale, exact in ((1.0, True), (100.0, False)):
        wanted = before + scale * (g * u - before)
        delta = post_norm_target(model, LAYER, w, k, wanted - before) @ torch.linalg.pinv(k)  # ΔW K = R' exactly
        with torch.no_grad():
            after = norm(((w + delta) @ k + b).T.float()).double().T
        if exact:
            torch.testing.assert_close(after, g * u, rtol=1e-3, atol=1e-3)
        else:
            cos = (after * wanted).sum(0) / after.norm(dim=0) / wanted.norm(dim=0)
            assert float(cos.min()) > 0.9  # the direction of what was asked, at the norm's own length


def test_families_without_a_post_norm_edit_as_the_papers(tiny_tokenizer, tmp_path, monkeypatch):
    """Llama: no rescaling, no target mapping (the arguments the editors are called with), no note."""
    model = make_family_model("llama", len(tiny_tokenizer))
    seen = []
    real_rome, real_memit = editors.apply_rome, editors.apply_memit

    def spy_rome(*a, **k):
        seen.append(("rome", k.get("post_norm")))
        return real_rome(*a, **k)

    def spy_memit(*a, **k):
        seen.append(("memit", k.get("post_norm")))
        return real_memit(*a, **k)

    monkeypatch.setattr(editors, "apply_rome", spy_rome)
    monkeypatch.setattr(editors, "apply_memit", spy_memit)
    facts = wrong_facts(model, tiny_tokenizer, 1)
    for method in ("rome", "memit"):
        done = editors.edit_mlp_out(model, tiny_tokenizer, facts, LAYER, method, 300, cache_dir=tmp_path)
        assert "post_norm" not in done.hparams and not any("post-MLP" in n for n in done.notes)
    assert seen == [("rome", False), ("memit", False)]


def test_a_zero_gain_leaves_its_dimension_and_the_target_finite(post_model):
    """Gemma 3 270M's dequantized post-norm gains are exactly 0 in a few dimensions (blocks 1, 3, 4): the block
    writes nothing there, so a wanted change there is out of reach; the others are still written exactly."""
    model = post_model
    gen = torch.Generator().manual_seed(2)
    layout = layout_of(model)
    _, w, bias = out_projection(model, LAYER)
    norm = post_norm_of(model)
    weight = norm.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[:3] -= layout.adapter.norm.gain(norm)[:3]  # the gain is affine in the weight with slope 1
        g = layout.adapter.norm.gain(norm).double()[:, None]
        assert int((g == 0).sum()) == 3
        k = torch.randn(layout.d_mlp, 2, generator=gen, dtype=torch.float64)
        wd, b = w.detach().double(), 0.0 if bias is None else bias.double()[:, None]
        with torch.no_grad():
            before = norm((wd @ k + b).T.float()).double().T
        u = torch.randn(layout.d_model, 2, generator=gen, dtype=torch.float64)
        u[:3] = 0  # reachable: nothing in the dead dimensions...
        u = u / u.pow(2).mean(0, keepdim=True).sqrt()
        r = g * u - before
        r_dead = r.clone()
        r_dead[:3] = 5.0  # ...and the same change asking for something there too
        for wanted in (r, r_dead):
            target = post_norm_target(model, LAYER, wd, k, wanted)
            assert torch.isfinite(target).all()
            delta = target @ torch.linalg.pinv(k)
            with torch.no_grad():
                after = norm(((wd + delta) @ k + b).T.float()).double().T
            torch.testing.assert_close(after[3:], (g * u)[3:], rtol=1e-3, atol=1e-3)
    finally:
        with torch.no_grad():
            weight.copy_(saved)

import copy

import pytest
import torch

from surgery.arch import ParamSlice, layout_of
from surgery.core.errors import InputError


def test_dimensions_come_from_config(tiny_model, gpt2_small_random):
    tiny = layout_of(tiny_model)
    assert (tiny.n_layer, tiny.n_head, tiny.d_model, tiny.d_head, tiny.d_mlp) == (3, 4, 32, 8, 128)
    big = layout_of(gpt2_small_random)
    assert (big.n_layer, big.n_head, big.d_model, big.d_head, big.d_vocab, big.n_ctx) == (12, 12, 768, 64, 50257, 1024)


def test_site_sizes_gpt2_small(gpt2_small_random):
    layout = layout_of(gpt2_small_random)
    sizes = {s: layout.site_size(gpt2_small_random, s, 9) for s in ("wv", "attn", "mlp", "layer")}
    assert sizes == {"wv": 589_824, "attn": 2_362_368, "mlp": 4_722_432, "layer": 7_087_872}


def test_v_columns_are_what_the_model_uses_as_values(tiny_model):
    """The V slice is written down as columns 2d:3d of c_attn (Conv1D is [in, out]); check against the module."""
    layout = layout_of(tiny_model)
    attn = tiny_model.transformer.h[1].attn
    x = torch.randn(1, 5, layout.d_model)
    q, k, v = attn.c_attn(x).split(layout.d_model, dim=2)
    w = attn.c_attn.weight
    assert torch.allclose(v, x @ w[:, layout.qkv_columns("v")] + attn.c_attn.bias[layout.qkv_columns("v")], atol=1e-6)
    assert torch.allclose(q, x @ w[:, layout.qkv_columns("q")] + attn.c_attn.bias[layout.qkv_columns("q")], atol=1e-6)
    # per-head view: head h of W_V maps d_model -> d_head, columns h*dh:(h+1)*dh of the V block
    w_v = layout.w_qkv(tiny_model, 1, "v")  # (H, d, dh)
    assert torch.allclose(v[0, :, layout.head_slice(2)], x[0] @ w_v[2] + layout.b_qkv(tiny_model, 1, "v")[2], atol=1e-6)


def test_w_o_rows_are_heads(tiny_model):
    layout = layout_of(tiny_model)
    proj = tiny_model.transformer.h[0].attn.c_proj
    z = torch.randn(layout.d_model)
    w_o = layout.w_o(tiny_model, 0)  # (H, dh, d)
    per_head = torch.stack([z[layout.head_slice(h)] @ w_o[h] for h in range(layout.n_head)]).sum(0)
    assert torch.allclose(per_head + proj.bias, proj(z[None])[0], atol=1e-5)


def test_bad_layer_and_site(tiny_model):
    layout = layout_of(tiny_model)
    with pytest.raises(InputError, match="out of range"):
        layout.site_slices("wv", 3)
    with pytest.raises(InputError, match="unknown site"):
        layout.site_slices("qk", 0)


def test_bad_head_is_refused_where_heads_are_patched(tiny_model, tiny_tokenizer):
    from surgery.patching.activations import PatchUnit, prepare_pair
    from surgery.patching.weights import head_slices

    layout = layout_of(tiny_model)
    assert layout.check_head(layout.n_head - 1) == layout.n_head - 1
    for bad in (layout.n_head, -1, True):
        with pytest.raises(InputError, match=f"head {bad!r} is out of range: this model has heads 0..3"):
            head_slices(layout, 0, bad, "v")
    pair = prepare_pair(tiny_model, tiny_tokenizer, "The capital of France is", "The capital of Italy is", " Paris")
    with pytest.raises(InputError, match="head 4 is out of range"):
        pair.restored(tiny_model, [[PatchUnit("head", 0, head=4)]])


def test_param_slice_write_leaves_original_untouched():
    p = torch.arange(12.0).view(2, 6)
    s = ParamSlice("w", slice(4, 6))
    new = s.write(p, torch.zeros(2, 2))
    assert torch.equal(p, torch.arange(12.0).view(2, 6))
    assert torch.equal(new[:, :4], p[:, :4]) and torch.equal(new[:, 4:], torch.zeros(2, 2))
    assert ParamSlice.from_dict(s.to_dict()) == s
    assert s.numel(p) == 4


def test_labels_name_the_familys_own_module_path(family_model):
    """One label helper: ``L{block+1} H{head}``, with the module path of the family's blocks where asked."""
    layout = layout_of(family_model)
    blocks = layout.adapter.blocks
    assert layout.label(16, 3) == "L17 H3" and layout.label(0) == "L1" and layout.label(None) == "embeddings"
    assert layout.label(16, 3, path=True) == f"L17 H3 ({blocks}.16, head 3)"
    assert layout.label(2, path=True) == f"L3 ({blocks}.2)"
    assert family_model.get_submodule(f"{blocks}.2") is not None  # the path names a real module of this model


def _count_walks(monkeypatch, model) -> list:
    """Count ``model.named_modules()`` calls (the walk a first resolution does) on this one object."""
    calls = []
    walk = model.named_modules

    def counting(*args, **kwargs):
        calls.append(1)
        return walk(*args, **kwargs)

    monkeypatch.setattr(model, "named_modules", counting)
    return calls


def test_the_layout_is_resolved_once_per_model(monkeypatch, tiny_tokenizer):
    from conftest import make_family_model

    model = make_family_model("llama", len(tiny_tokenizer))
    walks = _count_walks(monkeypatch, model)
    first = layout_of(model)
    assert len(walks) == 1
    assert layout_of(model) is first and len(walks) == 1  # the second call does not walk the modules again
    copied = copy.copy(model)  # a copy may have other modules: it resolves its own layout
    assert layout_of(copied) == first


def test_a_patched_view_reports_its_base_layout_without_a_walk(monkeypatch, tiny_tokenizer):
    from conftest import make_family_model

    from surgery.io.edit_file import Edit, base_config, block_digest, edited_model

    model = make_family_model("llama", len(tiny_tokenizer))
    layout = layout_of(model)
    params = dict(model.named_parameters())
    slices = tuple(layout.site_slices("wv", 1, model))
    edit = Edit(
        "wv",
        1,
        slices,
        {s.name: s.read(params[s.name]) + 0.1 for s in slices},
        {"base_config": base_config(model), "base_block_sha256": block_digest(model, 1)},
    )
    view = edited_model(model, edit)
    walks = _count_walks(monkeypatch, view)
    assert layout_of(view) == layout and layout_of(view).adapter.block(1) == "model.layers.1"
    assert walks == []


def test_a_config_changed_in_place_is_checked_again(tiny_tokenizer):
    from conftest import make_family_model

    from surgery.core.errors import UnsupportedModelError

    model = make_family_model("llama", len(tiny_tokenizer))
    layout_of(model)
    model.config.residual_multiplier = 0.5
    with pytest.raises(UnsupportedModelError, match="residual_multiplier"):
        layout_of(model)


def test_a_loaded_model_exposes_its_layout(tiny_model_dir):
    from surgery.io.loading import load_model

    loaded = load_model(str(tiny_model_dir))
    assert loaded.layout is layout_of(loaded.model) and loaded.layout.family == "GPT-2"

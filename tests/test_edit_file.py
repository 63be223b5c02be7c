import copy
import threading

import pytest
import torch
from conftest import make_tiny_model

from surgery.arch import layout_of
from surgery.core.errors import EditError
from surgery.core.hooks import hooked
from surgery.evaluation.generation import generate
from surgery.io.edit_file import Edit, base_config, block_digest, edited_model, weight_stats

PROMPT = "The capital of France is"


def make_edit(model, site="wv", layer=1, seed=0, scale=0.5) -> Edit:
    """An edit moving every element of the site by random noise."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    slices = tuple(layout_of(model).site_slices(site, layer, model))
    values = {
        s.name: s.read(params[s.name]) + scale * torch.randn(s.read(params[s.name]).shape, generator=gen)
        for s in slices
    }
    return Edit(
        site,
        layer,
        slices,
        values,
        {"base_config": base_config(model), "base_block_sha256": block_digest(model, layer)},
    )


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logits(model, tokenizer, prompt=PROMPT):
    return model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]


def test_view_shares_untouched_tensors_and_leaves_the_base_alone(tiny_model):
    before = _snapshot(tiny_model)
    edit = make_edit(tiny_model)
    view = edited_model(tiny_model, edit)
    base_params, view_params = dict(tiny_model.named_parameters()), dict(view.named_parameters())
    assert base_params.keys() == view_params.keys()
    edited = {s.name for s in edit.slices}
    for name, p in base_params.items():
        if name in edited:
            assert view_params[name] is not p  # the private copy of the edited tensor
        else:
            assert view_params[name] is p  # shared, not copied (the edited block's other tensors too)
    assert edited == {"transformer.h.1.attn.c_attn.weight"}
    assert view.transformer.h[1] is not tiny_model.transformer.h[1]  # the edited block is a new module object
    assert view.transformer.h[0] is tiny_model.transformer.h[0] and view.transformer.wte is tiny_model.transformer.wte
    assert view.lm_head.weight is view.transformer.wte.weight  # tied weights stay tied
    v = layout_of(tiny_model).qkv_columns("v")
    assert torch.equal(
        view_params["transformer.h.1.attn.c_attn.weight"][:, v], edit.values["transformer.h.1.attn.c_attn.weight"]
    )
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _edited_copy(model, edit):
    """The straightforward way: a deep copy of the whole model with the edit written into it."""
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for s in edit.slices:
            s.read(params[s.name]).copy_(edit.values[s.name])
    return reference


def test_view_computes_what_an_edited_copy_computes(tiny_model, tiny_tokenizer):
    edit = make_edit(tiny_model, site="mlp", layer=2)
    reference = _edited_copy(tiny_model, edit)
    view = edited_model(tiny_model, edit)
    assert torch.equal(_logits(view, tiny_tokenizer), _logits(reference, tiny_tokenizer))
    assert not torch.equal(_logits(view, tiny_tokenizer), _logits(tiny_model, tiny_tokenizer))


def test_two_views_on_one_base_never_mix(tiny_model, tiny_tokenizer):
    base_logits = _logits(tiny_model, tiny_tokenizer)
    p1, p2 = make_edit(tiny_model, seed=1), make_edit(tiny_model, seed=2)
    v1 = edited_model(tiny_model, p1)
    alone1 = _logits(v1, tiny_tokenizer)
    v2 = edited_model(tiny_model, p2)
    results = {}

    def run(name, view):
        for _ in range(5):
            results.setdefault(name, []).append(_logits(view, tiny_tokenizer))

    threads = [threading.Thread(target=run, args=(n, v)) for n, v in (("v1", v1), ("v2", v2), ("base", tiny_model))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(x, alone1) for x in results["v1"])
    assert all(torch.equal(x, results["v2"][0]) for x in results["v2"])
    assert all(torch.equal(x, base_logits) for x in results["base"])
    assert not torch.equal(alone1, results["v2"][0]) and not torch.equal(alone1, base_logits)


def _greedy(model, tokenizer, prompt, n):
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_generate_works_on_a_view(tiny_model, tiny_tokenizer):
    before = generate(tiny_model, tiny_tokenizer, PROMPT, max_new_tokens=5)
    assert before == _greedy(tiny_model, tiny_tokenizer, PROMPT, 5) and before.strip()
    view = edited_model(tiny_model, make_edit(tiny_model, scale=0.3))
    text = generate(view, tiny_tokenizer, PROMPT, max_new_tokens=5)
    assert text == _greedy(view, tiny_tokenizer, PROMPT, 5) and text != before
    assert generate(tiny_model, tiny_tokenizer, PROMPT, max_new_tokens=5) == before


def test_hooks_on_the_base_do_not_follow_into_a_view(tiny_model, tiny_tokenizer):
    calls = []
    with hooked(
        tiny_model,
        forward={"transformer.h.1.attn": lambda m, a, o: calls.append(1)},
        pre={"": lambda m, a: calls.append(2)},
    ):
        view = edited_model(tiny_model, make_edit(tiny_model))
    _logits(view, tiny_tokenizer)
    assert calls == []


def test_save_and_load_round_trip(tmp_path, tiny_model):
    edit = make_edit(tiny_model, site="attn", layer=0)
    edit.metadata.update(base_model="/models/tiny", revision="abc123")
    edit.save(tmp_path / "p.safetensors")
    loaded = Edit.load(tmp_path / "p.safetensors")
    assert (loaded.site, loaded.layer, loaded.slices) == (edit.site, edit.layer, edit.slices)
    assert loaded.metadata == edit.metadata
    for name, value in edit.values.items():
        assert torch.equal(loaded.values[name], value)


def test_wv_edit_holds_only_the_v_slice(tmp_path, tiny_model):
    from safetensors import safe_open

    make_edit(tiny_model).save(tmp_path / "p.safetensors")
    d = layout_of(tiny_model).d_model
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["transformer.h.1.attn.c_attn.weight"]
        assert tuple(f.get_tensor("transformer.h.1.attn.c_attn.weight").shape) == (d, d)
        meta = f.metadata()
    assert meta["site"] == "wv" and meta["layer"] == "1"
    assert '"cols": [64, 96]' in meta["slices"]  # V = columns 2d:3d of c_attn, d = 32


def test_edit_refused_on_another_base(tiny_model, tiny_tokenizer):
    edit = make_edit(tiny_model)
    with pytest.raises(EditError, match="another base model"):
        edited_model(make_tiny_model(len(tiny_tokenizer), seed=1), edit)
    with pytest.raises(EditError, match="architecture: n_embd 32"):
        edited_model(make_tiny_model(len(tiny_tokenizer), n_embd=48), edit)
    with pytest.raises(EditError, match="blocks 0..1"):
        edited_model(make_tiny_model(len(tiny_tokenizer), n_layer=2), Edit("wv", 2, (), {}, {}))
    name = "transformer.h.1.attn.c_attn.weight"
    bad = Edit("wv", 1, edit.slices, {name: edit.values[name][:, :5]}, {})
    with pytest.raises(EditError, match="shape"):
        edited_model(tiny_model, bad)


def test_edit_whose_slice_names_another_block_is_refused(tmp_path, tiny_model):
    """A crafted edit: it names block 0 (and carries block 0's digest) but its slice is block 1's weight, which
    applying by the name's tail would have written into block 0. Refused, in one line, in check_compatible and so
    by edited_model, after a save/load round trip too."""
    honest = make_edit(tiny_model, layer=1)
    crafted = Edit(
        "wv",
        0,
        honest.slices,
        honest.values,
        {"base_config": base_config(tiny_model), "base_block_sha256": block_digest(tiny_model, 0)},
    )
    crafted.save(tmp_path / "crafted.safetensors")
    for edit in (crafted, Edit.load(tmp_path / "crafted.safetensors")):
        with pytest.raises(EditError) as e:
            edit.check_compatible(tiny_model)
        msg = str(e.value)
        assert "block 0" in msg and "transformer.h.1.attn.c_attn.weight" in msg and "\n" not in msg
        with pytest.raises(EditError, match="not in that block"):
            edited_model(tiny_model, edit)


def test_edit_with_nan_values_is_refused_on_load(tmp_path, tiny_model):
    edit = make_edit(tiny_model)
    name = next(iter(edit.values))
    edit.values[name][0, 0] = float("nan")
    edit.save(tmp_path / "p.safetensors")
    with pytest.raises(EditError, match=f"tensor {name} holds NaN or inf values"):
        Edit.load(tmp_path / "p.safetensors")


def test_broken_edit_files(tmp_path):
    with pytest.raises(EditError, match="does not exist"):
        Edit.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EditError, match="not a readable safetensors"):
        Edit.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EditError, match="not a surgery patch"):
        Edit.load(tmp_path / "other.safetensors")


def test_weight_stats(tiny_model):
    edit = make_edit(tiny_model, scale=0.0)
    name = "transformer.h.1.attn.c_attn.weight"
    edit.values[name][3, 4] += 0.25
    edit.values[name][0, 0] -= 0.5
    stats = weight_stats(tiny_model, edit)
    assert stats.params_in_site == 32 * 32 and stats.params_changed == 2
    assert stats.max_abs_delta == pytest.approx(0.5)
    assert stats.delta_l2 == pytest.approx((0.25**2 + 0.5**2) ** 0.5, rel=1e-5)
    assert stats.others_unchanged and stats.qk_unchanged


def test_weight_stats_catch_a_change_outside_the_slice(tiny_model):
    edit = make_edit(tiny_model)
    tampered = copy.deepcopy(edited_model(tiny_model, edit))
    with torch.no_grad():
        tampered.get_parameter("transformer.h.1.attn.c_attn.weight")[0, 0] += 1.0  # a Q column
    stats = weight_stats(tiny_model, edit, tampered)
    assert stats.qk_unchanged is False and stats.others_unchanged is False


def test_hidden_states_of_a_view(tiny_tokenizer):
    """transformers 5 records hidden states with hooks it installs once per model: a view must record its own
    edited block, exactly once, and the base must keep recording its own."""
    model = make_tiny_model(len(tiny_tokenizer))
    ids = torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])
    edit = make_edit(model, site="mlp", layer=1)
    expected = _edited_copy(model, edit)(ids, output_hidden_states=True).hidden_states
    base_expected = copy.deepcopy(model)(ids, output_hidden_states=True).hidden_states
    for first_call_on_base in (False, True):
        if first_call_on_base:
            model(ids, output_hidden_states=True)
        view = edited_model(model, edit)
        got = view(ids, output_hidden_states=True).hidden_states
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
        base = model(ids, output_hidden_states=True).hidden_states
        assert len(base) == len(base_expected) and all(torch.equal(a, b) for a, b in zip(base, base_expected))


def make_multi_edit(model, layers=(0, 1), seed=0) -> Edit:
    """An edit moving the MLP output projection of each of ``layers`` by random noise (as MEMIT writes them)."""
    gen = torch.Generator().manual_seed(seed)
    layout = layout_of(model)
    params = dict(model.named_parameters())
    slices = tuple(s for layer in layers for s in layout.mlp_out_slices(layer))
    values = {s.name: params[s.name] + 0.5 * torch.randn(params[s.name].shape, generator=gen) for s in slices}
    from surgery.io.edit_file import block_digests

    meta = {"base_config": base_config(model), **block_digests(model, layers), "method": "memit"}
    return Edit("mlp_out", layers[-1], slices, values, meta, layers)


def test_a_multi_block_edit_round_trips_and_copies_each_block(tmp_path, tiny_model, tiny_tokenizer):
    before = _snapshot(tiny_model)
    edit = make_multi_edit(tiny_model)
    edit.save(tmp_path / "p.safetensors")
    loaded = Edit.load(tmp_path / "p.safetensors")
    assert (loaded.site, loaded.layer, loaded.layers, loaded.slices) == ("mlp_out", 1, (0, 1), edit.slices)
    assert loaded.metadata == edit.metadata and set(loaded.metadata["base_blocks_sha256"]) == {"0", "1"}
    view = edited_model(tiny_model, loaded)
    assert view.transformer.h[0] is not tiny_model.transformer.h[0]
    assert view.transformer.h[1] is not tiny_model.transformer.h[1]
    assert view.transformer.h[2] is tiny_model.transformer.h[2]
    base, new = dict(tiny_model.named_parameters()), dict(view.named_parameters())
    assert {n for n in base if new[n] is not base[n]} == set(edit.values)  # only the edited tensors are copies
    for name, value in edit.values.items():
        assert torch.equal(new[name], value)
    assert torch.equal(_logits(view, tiny_tokenizer), _logits(_edited_copy(tiny_model, edit), tiny_tokenizer))
    stats = weight_stats(tiny_model, loaded, view)
    assert stats.others_unchanged and stats.params_in_site == 2 * 32 * 4 * 32  # two [d_mlp, d_model] projections
    assert stats.params_changed == stats.params_in_site and stats.qk_unchanged is None
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_single_block_edit_is_written_as_before(tmp_path, tiny_model):
    """``layers=(layer,)`` (what every single-block edit gets) adds nothing to the file: the same bytes."""
    edit = make_edit(tiny_model)
    edit.save(tmp_path / "a.safetensors")
    Edit(edit.site, edit.layer, edit.slices, edit.values, edit.metadata, (edit.layer,)).save(tmp_path / "b.safetensors")
    a, b = (_parts(tmp_path / f"{x}.safetensors") for x in "ab")
    assert a == b and "layers" not in a[0]["__metadata__"]  # (safetensors orders the header's entries at random)
    assert Edit.load(tmp_path / "a.safetensors").layers == (1,)


def _parts(path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its tensor bytes."""
    import json

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _crafted(tmp_path, edit: Edit, name: str, **meta):
    """``edit`` saved with its metadata entries replaced by ``meta`` (None: removed), as a forger would."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    edit.save(tmp_path / "honest.safetensors")
    with safe_open(str(tmp_path / "honest.safetensors"), framework="pt") as f:
        stored = dict(f.metadata())
    stored.update({k: v for k, v in meta.items() if v is not None})
    for k in [k for k, v in meta.items() if v is None]:
        stored.pop(k)
    save_file({k: v.contiguous() for k, v in edit.values.items()}, str(tmp_path / name), metadata=stored)
    return tmp_path / name


def test_a_damaged_or_crafted_multi_block_edit_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    edit = make_multi_edit(tiny_model)
    for layers in ("[0, 2]", "[1, 0]", "[]", '"01"', "[0, true]"):  # not ascending, not ending at `layer`, ...
        path = _crafted(tmp_path, edit, "bad.safetensors", layers=layers)
        with pytest.raises(EditError, match="broken patch metadata"):
            Edit.load(path)
    # a slice of block 2 in an edit of blocks 0 and 1: it would land in another block
    path = _crafted(tmp_path, make_multi_edit(tiny_model, (0, 2)), "moved.safetensors", layers="[0, 1]", layer="1")
    with pytest.raises(EditError) as e:
        edited_model(tiny_model, Edit.load(path))
    assert "transformer.h.2.mlp.c_proj.weight" in str(e.value) and "\n" not in str(e.value)
    path = _crafted(tmp_path, edit, "nodigest.safetensors", base_blocks_sha256=None)
    with pytest.raises(EditError, match="one base digest for each"):
        edited_model(tiny_model, Edit.load(path))
    with pytest.raises(EditError, match="block 0's weights differ"):
        edited_model(make_tiny_model(len(tiny_tokenizer), seed=1), edit)

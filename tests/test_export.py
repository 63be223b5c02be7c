import json
import os

import pytest
import torch
from safetensors.torch import load_file

import surgery.export as export
from conftest import make_tiny_model
from surgery.errors import OutputError, PatchError
from surgery.export import check_output_dir, model_card, write_output, write_patched_model
from surgery.model_io import LoadedModel, load_model
from surgery.patch import Patch
from surgery.training import SurgeryConfig, operate


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def result(loaded, tiny_panel):
    config = SurgeryConfig(site="wv", layer=0, lr=3e-2)
    return operate(loaded.model, loaded.tokenizer, list(tiny_panel.facts), config, panel=tiny_panel)


@pytest.fixture(scope="module")
def out(tmp_path_factory, loaded, result):
    return write_output(tmp_path_factory.mktemp("ops") / "fixed", loaded, result)


def test_output_folder_contents(out, loaded, result):
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "patch.safetensors", "report.json", "README.md",
            "tokenizer.json", "generation_config.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    report = json.loads((out / "report.json").read_text())
    assert report["facts_fixed"] == "3/3" and report["base_model"] == loaded.source
    assert report["weights"]["qk_unchanged"] is True
    assert oct(out.stat().st_mode & 0o777) != "0o700"  # not the private mode of the temporary folder


def test_output_model_loads_and_is_the_patched_model(out, loaded, result):
    fixed = load_model(out)
    weights = load_file(str(out / "model.safetensors"))
    base = dict(loaded.model.named_parameters())
    v = slice(64, 96)
    for name, p in base.items():
        if name == "transformer.h.0.attn.c_attn.weight":
            assert torch.equal(weights[name][:, :64], p[:, :64])  # Q/K bitwise
            assert torch.equal(weights[name][:, v], result.patch.values[name])
        else:
            assert torch.equal(weights[name], p), name
    ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
    assert loaded.tokenizer.decode([int(fixed.model(ids).logits[0, -1].argmax())]) == "Paris"
    assert fixed.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()


def test_patch_file_holds_only_the_v_slice_with_metadata(out, loaded):
    patch = Patch.load(out / "patch.safetensors")
    assert list(patch.values) == ["transformer.h.0.attn.c_attn.weight"]
    assert tuple(patch.values["transformer.h.0.attn.c_attn.weight"].shape) == (32, 32)
    assert patch.metadata["base_model"] == loaded.source
    assert patch.metadata["base_config"]["n_embd"] == 32 and len(patch.metadata["base_block_sha256"]) == 64
    assert (patch.site, patch.layer, patch.slices[0].cols) == ("wv", 0, slice(64, 96))


def test_model_card(out, result, loaded):
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "license: mit" in front and "- transformer-surgery" in front
    assert "base_model" not in front  # a local folder is not a Hub id
    assert "| facts said (efficacy) | 1/3 (lenient 2, first token 1) | 3/3 (lenient 3, first token 3) |" in card
    assert "Q/K unchanged (bitwise) |  | true" in card
    hub = LoadedModel(loaded.model, loaded.tokenizer, "gpt2", None)
    assert "base_model: gpt2\n" in model_card(hub, result.report)
    assert f"`{result.report.block}`" in card and "- gpt2" in front  # the edited block, the base's family


def test_model_card_names_the_base_license(tmp_path, loaded):
    """The license is the base's: its folder's model card says it, else its family's (Gemma: gemma)."""
    from types import SimpleNamespace

    from surgery.export import base_license

    folder = tmp_path / "base"
    folder.mkdir()
    gemma = LoadedModel(SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text")), None, str(folder), None)
    assert base_license(gemma) == "gemma"
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n# a model\n")
    assert base_license(gemma) == "apache-2.0"
    other = LoadedModel(SimpleNamespace(config=SimpleNamespace(model_type="llama")), None, str(tmp_path), None)
    assert base_license(other) == "other"
    assert base_license(loaded) == "mit"  # GPT-2


def test_apply_patch_reproduces_the_weights_bitwise(tmp_path, out, loaded):
    rebuilt = write_patched_model(tmp_path / "rebuilt", loaded, Patch.load(out / "patch.safetensors"))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_patch_refuses_another_base(tmp_path, out, loaded):
    other_model = make_tiny_model(len(loaded.tokenizer), seed=3)
    other = LoadedModel(other_model, loaded.tokenizer, "other", None)
    with pytest.raises(PatchError, match="another base model"):
        write_patched_model(tmp_path / "x", other, Patch.load(out / "patch.safetensors"))
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_existing_output_is_refused_without_overwrite(tmp_path, loaded, result):
    target = tmp_path / "fixed"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_output(target, loaded, result)
    assert (target / "keep.txt").read_text() == "mine"
    write_output(target, loaded, result, overwrite=True)
    assert (target / "report.json").is_file() and not (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fixed"]


def test_unwritable_output(tmp_path, loaded, result):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot"):
        write_output(blocker / "out", loaded, result)
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(blocker)
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="permission denied"):
            check_output_dir(locked / "out")


def test_interrupted_write_leaves_nothing(tmp_path, loaded, result, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_card", boom)
    with pytest.raises(KeyboardInterrupt):
        write_output(tmp_path / "fixed", loaded, result)
    assert list(tmp_path.iterdir()) == []


def test_saving_does_not_write_to_the_base_config(tmp_path, loaded, result):
    """save_pretrained sets config.architectures/dtype; the shared base's config must not change."""
    tiny_model = make_tiny_model(len(loaded.tokenizer))  # the same weights as the saved tiny model, never saved
    fresh = LoadedModel(tiny_model, loaded.tokenizer, "tiny", None)
    config_before = tiny_model.config.to_dict()
    assert config_before.get("architectures") is None
    write_output(tmp_path / "fixed", fresh, result)
    assert tiny_model.config.to_dict() == config_before
    assert json.loads((tmp_path / "fixed" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

import json
import os
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

import surgery.io.export as export
from surgery.core.errors import EditError, OutputError
from surgery.edit.training import SurgeryConfig, operate
from surgery.evaluation.generation import said
from surgery.io.edit_file import Edit
from surgery.io.export import check_output_dir, model_card, write_edited_model, write_output
from surgery.io.loading import LoadedModel, load_model


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
    assert {
        "config.json",
        "model.safetensors",
        "patch.safetensors",
        "report.json",
        "README.md",
        "tokenizer.json",
        "generation_config.json",
    } <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    report = json.loads((out / "report.json").read_text())
    assert report["facts_fixed"] == "3/3" and report["base_model"] == loaded.base_name
    assert report["weights"]["qk_unchanged"] is True
    assert oct(out.stat().st_mode & 0o777) != "0o700"  # not the private mode of the temporary folder


def test_output_model_loads_and_is_the_edited_model(out, loaded, result):
    fixed = load_model(out)
    weights = load_file(str(out / "model.safetensors"))
    base = dict(loaded.model.named_parameters())
    v = slice(64, 96)
    for name, p in base.items():
        if name == "transformer.h.0.attn.c_attn.weight":
            assert torch.equal(weights[name][:, :64], p[:, :64])  # Q/K bitwise
            assert torch.equal(weights[name][:, v], result.edit.values[name])
        else:
            assert torch.equal(weights[name], p), name
    ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
    assert loaded.tokenizer.decode([int(fixed.model(ids).logits[0, -1].argmax())]) == "Paris"
    assert fixed.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()


def test_patch_file_holds_only_the_v_slice_with_metadata(out, loaded):
    edit = Edit.load(out / "patch.safetensors")
    assert list(edit.values) == ["transformer.h.0.attn.c_attn.weight"]
    assert tuple(edit.values["transformer.h.0.attn.c_attn.weight"].shape) == (32, 32)
    assert edit.metadata["base_model"] == loaded.base_name
    assert edit.metadata["base_config"]["n_embd"] == 32 and len(edit.metadata["base_block_sha256"]) == 64
    assert (edit.site, edit.layer, edit.slices[0].cols) == ("wv", 0, slice(64, 96))


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


def test_is_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    for hub in ("gpt2", "google/gemma-3-270m"):
        assert export.is_hub_id(hub)
    for local in (str(tmp_path), "./model", "../model", "~/model", "/abs/model", "a/b/c", "here"):
        assert not export.is_hub_id(local)


def test_model_card_names_the_base_license(tmp_path, loaded):
    """The license is the base's: its folder's model card says it, else its family's (Gemma: gemma)."""
    from types import SimpleNamespace

    from surgery.io.export import base_license

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
    rebuilt = write_edited_model(tmp_path / "rebuilt", loaded, Edit.load(out / "patch.safetensors"))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_patch_refuses_another_base(tmp_path, out, loaded):
    other_model = make_tiny_model(len(loaded.tokenizer), seed=3)
    other = LoadedModel(other_model, loaded.tokenizer, "other", None)
    with pytest.raises(EditError, match="another base model"):
        write_edited_model(tmp_path / "x", other, Edit.load(out / "patch.safetensors"))
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_existing_output_is_refused_without_overwrite(tmp_path, loaded, result):
    target = tmp_path / "fixed"
    write_output(target, loaded, result)
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_output(target, loaded, result)
    (target / "report.json").write_text("an earlier run")
    write_output(target, loaded, result, overwrite=True)  # an earlier output (it has the marker) is replaced
    assert json.loads((target / "report.json").read_text())["facts_fixed"] == "3/3"
    assert (target / export.MARKER_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["fixed"]


def test_overwrite_never_replaces_a_users_folder(tmp_path, loaded, result):
    """--overwrite with a folder this tool did not write: refused in one line, the user's file survives."""
    target = tmp_path / "my-models"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for attempt in (
        lambda: check_output_dir(target, overwrite=True),
        lambda: write_output(target, loaded, result, overwrite=True),
        lambda: write_edited_model(target, loaded, result.edit, overwrite=True),
    ):
        with pytest.raises(OutputError) as e:
            attempt()
        assert "did not write" in str(e.value) and "\n" not in str(e.value)
    assert (target / "keep.txt").read_text() == "mine" and [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["my-models"]  # no partial folder either
    empty = tmp_path / "empty"
    empty.mkdir()
    write_output(empty, loaded, result, overwrite=True)  # an empty folder holds nothing to lose
    assert (empty / "report.json").is_file()


def test_overwrite_cli_refuses_a_users_folder(tmp_path, out, loaded, capsys):
    from surgery.cli import main

    target = tmp_path / "some_user_folder"
    target.mkdir()
    (target / "notes.md").write_text("mine")
    argv = [
        "apply-patch",
        "--base",
        loaded.source,
        "--patch",
        str(out / "patch.safetensors"),
        "--out",
        str(target),
        "--overwrite",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did not write" in err
    assert [p.name for p in target.iterdir()] == ["notes.md"]
    (target / "notes.md").unlink()
    assert main(argv) == 0 and (target / "model.safetensors").is_file()
    assert main(argv) == 0  # and now it is an earlier output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some_user_folder"]


def test_interrupt_between_the_renames_restores_the_earlier_output(tmp_path, loaded, result, monkeypatch):
    target = tmp_path / "fixed"
    write_output(target, loaded, result)
    before = (target / "model.safetensors").read_bytes()
    real_rename = os.rename

    def rename(src, dst):
        if str(src).startswith(str(tmp_path / ".fixed.partial-")):
            raise KeyboardInterrupt  # after the earlier output was moved aside
        real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_output(target, loaded, result, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
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


def test_outputs_carry_no_local_paths(out, loaded):
    """The base is named by its folder's name only: no file of the output holds the local path it was loaded from
    (report.json, the edit file metadata, the model card, the config and tokenizer files)."""
    assert loaded.base_name == os.path.basename(loaded.source)
    assert json.loads((out / "report.json").read_text())["base_model"] == loaded.base_name
    assert Edit.load(out / "patch.safetensors").metadata["base_model"] == loaded.base_name
    for f in out.iterdir():
        assert loaded.source.encode() not in f.read_bytes(), f.name
        assert str(out).encode() not in f.read_bytes(), f.name


def test_a_bf16_model_is_saved_in_bf16(tmp_path, loaded):
    """A bf16 checkpoint is loaded and edited in float32 but written back in bf16 (not doubled to float32); the
    tied LM head stays tied (one tensor in the file), and the values are the edited view's, rounded to bf16."""
    from safetensors import safe_open

    from surgery.arch import layout_of
    from surgery.io.edit_file import base_config, block_digest, edited_model

    base_dir = tmp_path / "bf16-base"
    make_tiny_model(len(loaded.tokenizer)).to(torch.bfloat16).save_pretrained(base_dir)
    loaded.tokenizer.save_pretrained(base_dir)
    base = load_model(base_dir)
    assert base.checkpoint_dtype == torch.bfloat16 and base.model.dtype == torch.float32
    params = dict(base.model.named_parameters())
    slices = tuple(layout_of(base.model).site_slices("wv", 1, base.model))
    edit = Edit(
        "wv",
        1,
        slices,
        {s.name: s.read(params[s.name]) + 0.25 for s in slices},
        {"base_config": base_config(base.model), "base_block_sha256": block_digest(base.model, 1)},
    )

    out = write_edited_model(tmp_path / "fixed", base, edit)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert "lm_head.weight" not in names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").stat().st_size < 0.6 * 4 * sum(p.numel() for p in params.values())
    view = dict(edited_model(base.model, edit).named_parameters())
    fixed = load_model(out)
    assert fixed.checkpoint_dtype == torch.bfloat16
    for name, p in fixed.model.named_parameters():
        assert torch.equal(p, view[name].to(torch.bfloat16).float()), name
    assert fixed.model.lm_head.weight is fixed.model.transformer.wte.weight
    assert base.model.dtype == torch.float32 and base.model.config.dtype == torch.float32  # the base untouched


def test_the_fix_is_verified_in_the_dtype_it_is_saved_in(tmp_path, loaded, tiny_panel, monkeypatch):
    """A bf16 base, computed in float32: operate's output is written in bf16 only when every fact the edit fixed is
    still said with the edit rounded to bf16. A rounding that undoes the edit (here: faked, the base's own values)
    is refused before anything is written."""
    base_dir = tmp_path / "bf16-base"
    make_tiny_model(len(loaded.tokenizer)).to(torch.bfloat16).save_pretrained(base_dir)
    loaded.tokenizer.save_pretrained(base_dir)
    base = load_model(base_dir)
    facts = list(tiny_panel.facts)
    result = operate(base.model, base.tokenizer, facts, SurgeryConfig(site="wv", layer=0, lr=3e-2), panel=tiny_panel)
    fixed = sum(f.correct_after for f in result.report.comparison.facts)
    assert fixed > sum(f.correct_before for f in result.report.comparison.facts)

    out = write_output(tmp_path / "fixed", base, result)  # rounded to bf16, the fix holds
    again = load_model(out)
    judged = said(again.model, again.tokenizer, [f.prompt for f in facts], [f.target for f in facts])
    assert sum(j.strict for _, j in judged) == fixed

    params = dict(base.model.named_parameters())
    undone = {s.name: s.read(params[s.name]) for s in result.edit.slices}
    monkeypatch.setattr(export, "rounded_edit", lambda edit, dtype: replace(edit, values=undone))
    with pytest.raises(OutputError, match=r"does not survive being saved in bfloat16, the base's dtype: .* no longer"):
        write_output(tmp_path / "lost", base, result)
    assert not (tmp_path / "lost").exists()


SLOW_WRITER = """
import sys, time
import surgery.io.export as export
from surgery.cli import main

real_save = export.save_model


def slow_save(*args, **kwargs):  # the model is written; then wait, mid-output, for the test's SIGTERM
    real_save(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)


export.save_model = slow_save
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_write_leaves_no_partial_folder(tmp_path, out, loaded):
    """SIGTERM while the output folder is being written cleans up as Ctrl-C does: exit 130, no hidden
    .NAME.partial-* folder, and the earlier output that --overwrite was replacing is intact."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "fixed"
    write_edited_model(target, loaded, Edit.load(out / "patch.safetensors"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_WRITER,
            "apply-patch",
            "--base",
            loaded.source,
            "--patch",
            str(out / "patch.safetensors"),
            "--out",
            str(target),
            "--overwrite",
            "--device",
            "cpu",
        ],
        cwd=export.Path(export.__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fixed.partial-")]  # mid-write
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "interrupted"
    assert [p.name for p in tmp_path.iterdir()] == ["fixed"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_a_value_beyond_the_checkpoint_dtype_is_refused():
    from surgery.io.export import cast_state_dict

    wte = torch.tensor([[1.0, 7e4]])
    with pytest.raises(OutputError, match="cannot save wte in float16"):
        cast_state_dict({"wte": wte, "lm_head": wte}, torch.float16)
    cast = cast_state_dict({"wte": wte, "lm_head": wte, "mask": torch.ones(2, dtype=torch.bool)}, torch.bfloat16)
    assert cast["wte"] is cast["lm_head"] and cast["wte"].dtype == torch.bfloat16 and cast["mask"].dtype == torch.bool

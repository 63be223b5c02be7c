"""Causal tracing of the MLPs at the subject (surgery.diagnosis.storage) and ``--layers trace``."""

import pytest
import torch
from conftest import make_tiny_model

from surgery.core.errors import InputError
from surgery.diagnosis.storage import StorageTrace, subject_span, trace_storage
from surgery.edit.training import TRACE, SurgeryConfig
from surgery.evaluation.facts import Fact

FACTS = [
    Fact("The capital of France is", " Paris", subject="France"),
    Fact("The capital of Japan is", " Tokyo", subject="Japan"),
    Fact("the big red cat sat on the", " mat", subject="big red cat"),
]


def test_subject_span_covers_the_subject_tokens(tiny_tokenizer):
    fact = FACTS[2]
    ids = tiny_tokenizer(fact.prompt)["input_ids"]
    assert subject_span(tiny_tokenizer, fact, ids) == range(1, 4)  # "big red cat"
    assert subject_span(tiny_tokenizer, Fact(fact.prompt, " mat"), ids) is None  # no subject named
    assert subject_span(tiny_tokenizer, Fact(fact.prompt, " mat", subject="dog"), ids) is None  # not in the prompt
    assert subject_span(tiny_tokenizer, fact, ids[1:]) is None  # not the prompt's own tokens


def test_the_trace_finds_the_one_block_whose_mlp_writes(tiny_tokenizer):
    """A 6-block model whose MLPs write nothing except block 3's: restoring a window without block 3 changes
    nothing (its effect is exactly 0), a window with it brings some of the answer back (the same amount for every
    such window), and the model is left bitwise as it was."""
    model = make_tiny_model(len(tiny_tokenizer), n_layer=6)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            if i != 3:
                block.mlp.c_proj.weight.zero_()
                block.mlp.c_proj.bias.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace = trace_storage(model, tiny_tokenizer, FACTS, span=2)
    assert trace.first == 1 and len(trace.effects) == 4 and trace.facts == 3  # windows 1-2, 2-3, 3-4, 4-5
    assert trace.effects[0] == 0.0 and trace.effects[3] == 0.0
    assert trace.effects[1] != 0.0 and trace.effects[1] == pytest.approx(trace.effects[2], rel=1e-4, abs=1e-5)
    assert trace.drop != 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = trace_storage(model, tiny_tokenizer, FACTS, span=2)
    assert again.effects == trace.effects  # seeded noise: the same trace twice


def test_the_blocks_are_the_best_window_and_shallow_models_get_all_blocks(tiny_model, tiny_tokenizer):
    trace = StorageTrace(span=3, first=1, effects=(0.5, 2.0, 2.0, 1.0), drop=4.0, facts=2, samples=3, noise=3.0)
    assert trace.blocks == (2, 3, 4)  # the first of the two best windows, offset by the first block
    assert "blocks 2, 3, 4: causal tracing of 2 fact(s)" in trace.describe() and "50%" in trace.describe()
    assert trace.to_dict()["blocks"] == [2, 3, 4]
    raised = StorageTrace(span=3, first=1, effects=(0.5, 2.0), drop=-1.0, facts=2, samples=3, noise=3.0)
    assert "by +2 nats (noise on the subject did not lower it)" in raised.describe()
    shallow = trace_storage(tiny_model, tiny_tokenizer, FACTS[:1], span=5)  # 3 blocks: one window of all 3
    assert shallow.blocks == (0, 1, 2) and len(shallow.effects) == 1


def test_facts_without_subjects_and_bad_options_are_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(InputError, match="causal tracing needs facts that name their subject"):
        trace_storage(tiny_model, tiny_tokenizer, [Fact("The capital of France is", " Paris")], span=2)
    with pytest.raises(InputError, match="span must be a positive integer"):
        trace_storage(tiny_model, tiny_tokenizer, FACTS, span=0)
    assert SurgeryConfig(method="memit", layers=TRACE).layers == TRACE
    with pytest.raises(InputError, match="--layers trace chooses the blocks"):
        SurgeryConfig(method="alphaedit", layer=2, layers=TRACE)
    with pytest.raises(InputError, match="--layers is for --method memit or alphaedit"):
        SurgeryConfig(method="rome", layers=TRACE)
    with pytest.raises(InputError, match="or 'trace'"):
        SurgeryConfig(method="memit", layers="tracing")


def test_memit_and_alphaedit_on_one_memo_trace_the_facts_once(tiny_model, tiny_tokenizer, tiny_panel, tmp_path):
    """compare-editors runs every method with the base model's memo: the trace of the same facts is computed once
    and both edits get the same blocks."""
    import surgery.edit.training as training
    from surgery.evaluation.memo import EvaluationMemo

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return trace_storage(*args, **kwargs)

    memo, facts = EvaluationMemo(tiny_model), [Fact("The capital of France is", " Paris", subject="France")]
    blocks = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(training, "trace_storage", counted)
        for method in ("memit", "alphaedit"):
            config = SurgeryConfig(method=method, layers=TRACE, stat_tokens=300)
            result = training.operate(
                tiny_model,
                tiny_tokenizer,
                facts,
                config,
                panel=tiny_panel,
                require_all=False,
                memo=memo,
                cache_dir=tmp_path,
            )
            blocks.append(result.edit.layers)
    assert len(calls) == 1 and blocks[0] == blocks[1] == (0, 1, 2)

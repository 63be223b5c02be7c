"""Key statistics (surgery/edit/keystats.py): streamed in chunks, budgeted, cached by the weights they depend on."""

import copy

import pytest
import torch
from conftest import TINY_PANEL, make_family_model

from surgery.arch import layout_of
from surgery.core.errors import InputError
from surgery.core.hooks import hooked
from surgery.edit import keystats
from surgery.edit.keystats import corpus_texts, key_statistics, token_rows

TEXTS = TINY_PANEL["unrelated_text"] * 20  # words the tiny tokenizer knows
LAYER = 1


@pytest.fixture(scope="module", params=["gpt2", "gemma3"])
def model(request, tiny_tokenizer):
    return make_family_model(request.param, len(tiny_tokenizer))


def keys_in_one_batch(model, rows: list[list[int]]) -> torch.Tensor:
    """Every key of ``rows`` from one forward pass per row length (no streaming). (N, d_mlp) float64."""
    path = layout_of(model).adapter.path("mlp_out", LAYER)
    got = []
    by_len: dict[int, list[list[int]]] = {}
    for r in rows:
        by_len.setdefault(len(r), []).append(r)
    with torch.no_grad(), hooked(model, pre={path: lambda m, a: got.append(a[0])}):
        for same in by_len.values():
            model(input_ids=torch.tensor(same))
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got]).double()


def test_streaming_in_chunks_equals_one_batch(model, tiny_tokenizer, tmp_path):
    rows = list(token_rows(tiny_tokenizer, TEXTS, 8, 150))
    keys = keys_in_one_batch(model, rows)
    expected = keys.T @ keys / keys.shape[0]
    for batch_rows in (1, 3):
        stats = key_statistics(
            model,
            tiny_tokenizer,
            LAYER,
            texts=TEXTS,
            corpus="tiny",
            max_tokens=150,
            chunk_tokens=8,
            batch_rows=batch_rows,
            use_cache=False,
        )
        assert stats.n_tokens == keys.shape[0] == 150
        assert stats.second_moment.dtype == torch.float64
        assert stats.second_moment.shape == (layout_of(model).d_mlp,) * 2
        torch.testing.assert_close(stats.second_moment, expected, rtol=1e-6, atol=1e-9)


def test_the_budget_is_respected(tiny_tokenizer):
    rows = list(token_rows(tiny_tokenizer, TEXTS, 16, 100))
    assert sum(map(len, rows)) == 100 and max(map(len, rows)) == 16 and all(rows)
    assert sum(map(len, token_rows(tiny_tokenizer, TEXTS[:1], 16, 10_000))) < 100  # short texts: all of them, no more


def test_the_cache_round_trips_and_is_keyed_by_the_weights(model, tiny_tokenizer, tmp_path, monkeypatch):
    args = dict(texts=TEXTS, corpus="tiny", max_tokens=120, chunk_tokens=8, cache_dir=tmp_path)
    first = key_statistics(model, tiny_tokenizer, LAYER, **args)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # written atomically: no temporary file left

    real = keystats.accumulate_keys

    def refuse(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(keystats, "accumulate_keys", refuse)
    again = key_statistics(model, tiny_tokenizer, LAYER, **args)
    assert torch.equal(again.second_moment, first.second_moment) and again.n_tokens == first.n_tokens

    other = copy.deepcopy(model)
    with torch.no_grad():  # one weight of a block below the keys
        next(other.get_submodule(layout_of(other).adapter.block(0)).parameters()).view(-1)[0] += 1.0
    with pytest.raises(AssertionError, match="recomputed"):
        key_statistics(other, tiny_tokenizer, LAYER, **args)
    monkeypatch.setattr(keystats, "accumulate_keys", real)
    changed = key_statistics(other, tiny_tokenizer, LAYER, **args)
    assert changed.fingerprint != first.fingerprint and len(list(tmp_path.iterdir())) == 2
    assert key_statistics(model, tiny_tokenizer, LAYER, **{**args, "max_tokens": 60}).n_tokens == 60  # budget in key


def test_the_corpus_is_english_prose():
    texts = corpus_texts()
    assert len(texts) > 500 and sum(map(len, texts)) > 200_000
    words = " ".join(texts).split()
    assert sum(w.lower() in {"the", "a", "of", "is", "and", "to"} for w in words) / len(words) > 0.1


def test_bad_arguments_are_refused(model, tiny_tokenizer):
    with pytest.raises(InputError, match="corpus name"):
        key_statistics(model, tiny_tokenizer, LAYER, texts=TEXTS, use_cache=False)
    with pytest.raises(InputError, match="max_tokens"):
        key_statistics(model, tiny_tokenizer, LAYER, texts=TEXTS, corpus="tiny", max_tokens=0, use_cache=False)
    with pytest.raises(InputError, match="out of range"):
        key_statistics(model, tiny_tokenizer, 99, texts=TEXTS, corpus="tiny", use_cache=False)

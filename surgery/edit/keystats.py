"""Key statistics: the uncentred second moment ``C = E[k kᵀ]`` of the keys of one block's MLP, on real English text.

The keys ``k`` are the input of block ``layer``'s MLP output projection (GPT-2 ``mlp.c_proj``, the others
``mlp.down_proj``): ``d_mlp`` wide, one per token position. ROME (and later MEMIT, AlphaEdit) use ``C`` to spread a
rank-one update where the keys of other text vary least (``docs/editors.md``).

The text (:func:`corpus_texts`): the prose of the Python documentation's topics, ``pydoc_data.topics``, which ships
with every CPython (about 465 KB; the indented grammar and code lines are left out). ROME used Wikipedia; that
cannot be fetched here, and the docs are real English written by people, maintained with Python, always installed.

Streamed: the paragraphs are tokenized one at a time into rows of ``chunk_tokens`` tokens (BOS first where the
tokenizer adds one by default; its key is not counted), ``rows`` rows run per forward pass, the keys captured by a
pre-hook that stops the pass there (the blocks above and the logits are never computed) and added to a float64
``d_mlp x d_mlp`` accumulator, until ``max_tokens`` keys are counted. Memory: the accumulator (``d_mlp² x 8`` bytes:
32 MiB for Gemma 3 270M's 2,048) plus one chunk's activations up to the block; the corpus is never held tokenized.

Cached (:func:`key_statistics`): one safetensors file per model and layer under ``cache_dir`` (default
``~/.cache/transformer-surgery/keystats``), named by a fingerprint of the model's shape config, the weights the keys
depend on (the embeddings and blocks ``0..layer``), the tokenizer, the corpus and the token budget; written
atomically, so a second call loads it and a changed weight misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..arch import layout_of
from ..core.errors import InputError, NonFiniteError, require_positive_int
from ..core.hooks import hooked
from ..core.tokens import special_prefix
from ..io.edit_file import base_config
from ..io.gguf import default_cache_root

log = logging.getLogger(__name__)

CORPUS = "pydoc_data.topics"  # the name recorded with the statistics and hashed into the cache key
DEFAULT_MAX_TOKENS = 100_000
CHUNK_TOKENS = 256
CHUNK_ROWS = 4
FORMAT = "transformer-surgery-keystats/1"

Progress = Callable[..., None]


def corpus_texts() -> list[str]:
    """The prose paragraphs of ``pydoc_data.topics`` (sorted by topic; indented grammar and code lines dropped)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            lines = [line for line in para.splitlines() if line.strip() and not line.startswith((" ", "\t"))]
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 8 and not set(text) <= set("*=-~^ "):  # a sentence, not a heading's underline
                out.append(text)
    return out


@dataclass(frozen=True)
class KeyStats:
    """``C = E[k kᵀ]`` of block ``layer``'s MLP keys: ``second_moment`` Float64[Tensor, "d_mlp d_mlp"] over
    ``n_tokens`` positions of ``corpus``; ``fingerprint`` is the cache key it was stored under."""

    layer: int
    module: str
    second_moment: Tensor
    n_tokens: int
    corpus: str
    fingerprint: str

    @property
    def d_mlp(self) -> int:
        return self.second_moment.shape[0]


def token_rows(tokenizer, texts: Iterable[str], chunk_tokens: int, max_tokens: int) -> Iterator[list[int]]:
    """Rows of at most ``chunk_tokens`` token ids of ``texts`` run together (paragraphs joined by a blank line),
    ``max_tokens`` ids in all; only one row is held at a time."""
    row: list[int] = []
    left = max_tokens
    for i, text in enumerate(texts):
        ids = list(tokenizer(("\n\n" if i else "") + text, add_special_tokens=False)["input_ids"])
        while ids and left:
            take = min(chunk_tokens - len(row), len(ids), left)
            row += ids[:take]
            ids, left = ids[take:], left - take
            if len(row) == chunk_tokens or not left:
                yield row
                row = []
        if not left:
            return
    if row:
        yield row


class _Enough(Exception):
    """Raised by the key hook: the forward pass has given what it was run for."""


def accumulate_keys(
    model: nn.Module,
    rows: Iterable[list[int]],
    layer: int,
    prefix: Sequence[int] = (),
    batch_rows: int = CHUNK_ROWS,
    progress: Progress | None = None,
    total: int | None = None,
) -> tuple[Tensor, int]:
    """``(sum over positions of k kᵀ, number of positions)``, float64, over ``rows`` (each run after ``prefix``,
    whose keys are not counted), ``batch_rows`` rows of equal length per forward pass."""
    layout = layout_of(model)
    path = layout.adapter.path("mlp_out", layer)
    device = next(model.parameters()).device
    acc = torch.zeros(layout.d_mlp, layout.d_mlp, dtype=torch.float64, device=device)
    count = 0
    captured: list[Tensor] = []

    def grab(module, args):
        captured.append(args[0].detach())
        raise _Enough  # the blocks above and the logits are not needed (as ROME's layer_stats stops there)

    def run(batch: list[list[int]]) -> None:
        nonlocal acc, count
        ids = torch.tensor([list(prefix) + r for r in batch], device=device)  # (B, P + T)
        captured.clear()
        with torch.no_grad(), hooked(model, pre={path: grab}):
            try:
                model(input_ids=ids)
            except _Enough:
                pass
        keys = captured[0][:, len(prefix) :].reshape(-1, layout.d_mlp).double()  # (B * T, d_mlp)
        if not torch.isfinite(keys).all():
            raise NonFiniteError(f"block {layer}'s MLP keys hold NaN or inf on the key-statistics text")
        acc += keys.T @ keys
        count += keys.shape[0]
        if progress is not None:
            progress(count, total or count)

    batch: list[list[int]] = []
    for row in rows:
        if batch and len(row) != len(batch[0]):  # only the last row is shorter: it runs alone
            run(batch)
            batch = []
        batch.append(row)
        if len(batch) == batch_rows:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return acc, count


def fingerprint(model: nn.Module, tokenizer, layer: int, corpus: str, max_tokens: int, chunk_tokens: int) -> str:
    """SHA-256 (hex, first 24) of what the keys of block ``layer`` depend on: the shape config, the embeddings and
    blocks ``0..layer`` (names, shapes, dtypes, bytes), the tokenizer, the corpus, the token budget and the rows."""
    layout = layout_of(model)
    a = layout.adapter
    h = hashlib.sha256()
    tok = {"class": type(tokenizer).__name__, "size": len(tokenizer), "probe": _probe_ids(tokenizer)}
    head = {"config": base_config(model), "tokenizer": tok, "corpus": corpus, "max_tokens": max_tokens}
    h.update(json.dumps({**head, "layer": layer, "chunk_tokens": chunk_tokens}, sort_keys=True).encode())
    prefixes = [a.embed, *([a.pos_embed] if a.pos_embed else []), *(a.block(i) for i in range(layer + 1))]
    for prefix in prefixes:
        for name, p in sorted(model.get_submodule(prefix).named_parameters()):
            h.update(f"{prefix}.{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # hashed in place: no copy
    return h.hexdigest()[:24]


def _probe_ids(tokenizer) -> list[int]:
    """A tokenizer's ids for a fixed sentence: two tokenizers that split text differently differ here."""
    return list(tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])


def key_statistics(
    model: nn.Module,
    tokenizer,
    layer: int,
    *,
    texts: Sequence[str] | None = None,
    corpus: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_tokens: int = CHUNK_TOKENS,
    batch_rows: int = CHUNK_ROWS,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> KeyStats:
    """``C = E[k kᵀ]`` of block ``layer``'s MLP keys over ``max_tokens`` positions of ``texts`` (default: the
    :func:`corpus_texts`; ``corpus`` names other texts in the cache key, and is required with them), loaded from
    ``cache_dir`` (default ``~/.cache/transformer-surgery/keystats``) when computed before. ``progress(n, total)``
    is called after each forward pass. Raises :class:`InputError` for a bad layer or budget, or texts that give
    no token."""
    layout = layout_of(model)
    layout.check_layer(layer)
    require_positive_int("max_tokens", max_tokens)
    require_positive_int("chunk_tokens", chunk_tokens)
    if texts is not None and not corpus:
        raise InputError("key statistics over your own texts need a corpus name (it keys the cache)")
    corpus = CORPUS if texts is None else corpus
    prefix = special_prefix(tokenizer)
    chunk_tokens = min(chunk_tokens, layout.n_ctx - len(prefix))
    key = fingerprint(model, tokenizer, layer, corpus, max_tokens, chunk_tokens)
    module = layout.adapter.path("mlp_out", layer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "keystats"
    path = root / f"{key}-layer{layer}.safetensors"
    if use_cache and path.is_file():
        stats = _load(path, key)
        if stats is not None:
            log.info("key statistics of block %d loaded from %s", layer, path)
            return stats
    texts = corpus_texts() if texts is None else texts
    rows = token_rows(tokenizer, texts, chunk_tokens, max_tokens)
    acc, count = accumulate_keys(model, rows, layer, prefix, batch_rows, progress, max_tokens)
    if count == 0:
        raise InputError(f"the key-statistics texts ({corpus}) give no token")
    stats = KeyStats(layer, module, (acc / count).cpu(), count, corpus, key)
    if use_cache:
        _save(path, stats)
    return stats


def _save(path: Path, stats: KeyStats) -> None:
    """Write atomically (a temporary file in the same folder, then a rename); an unwritable cache only costs time."""
    meta = {
        "format": FORMAT,
        "layer": str(stats.layer),
        "module": stats.module,
        "n_tokens": str(stats.n_tokens),
        "corpus": stats.corpus,
        "fingerprint": stats.fingerprint,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"second_moment": stats.second_moment.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        log.warning("key statistics not cached (%s): %s", path.parent, e)


def _load(path: Path, key: str) -> KeyStats | None:
    """The cached statistics, or None when the file is unreadable or not ours (then they are recomputed)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        c = load_file(str(path))["second_moment"]
        if meta.get("format") != FORMAT or meta.get("fingerprint") != key:
            return None
        return KeyStats(int(meta["layer"]), meta["module"], c, int(meta["n_tokens"]), meta["corpus"], key)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        log.warning("ignoring the unreadable key-statistics cache %s: %s", path, e)
        return None

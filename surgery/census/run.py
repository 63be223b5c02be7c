"""Census: diagnose every fact of a dataset and count what the model does with them.

``run_census`` diagnoses the facts in batches (:func:`surgery.diagnosis.diagnose.diagnose_batch`) and appends one
record per fact to ``DIR/census.jsonl`` after every batch (flushed), so a run that is interrupted resumes where it
stopped: facts already in the file are skipped. At the end it writes ``DIR/summary.json``, ``DIR/report.md`` and its
plots (:mod:`surgery.census.report`).

**Several processes.** Given a ``state`` (accelerate's ``PartialState``, or anything with ``process_index``,
``num_processes``, ``is_main_process`` and ``wait_for_everyone()``), the batches are dealt out round-robin: process
``r`` of ``n`` diagnoses batches ``r, r + n, ...`` and appends to ``DIR/census.part-<r>.jsonl``; when all are done
the main process merges every part into ``census.jsonl`` in the order of the facts. The batches are cut before
they are dealt, so each batch holds the same facts whatever the number of processes, and the merged file equals a
single-process run's (numbers are rounded to 4 decimals, so a different thread count cannot change a digit).

**Records** (one JSON object per line): the fact (``prompt``, ``target``, ``relation``, ``subject``,
``ambiguous``), the diagnosis (``verdict``, ``prediction``, ``competitor``, ``target_rank`` at the output,
``prescribed_layer``, ``override`` ``{"layer", "head"}``, ``multi_token_target``), which piece of the target was
diagnosed and where (``divergence``, :class:`surgery.diagnosis.divergence.Divergence`), the target's lens rank after the
embeddings and after each block (``lens_ranks``, L+1 entries) with the lens logit margin target - competitor
(``lens_margin``), and ``best_lens_rank`` / ``best_lens_layer`` (the best rank after a block before the last);
then what the model *says*: its greedy continuation (``said``), whether it starts with the whole answer
(``says_answer``, :func:`surgery.evaluation.generation.judge`'s strict figure) and whether it says it a little later
(``says_later``: lenient and not strict, e.g. "Lyon is a city in" -> " the south of France"). These three are null
for a prompt that fills the whole context (nothing can be generated).
A fact that cannot be diagnosed (a word the tokenizer does not know, a prompt too long) gets ``verdict: null`` and
its ``error``. Layers and heads are 0-indexed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..arch import layout_of
from ..core.errors import InputError, OutputError, SurgeryError, first_line, require_positive_int
from ..core.tokens import encode_prompt, encode_target
from ..diagnosis.diagnose import Diagnosis, DiagnosisConfig, diagnose_batch, onloaded
from ..evaluation.facts import Fact
from ..evaluation.generation import said
from ..io.export import MARKER_FILE, MARKER_TEXT

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CENSUS_FILE = "census.jsonl"
RUN_FILE = "census-run.json"  # what the records were computed with; a resumed run must match it
PART_GLOB = "census.part-*.jsonl"


@dataclass(frozen=True)
class CensusConfig:
    """What a census diagnoses and how. ``limit``: only the first N facts (after dropping ambiguous ones)."""

    batch_size: int = 128  # Gemma 3 270M: 6.4 facts/s at 128, 3.8 at 32, +0.7 GB against +0.4 (bench/README.md)
    limit: int | None = None
    include_ambiguous: bool = False
    diagnosis: DiagnosisConfig = field(default_factory=DiagnosisConfig)

    def __post_init__(self) -> None:
        require_positive_int("batch_size", self.batch_size)
        if self.limit is not None:
            require_positive_int("limit", self.limit)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CensusResult:
    """What one call of :func:`run_census` did. ``summary`` is the content of ``summary.json`` (main process)."""

    out_dir: str
    selected: int  # facts selected for this census (after the ambiguity filter and the limit)
    skipped_ambiguous: int
    already_done: int  # selected facts found in the output folder from an earlier run
    diagnosed: int  # facts diagnosed by this process in this call
    summary: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ProcessGroup(Protocol):
    """What ``run_census`` needs of a process group: accelerate's ``PartialState`` has it, so does
    :class:`SingleProcess`."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


class SingleProcess:
    """The trivial process group: what ``run_census`` uses without an accelerate ``PartialState``."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def select_facts(facts: list[Fact], config: CensusConfig) -> tuple[list[Fact], int]:
    """The facts a census diagnoses, and how many ambiguous ones were dropped."""
    kept = [f for f in facts if config.include_ambiguous or f.ambiguous is None]
    skipped = len(facts) - len(kept)
    return (kept[: config.limit] if config.limit else kept), skipped


def run_census(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: list[Fact],
    out_dir: str | os.PathLike,
    config: CensusConfig = CensusConfig(),
    *,
    model_name: str = "",
    state: ProcessGroup | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CensusResult:
    """Diagnose ``facts`` into ``out_dir`` (resuming what is there), then write the summary and the report.

    ``progress(done, total)`` is called after each batch of this process (``done`` counts this process's facts,
    ``total`` the facts left to diagnose across all processes at the start); an exception it raises stops the run
    with every finished batch already on disk. Raises :class:`InputError` when ``out_dir`` holds a census made
    with another model (name or weights: :func:`model_fingerprint`) or rule, and :class:`OutputError` when it is a
    folder that is neither empty nor a census. A run that fails before its first record leaves no census behind
    (nor the folder, if it made it): a diagnosis refused for NaN or inf activations is not a census to resume.
    """
    state = state or SingleProcess()
    out = Path(out_dir)
    selected, skipped = select_facts(facts, config)
    if not selected:
        raise InputError("no facts to diagnose (all are flagged ambiguous: use --include-ambiguous)")
    created: list[Path] = []  # what this run made before its first record: removed again if it writes none
    if state.is_main_process:
        run_info = {"model": model_name, "diagnosis": asdict(config.diagnosis), "fingerprint": model_fingerprint(model)}
        created = _prepare_dir(out, run_info)
    state.wait_for_everyone()
    with _removed_without_records(out, created):
        done = set(read_records(out))
        todo = [f for f in selected if f.key not in done]
        state.wait_for_everyone()  # every process has read the same records before any appends more
        batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
        mine = batches[state.process_index :: state.num_processes]
        target = out / (CENSUS_FILE if state.num_processes == 1 else f"census.part-{state.process_index}.jsonl")
        log.info(
            "census: %d facts selected, %d already in %s, %d batches for process %d of %d",
            len(selected),
            len(selected) - len(todo),
            out,
            len(mine),
            state.process_index,
            state.num_processes,
        )
        diagnosed = 0
        for batch in mine:
            records = diagnose_facts(model, tokenizer, batch, config.diagnosis)
            with target.open("a", encoding="utf-8") as f:  # opened once a batch is done: a failed run leaves no file
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            diagnosed += len(batch)
            if progress is not None:
                progress(diagnosed, len(todo))
        state.wait_for_everyone()

    summary = None
    if state.is_main_process:
        from .report import write_report

        records = merge_records(out, facts)
        layout = layout_of(model)
        summary = write_report(
            records,
            out,
            n_layer=layout.n_layer,
            n_head=layout.n_head,
            model_name=model_name,
            config=config,
            skipped_ambiguous=skipped,
        )
    state.wait_for_everyone()
    return CensusResult(str(out), len(selected), skipped, len(selected) - len(todo), diagnosed, summary)


@contextmanager
def _removed_without_records(out: Path, created: list[Path]):
    """On any exception inside, remove ``created`` (what :func:`_prepare_dir` made) when no record is on disk: a run
    that diagnosed nothing (refused for NaN activations, interrupted in its first batch) leaves no census to
    resume, nor an empty folder it made."""
    try:
        yield
    except BaseException:
        if created and not any(p.is_file() for p in [out / CENSUS_FILE, *out.glob(PART_GLOB)]):
            for path in created:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def diagnose_facts(model: nn.Module, tokenizer, facts: list[Fact], config: DiagnosisConfig) -> list[dict]:
    """One census record per fact, in order; facts that cannot be diagnosed get ``verdict: None`` and ``error``."""
    n_ctx = layout_of(model).n_ctx
    usable, records, room = [], {}, []
    for i, fact in enumerate(facts):
        try:  # one unusable fact must not sink its batch: the same checks diagnose_batch makes, fact by fact
            encode_prompt(tokenizer, fact.prompt, n_ctx, prepend_bos=config.prepend_bos)
            encode_target(tokenizer, fact.target)
            usable.append(i)
            if len(encode_prompt(tokenizer, fact.prompt, n_ctx)) < n_ctx:  # as generated: no BOS
                room.append(i)  # generation needs at least one free position
        except SurgeryError as e:
            records[i] = {**_fact_fields(fact), "verdict": None, "error": str(e)}
    if usable:
        found = diagnose_batch(
            model,
            tokenizer,
            [facts[i].prompt for i in usable],
            [facts[i].target for i in usable],
            config=config,
            batch_size=len(usable),
        )
        spoken = dict(
            zip(
                room,
                said(
                    model,
                    tokenizer,
                    [facts[i].prompt for i in room],
                    [facts[i].target for i in room],
                    batch_size=len(room) or 1,
                ),
            )
        )
        for i, d in zip(usable, found):
            records[i] = census_record(facts[i], d, spoken.get(i))
    return [records[i] for i in range(len(facts))]


def census_record(fact: Fact, d: Diagnosis, spoken=None) -> dict:
    """The census line of one diagnosed fact (see the module docstring). ``spoken``: ``(continuation,
    Judgement)`` from :func:`surgery.evaluation.generation.said`, or None."""
    lens = d.logit_lens
    middle = lens[1:-1]  # after block 0 .. after the block before the last
    best = min(middle, key=lambda e: (e.target_rank, -e.layer)) if middle else lens[-1]
    text, judgement = spoken if spoken is not None else (None, None)
    return {
        **_fact_fields(fact),
        "verdict": d.verdict,
        "prediction": d.prediction.text,
        "competitor": d.competitor.text,
        "target_rank": d.target.rank,
        "prescribed_layer": d.prescribed_layer,
        "override": dict(d.override),
        "multi_token_target": d.multi_token_target,
        "divergence": asdict(d.divergence),
        "best_lens_rank": best.target_rank,
        "best_lens_layer": best.layer,
        "lens_ranks": [e.target_rank for e in lens],
        "lens_margin": [round(e.target_logit - e.competitor_logit, 4) for e in lens],
        "said": text,
        "says_answer": None if judgement is None else judgement.strict,
        "says_later": None if judgement is None else judgement.lenient and not judgement.strict,
    }


def _fact_fields(fact: Fact) -> dict:
    return {
        "prompt": fact.prompt,
        "target": fact.target,
        "relation": fact.relation,
        "subject": fact.subject,
        "ambiguous": fact.ambiguous,
    }


def record_key(record: dict) -> tuple[str, str]:
    return (record["prompt"], record["target"])


def read_records(out: Path) -> dict[tuple[str, str], dict]:
    """Every record in ``census.jsonl`` and the part files, by fact key (a later duplicate wins)."""
    records: dict[tuple[str, str], dict] = {}
    for path in [out / CENSUS_FILE, *sorted(out.glob(PART_GLOB))]:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {path} ({first_line(e)}); use a new --out folder") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[record_key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path} line {number} is not a census record; use a new --out folder") from None
    return records


def merge_records(out: Path, facts: list[Fact]) -> list[dict]:
    """Fold the part files into ``census.jsonl``, ordered as ``facts`` (records of other facts last, as found)."""
    records = read_records(out)
    order = {f.key: i for i, f in enumerate(facts)}
    merged = sorted(records.values(), key=lambda r: order.get(record_key(r), len(order)))
    tmp = out / (CENSUS_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in merged:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, out / CENSUS_FILE)
    for part in out.glob(PART_GLOB):
        part.unlink()
    return merged


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what a census' numbers depend on: the model's config (without its path and the transformers
    version) and every parameter (name, shape, dtype and a SHA-256 of its bytes; tied weights once). Deterministic,
    and different when any weight changes. Offloaded weights (``device_map``) are read through accelerate."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    distinct = {n for n, _ in model.named_parameters()}  # tied weights under their first name only
    digests: dict[str, str] = {}
    for prefix, module in model.named_modules():
        own = {n for n, _ in module.named_parameters(prefix=prefix, recurse=False)} & distinct
        if not own:
            continue
        with onloaded(module):  # a no-op unless accelerate keeps this module's weights off the device
            for name, p in module.named_parameters(prefix=prefix, recurse=False):
                if name in own:
                    data = p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                    digests[name] = f"{name}:{tuple(p.shape)}:{p.dtype}:{hashlib.sha256(data).hexdigest()}"
    for name in sorted(digests):
        h.update(digests[name].encode())
    return h.hexdigest()


def _prepare_dir(out: Path, run_info: dict) -> list[Path]:
    """Create ``out``, or check that it holds a census of the same model (name and weights) and rule; drop
    half-written last lines. Returns what it created (the folder, or its run file and marker) for the caller to
    remove if the run then writes no record. Refuses a folder that is neither empty nor a census."""
    created = [] if out.exists() else [out]
    try:
        out.mkdir(parents=True, exist_ok=True)
        listed = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise OutputError(f"cannot create the census folder {out}: {first_line(e)}") from None
    info_path = out / RUN_FILE
    if info_path.is_file():
        _check_run(out, _read_run(info_path), run_info)
    elif CENSUS_FILE in listed:
        raise InputError(f"{out} holds a census.jsonl of unknown origin; use a new --out folder")
    elif listed:
        raise OutputError(
            f"{out} is not empty and holds no census (no {RUN_FILE}): the census writes report.md and plots there; "
            "use a new or empty --out folder"
        )
    else:
        try:
            info_path.write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
            (out / MARKER_FILE).write_text(MARKER_TEXT, encoding="utf-8")  # an output of this tool, as export's
        except OSError as e:
            raise OutputError(f"cannot write to the census folder {out}: {first_line(e)}") from None
        created = created or [info_path, out / MARKER_FILE]
    for path in [out / CENSUS_FILE, *out.glob(PART_GLOB)]:
        if path.is_file():
            _drop_partial_line(path)
    return created


def _read_run(path: Path) -> dict:
    """The run file of an earlier census, or :class:`InputError` in one line when it is unreadable."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is unreadable ({first_line(e)}); use a new --out folder") from None
    if not isinstance(previous, dict):
        raise InputError(f"{path} is not a census run file (a JSON object); use a new --out folder")
    return previous


def _check_run(out: Path, previous: dict, run_info: dict) -> None:
    """Refuse to add records to a census made with another model, other weights or another rule."""
    changed = sorted(
        k for k in set(previous) | set(run_info) if k != "fingerprint" and previous.get(k) != run_info.get(k)
    )
    if changed:
        raise InputError(f"{out} holds a census made with another {' and '.join(changed)}; use a new --out folder")
    if "fingerprint" not in previous:
        raise InputError(
            f"{out} holds a census made before {RUN_FILE} recorded the weights' fingerprint: whether its records "
            "come from these weights cannot be checked; use a new --out folder"
        )
    if previous["fingerprint"] != run_info["fingerprint"]:
        raise InputError(
            f"{out} holds a census made with other weights under the same name (fingerprint "
            f"{str(previous['fingerprint'])[:12]} there, {run_info['fingerprint'][:12]} now); use a new --out folder"
        )


def _drop_partial_line(path: Path) -> None:
    """A process killed while writing leaves a last line without its newline: cut it (that fact is redone)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])

"""Loading a ``.gguf`` file: converted once to a plain Hugging Face folder, cached by the file's content.

transformers reads GGUF files itself (``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf``
package) and dequantizes every weight into a dense ``nn.Linear``. That takes about 1.5 minutes for a 250 MB
file on 2 CPU cores, so it is done once: the dequantized model and its tokenizer are saved with
``save_pretrained`` (float32 safetensors, so the dequantized values are kept exactly) and every later load
reads that folder, which takes seconds.

Cache layout, under ``cache_root`` (default ``~/.cache/transformer-surgery``, outside any repository)::

    gguf/<first 16 hex digits of the file's SHA-256>/   config.json, model.safetensors, tokenizer files,
                                                        gguf-source.json (the file's name and full digest)
    gguf/digests.json                                    {absolute path: {size, mtime_ns, sha256}}

The key is the file's content, so a renamed or copied file reuses its conversion and a changed file gets a new
one. Hashing 250 MB takes about a second, so the digest is remembered per (path, size, mtime) in
``digests.json``; a file whose size or modification time changed is hashed again.

A conversion is written to a temporary folder next to its final place and renamed into it in one step, so an
interrupted or failed conversion never leaves a folder that looks like a finished one (a killed process can leave
a ``.tmp-*`` folder behind; it is never read and can be deleted).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

from ..core.errors import ModelLoadError, SurgeryError, UnsupportedModelError, first_line

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_SOURCE_FILE = "gguf-source.json"


def default_cache_root() -> Path:
    """Where converted models (and the real-model files) are cached unless told otherwise."""
    return Path.home() / ".cache" / "transformer-surgery"


def file_sha256(path: str | os.PathLike, *, cache_root: str | os.PathLike | None = None) -> str:
    """The SHA-256 of a file (hex), hashed in 1 MiB chunks and remembered per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = Path(cache_root or default_cache_root()) / "gguf" / "digests.json"
    memo = _read_json(memo_file)
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    sha = digest.hexdigest()
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    try:
        _write_json_atomic(memo_file, memo)
    except OSError as e:  # an unwritable cache only costs a rehash next time
        log.warning("cannot remember the digest of %s in %s: %s", path, memo_file, e)
    return sha


def gguf_to_folder(path: str | os.PathLike, *, cache_root: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face folder holding the model of the GGUF file ``path``, converting it first if needed.

    The folder holds a float32 model (every quantized weight dequantized) and its tokenizer, loadable with
    ``from_pretrained``. Raises :class:`ModelLoadError` (not a GGUF file, truncated, an architecture transformers
    cannot read, the ``gguf`` package missing, cache not writable) or :class:`UnsupportedModelError` (an
    architecture this library does not support; refused before the slow conversion).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    root = Path(cache_root or default_cache_root()) / "gguf"
    _check_magic(path)
    try:
        sha = file_sha256(path, cache_root=root.parent)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    dest = root / sha[:16]
    if (dest / "config.json").is_file():
        log.info("loading %s from the GGUF cache %s", path, dest)
        return dest
    _check_complete(path)
    log.info(
        "converting %s to a float32 Hugging Face folder (once, about a minute per 250 MB); caching it in %s", path, dest
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:16]}-", dir=root))
    except OSError as e:
        raise ModelLoadError(f"cannot write the GGUF cache {root}: {e}") from e
    try:
        _convert(path, tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps({"file": path.name, "sha256": sha}, indent=1) + "\n")
        try:
            os.rename(tmp, dest)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (dest / "config.json").is_file():  # not another process that finished first
                raise
            shutil.rmtree(tmp)
    except BaseException as e:  # also Ctrl-C: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ModelLoadError(f"cannot write the converted model to {dest}: {e}") from e
        raise
    return dest


def _check_magic(path: Path) -> None:
    """Refuse a file that does not start like a GGUF file of a version we read (reads 8 bytes)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading .gguf files needs the gguf package: pip install gguf")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else None
    if version not in (2, 3):
        raise ModelLoadError(f"{path} is a GGUF file of version {version}; only versions 2 and 3 can be read")


def _check_complete(path: Path) -> None:
    """Refuse, in one line and in about a second, a GGUF file whose header is damaged or whose data is cut short.

    Walks the header (metadata and tensor table) without reading any tensor data, and checks that the file is
    long enough to hold every tensor the table lists: a truncated download fails here, with a clear message,
    instead of as a reshape error deep inside a minute-long conversion.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            needed, size = _needed_bytes(buf), len(buf)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    except struct.error as e:
        raise ModelLoadError(f"{path} is not a valid GGUF file: its header ends early or is damaged") from e
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{path} is not a valid GGUF file: {first_line(e)}") from e
    if size < needed:
        raise ModelLoadError(f"{path} is truncated: its tensors need {needed:,} bytes, the file has {size:,}")


# struct formats of GGUF's fixed-size metadata value types (8 is a string, 9 an array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _needed_bytes(buf) -> int:
    """How long a GGUF file must be to hold every tensor its header lists (header, padding, tensor data).

    Layout (GGUF v2/v3): magic, u32 version, u64 tensor count, u64 metadata count, the metadata key/values, the
    tensor table (name, u32 rank, u64 dims, u32 ggml type, u64 offset into the data), then the data section at
    the next multiple of ``general.alignment`` (default 32).
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos, alignment = 24, 32
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<" + _SCALAR[value_type], buf, pos + 4)
        pos = _skip_value(buf, pos + 4, value_type)
    data_end = 0
    for _ in range(n_tensors):
        _, pos = _read_string(buf, pos)
        (rank,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{rank}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * rank)
        pos += 4 + 8 * rank + 12
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        data_end = max(data_end, offset + math.prod(dims) // block * block_bytes)
    return -(-pos // alignment) * alignment + data_end


def _read_string(buf, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + length > len(buf):
        raise struct.error("string runs past the end of the file")
    return bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8", errors="replace"), pos + 8 + length


def _skip_value(buf, pos: int, value_type: int) -> int:
    if value_type == 8:
        return _read_string(buf, pos)[1]
    if value_type == 9:
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _SCALAR:
            return pos + count * struct.calcsize("<" + _SCALAR[item_type])
        for _ in range(count):  # strings or nested arrays: variable length, so walk them
            pos = _skip_value(buf, pos, item_type)
        return pos
    if value_type not in _SCALAR:
        raise ValueError(f"unknown metadata value type {value_type}")
    return pos + struct.calcsize("<" + _SCALAR[value_type])


def _convert(path: Path, out: Path) -> None:
    """Dequantize the GGUF file ``path`` into float32 and save model + tokenizer into the empty folder ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from ..arch import check_supported
    from .loading import check_loading_info

    # trust_remote_code=False: never run code from next to the file, and never ask [y/N] on stdin
    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(**where)
    except Exception as e:
        raise ModelLoadError(f"cannot read the model description in {path}: {first_line(e)}") from e
    try:
        check_supported(config)  # before the slow part
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"cannot load {path}: {e}") from e
    try:
        # dequantize=True: plain nn.Linear weights even where transformers could keep GGUF blocks; float32 because
        # the dequantized values (block scale x small integer) are in general not representable in bf16/fp16.
        model, info = AutoModelForCausalLM.from_pretrained(
            **where,
            config=config,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except SurgeryError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot convert {path}: {first_line(e)}") from e
    # A tensor the file lacks would be cached as random values and then load as if it were real: refuse it here.
    check_loading_info(info, f"cannot convert {path}")
    _drop_quantization_marks(model)
    wrong = {p.dtype for p in model.parameters()} - {torch.float32}
    if wrong:  # the cache promises float32; a loader change must not slip through silently
        raise ModelLoadError(f"converting {path} gave {sorted(map(str, wrong))} weights, not float32")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantization_marks(model) -> None:
    """Forget that the weights came from a quantized file, so ``save_pretrained`` writes a plain model.

    With ``dequantize=True`` every weight is already a dense tensor; the marks left behind would make
    ``save_pretrained`` refuse ("quantized with gguf and is not serializable") or write a
    ``quantization_config`` that sends the next load back to the GGUF loader.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

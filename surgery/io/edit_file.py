"""The shipped edit (:class:`Edit`): the new values of the trained slices of one block (or of several, for
MEMIT and AlphaEdit), and views that apply it.

The base model is never modified. :func:`edited_model` builds a *view*: new container objects along the path to the
blocks (``model -> transformer -> h`` for GPT-2, ``model -> model -> layers`` for the others), every untouched
module and parameter shared with the base (same tensors, no copy), and a new object for each edited block that
shares every tensor of it but the edited ones, which it copies and carries the new values in. Several sessions can
each hold their own view of one shared base at once, without locks.

On disk an edit is a safetensors file holding only the trained slices (for ``wv``: just the value projection's
weight; GPT-2: the ``[d_model, d_model]`` V columns of ``c_attn.weight``) with JSON metadata: base model, revision,
site, layer, slice bounds, the base's shape-defining config, and a SHA-256 of the base block, so an edit is refused
on any other base. A multi-block edit adds ``layers`` (the blocks, ``layer`` the last of them) and
``base_blocks_sha256`` (one digest per block); a single-block edit is written exactly as before. (The file is
``patch.safetensors`` and its format tag ``transformer-surgery-patch/1``: names from before the class was called
``Edit``, kept so that files already written and pushed still load.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..arch import ParamSlice, layout_of, remember_layout
from ..core.errors import EditError

FORMAT = "transformer-surgery-patch/1"  # the on-disk tag, unchanged since the first edit files
JSON_METADATA = ("base_config", "base_blocks_sha256")  # metadata entries stored as JSON text; the others: strings


@dataclass
class Edit:
    """New values of the trained slices of block ``layer``; ``values[name]`` has the slice's shape.

    A multi-block edit (MEMIT, AlphaEdit) names its blocks in ``layers`` (ascending, ``layer`` the last of them,
    the block whose digest is ``base_block_sha256``); its metadata's ``base_blocks_sha256`` maps each block (as a
    string) to its digest. ``layers`` defaults to ``(layer,)``."""

    site: str
    layer: int
    slices: tuple[ParamSlice, ...]
    values: dict[str, Tensor]
    metadata: dict = field(default_factory=dict)  # base_model, revision, base_config, base_block_sha256, ...
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers) or (self.layer,)

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the slices and the metadata (all JSON strings, as safetensors requires) to ``path``."""
        meta = {
            "format": FORMAT,
            "site": self.site,
            "layer": str(self.layer),
            "slices": json.dumps([s.to_dict() for s in self.slices]),
        }
        if self.layers != (self.layer,):  # a single-block file stays byte-for-byte what it always was
            meta["layers"] = json.dumps(list(self.layers))
        for key, value in self.metadata.items():
            if value is not None:
                meta[key] = json.dumps(value) if key in JSON_METADATA else str(value)
        tensors = {name: v.detach().to("cpu").contiguous() for name, v in self.values.items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """Read an edit file; raises :class:`EditError` if it is missing or not a surgery edit file."""
        path = Path(path)
        if not path.is_file():
            raise EditError(f"patch file {path} does not exist")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            values = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise EditError(f"{path} is not a readable safetensors file: {e}") from None
        if meta.get("format") != FORMAT:
            raise EditError(f"{path} is not a surgery patch (no '{FORMAT}' metadata)")
        try:
            slices = tuple(ParamSlice.from_dict(d) for d in json.loads(meta.pop("slices")))
            site, layer = meta.pop("site"), int(meta.pop("layer"))
            layers = _read_layers(meta.pop("layers", None), layer)
        except (KeyError, ValueError, TypeError) as e:
            raise EditError(f"{path} has broken patch metadata ({e})") from None
        meta.pop("format")
        if {s.name for s in slices} != set(values):
            raise EditError(f"{path}: its tensors do not match its slice list")
        for name, value in values.items():
            if not value.is_floating_point():
                raise EditError(f"{path}: tensor {name} holds {value.dtype} values, not weights")
            if not bool(torch.isfinite(value).all()):
                raise EditError(f"{path}: tensor {name} holds NaN or inf values")
        try:
            meta.update({k: json.loads(meta[k]) for k in JSON_METADATA if k in meta})
        except json.JSONDecodeError as e:
            raise EditError(f"{path} has broken patch metadata ({e})") from None
        return cls(site, layer, slices, values, meta, layers)

    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`EditError` unless ``model`` is the base this edit was made from (config, shapes and
        the SHA-256 of each edited block's weights), and every slice lies in one of the edit's blocks."""
        config = base_config(model)
        expected = self.metadata.get("base_config")
        if expected is not None:
            diff = [
                f"{k} {expected.get(k)} (patch) vs {config.get(k)} (model)"
                for k in sorted(set(expected) | set(config))
                if expected.get(k) != config.get(k)
            ]
            if diff:
                raise EditError(f"this patch was made for another model architecture: {'; '.join(diff)}")
        layout = layout_of(model)
        for layer in self.layers:
            if not 0 <= layer < layout.n_layer:
                raise EditError(f"this patch edits block {layer}; the model has blocks 0..{layout.n_layer - 1}")
        if self.layer not in self.layers:
            raise EditError(
                f"this patch's block {self.layer} is not among its blocks {list(self.layers)}: "
                "the file is damaged or was crafted"
            )
        params = dict(model.named_parameters())
        for s in self.slices:
            # edited_model writes each slice into its copy of its block by the name's tail: a slice of a block the
            # edit does not name would silently land in another one
            if _layer_of(layout, self.layers, s) is None:
                blocks = ", ".join(f"{layer} ({layout.adapter.block(layer)})" for layer in self.layers)
                raise EditError(
                    f"this patch says it edits block{'s' if len(self.layers) > 1 else ''} {blocks}, but it holds "
                    f"{s.name}, which is not in that block: the file is damaged or was crafted"
                )
            if s.name not in params:
                raise EditError(f"this patch edits {s.name}, which the model does not have")
            want = tuple(s.read(params[s.name]).shape)
            if tuple(self.values[s.name].shape) != want:
                raise EditError(
                    f"{s.name}: the patch holds shape {tuple(self.values[s.name].shape)}, the model's slice is {want}"
                )
        digests = {self.layer: self.metadata.get("base_block_sha256")}
        if len(self.layers) > 1:
            by_block = self.metadata.get("base_blocks_sha256")
            if not isinstance(by_block, dict) or set(by_block) != {str(layer) for layer in self.layers}:
                raise EditError(
                    f"this patch edits blocks {list(self.layers)} but does not carry one base digest for each: "
                    "the file is damaged or was crafted"
                )
            digests.update({int(k): v for k, v in by_block.items()})
        for layer, digest in sorted(digests.items()):
            if digest is not None and digest != block_digest(model, layer):
                raise EditError(
                    f"this patch was made for another base model: block {layer}'s weights differ "
                    f"(patch base: {self.metadata.get('base_model', 'unknown')})"
                )


def _read_layers(text: str | None, layer: int) -> tuple[int, ...]:
    """The ``layers`` entry of a file's metadata (absent: ``(layer,)``); raises ``ValueError`` unless it is a
    list of distinct block indices in ascending order that ends with ``layer``."""
    if text is None:
        return (layer,)
    layers = json.loads(text)
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
        or layers != sorted(set(layers))
        or layers[-1] != layer
    ):
        raise ValueError(f"layers {text} is not a list of ascending blocks ending with block {layer}")
    return tuple(layers)


def _layer_of(layout, layers: tuple[int, ...], s: ParamSlice) -> int | None:
    """The block among ``layers`` that holds slice ``s`` (by its name), or None."""
    for layer in layers:
        if s.name.startswith(layout.adapter.block(layer) + "."):
            return layer
    return None


def block_digests(model: nn.Module, layers: tuple[int, ...] | list[int]) -> dict:
    """The metadata that ties an edit of ``layers`` to its base: ``base_block_sha256`` of the last block and, for
    several blocks, ``base_blocks_sha256`` (block index as a string -> digest)."""
    digests = {layer: block_digest(model, layer) for layer in layers}  # each block hashed once
    meta = {"base_block_sha256": digests[layers[-1]]}
    if len(layers) > 1:
        meta["base_blocks_sha256"] = {str(layer): digest for layer, digest in digests.items()}
    return meta


def base_config(model: nn.Module) -> dict:
    """The config entries that fix every tensor shape (which ones: the family's adapter)."""
    return layout_of(model).shape_config(model.config)


def block_digest(model: nn.Module, layer: int) -> str:
    """SHA-256 over block ``layer``'s parameters (names, shapes and bytes, in a fixed order)."""
    h = hashlib.sha256()
    block = model.get_submodule(layout_of(model).adapter.block(layer))
    for name, p in sorted(block.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


HOOK_REGISTRIES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _copy_registries(module: nn.Module) -> None:
    """Give ``module`` (a fresh copy) its own registry dicts, so that adding a hook or swapping a child on it never
    touches the original, and drop the request-scoped hooks of :func:`surgery.core.hooks.hooked` (another thread's
    diagnosis must not follow into the copy). Other hooks — transformers' output recorders — are kept."""
    for key, value in list(vars(module).items()):
        if not isinstance(value, dict):
            continue
        if key in HOOK_REGISTRIES:
            value = type(value)((k, h) for k, h in value.items() if not getattr(h, "thread_scoped", False))
        module.__dict__[key] = copy.copy(value)


def _install_output_recorders(model: nn.Module) -> None:
    """transformers 5 records ``output_hidden_states``/``output_attentions`` with forward hooks that it installs
    once per model, on first use. Install them on the base now, so every copy carries exactly one set: otherwise a
    view would install a second set on the modules it shares with the base (hidden states recorded twice)."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers: outputs are returned, not recorded by hooks
        return
    maybe_install_capturing_hooks(model)


def copy_block(model: nn.Module, layer: int, only: set[str] | None = None) -> nn.Module:
    """A private copy of block ``layer`` (sharing the config object), without request-scoped hooks. ``only``: the
    full names of the parameters to copy; every other parameter and every buffer is then shared with ``model``
    (an edited view costs the edited tensors, not a whole block)."""
    path = layout_of(model).adapter.block(layer)
    if any(p.device.type == "meta" for p in model.get_submodule(path).parameters()):
        raise EditError(
            f"block {layer} ({path}) is offloaded (device_map put it on disk or offloaded it to the CPU): "
            "the block an edit changes must be held in memory; give it a device in device_map"
        )
    original = model.get_submodule(path)
    memo = {id(model.config): model.config}
    if only is not None:
        for name, p in original.named_parameters():
            if f"{path}.{name}" not in only:
                memo[id(p)] = p
        memo.update({id(b): b for b in original.buffers()})
    block = copy.deepcopy(original, memo=memo)
    for module in block.modules():
        _copy_registries(module)
    return block


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every submodule, parameter and buffer with ``module``."""
    new = copy.copy(module)
    _copy_registries(new)
    return new


def edited_model(model: nn.Module, edit: Edit) -> nn.Module:
    """A view of ``model`` with ``edit`` applied; ``model``'s weights are not modified (see the module
    docstring). transformers' inert output-recording hooks are installed on ``model`` first, as its first
    ``output_hidden_states=True`` call would, so that the view and the base each record their outputs once.

    Raises :class:`EditError` if the edit does not fit ``model``.
    """
    edit.check_compatible(model)
    _install_output_recorders(model)
    layout = layout_of(model)
    view = _shallow_copy(model)
    copied = {id(view)}  # the containers already copied into the view
    for layer in edit.layers:
        block_path = layout.adapter.block(layer)
        mine = [s for s in edit.slices if _layer_of(layout, edit.layers, s) == layer]
        new_block = copy_block(model, layer, only={s.name for s in mine})
        prefix = block_path + "."
        with torch.no_grad():
            for s in mine:
                param = new_block.get_parameter(s.name[len(prefix) :])
                s.read(param).copy_(edit.values[s.name].to(param.device, param.dtype))
        parent = view
        parts = block_path.split(".")
        for part in parts[:-1]:  # e.g. transformer, h (GPT-2) or model, layers
            child = parent._modules[part]
            if id(child) not in copied:
                child = _shallow_copy(child)
                parent._modules[part] = child
                copied.add(id(child))
            parent = child
        parent._modules[parts[-1]] = new_block
    remember_layout(view, layout)  # the base's modules, each edited block swapped for a copy of itself
    return view


@dataclass
class WeightStats:
    """How far an edit moved the weights, and what it provably did not touch."""

    params_in_site: int  # size of the trained slices
    params_changed: int  # elements whose value differs from the base
    delta_l2: float  # ||new - base||_2 over the trained slices
    max_abs_delta: float
    others_unchanged: bool  # every tensor outside the slices is bitwise equal to the base
    qk_unchanged: bool | None  # wv only: Q/K weights, biases and norms bitwise equal

    def to_dict(self) -> dict:
        return dict(vars(self))


def weight_stats(model: nn.Module, edit: Edit, edited: nn.Module | None = None) -> WeightStats:
    """Compare ``edited`` (default: ``edited_model(model, edit)``) with the base ``model``, bitwise."""
    edited = edited_model(model, edit) if edited is None else edited
    base_params = dict(model.named_parameters())
    new_params = dict(edited.named_parameters())
    trained = {s.name: s for s in edit.slices}
    changed, sq, max_abs = 0, 0.0, 0.0
    others_unchanged = True
    for name, base in base_params.items():
        new = new_params[name]
        s = trained.get(name)
        if s is None:
            # A view shares every untouched tensor with the base: the same object is bitwise equal (and an
            # offloaded one, on the meta device, could not be compared element by element).
            others_unchanged &= new is base or torch.equal(base, new)
            continue
        delta = s.read(new).double() - s.read(base).double()
        changed += int((s.read(new) != s.read(base)).sum())
        sq += float((delta**2).sum())
        max_abs = max(max_abs, float(delta.abs().max()) if delta.numel() else 0.0)
        if s.cols is not None:  # the columns outside the slice must be untouched too
            mask = torch.ones(base.shape[1], dtype=torch.bool, device=base.device)
            mask[s.cols] = False
            others_unchanged &= torch.equal(base[:, mask], new[:, mask])
    qk_unchanged = None
    if edit.site == "wv":  # everything that shapes the attention pattern: Q/K weights, biases and norms
        qk_unchanged = all(
            torch.equal(s.read(base_params[s.name]), s.read(new_params[s.name]))
            for s in layout_of(model).qk_slices(model, edit.layer)
        )
    return WeightStats(
        params_in_site=edit.numel,
        params_changed=changed,
        delta_l2=sq**0.5,
        max_abs_delta=max_abs,
        others_unchanged=bool(others_unchanged),
        qk_unchanged=qk_unchanged,
    )

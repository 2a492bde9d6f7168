"""Sibling projections fused into one matmul: q/k/v, gate/up.

At batch 1 every decode step is one matrix-vector product per projection. A small projection
(a 2,048 x 256 key or value projection at the 1.1 B Llama shape) is bound by the kernel's
launch and ramp, not by its bytes, so reading q, k and v as one 2,560-row matrix and gate and
up as one 11,264-row matrix can take less time than three and two separate reads. Some
transformers models ship that way (Phi-3's ``qkv_proj`` and ``gate_up_proj``); Llama, Mistral,
Qwen2 and most others keep the projections apart.

:func:`fuse_projections` rewrites a loaded model in place, without changing any model class's
``forward``: the sibling ``nn.Linear`` modules of a group are replaced by :class:`FusedPart`
views of one concatenated weight. The first part called with an input computes the whole
product and keeps it; a sibling called with *the same tensor object* takes its slice; a
sibling called with any other input (cross-attention's keys and values, a model that projects
a normed copy) computes its own slice of the weight. So every part returns exactly
``F.linear(x, its rows)`` whatever order or inputs the model uses; only how the product is
computed changes, so results differ from the unfused model by matmul rounding, as another
kernel's would. The kept product is dropped once each sibling has taken its slice.

Fused: groups whose modules are all plain ``nn.Linear`` with plain tensors (nothing on the meta
device or offloaded by accelerate's hooks), with the same input size, dtype, device and bias
presence; and groups that transformers quantized with torchao on loading (``TorchAoConfig``).
torchao's weights are tensor subclasses that do not concatenate (``aten.cat`` is not among their
ops in torchao 0.18), and quantizing a dequantized weight again does not give back the same
values, so a torchao group is rebuilt from the checkpoint: its parts' unquantized weights are
read from the model's safetensors into one weight and quantized with the config transformers
used (:func:`_torchao_group`). Weight-only configs scale each output row (int8, float8 per row)
or each group of one row's inputs (int4), so the fused weight's rows are the parts' rows; that
is checked, not assumed: the fused weight's slice of each part must hold the part's quantized
data bit for bit, or the group stays as loaded (a per-tensor scale, for one, would differ).
bitsandbytes' modules, checkpoints saved already quantized, and models whose checkpoint is not
a local safetensors folder stay as loaded. The rewritten model is for inference: its state dict
names the fused weights (``<parent>.fused_q_proj_k_proj_v_proj.weight``), so save the model
before fusing.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import NotApplicable

# Sibling projections that transformers' modules apply to one hidden state, by attribute
# name: Llama/Mistral/Qwen2/Qwen3/Gemma attention and MLP (modeling_llama.py LlamaAttention,
# LlamaMLP), BERT-style self-attention (modeling_bert.py BertSelfAttention: query, key, value).
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def may_fuse(model: Any) -> bool:
    """Whether a :class:`~autotune.model.ModelSpec`'s checkpoint may hold siblings to fuse: False
    only where its tensor names show none (no names read: maybe)."""
    return groups_in([t.name for t in model.tensors]) != 0


def groups_in(names: list[str] | tuple[str, ...]) -> int | None:
    """How many sibling groups a checkpoint's tensor names hold (``...q_proj.weight`` beside
    ``...k_proj.weight`` and ``...v_proj.weight`` under one parent); None when there are no names
    to read (no safetensors headers). Read from names alone: no torch, no weights."""
    return len(_complete_groups(names)) if names else None


def grouped_tensors(names: list[str] | tuple[str, ...]) -> set[str]:
    """The tensors (weights and biases) of a checkpoint that belong to a sibling group fusing
    would concatenate, by name, as :func:`groups_in` counts them."""
    have = set(names)
    return {f"{p}.{g}.{kind}" for p, group in _complete_groups(names) for g in group for kind in ("weight", "bias") if f"{p}.{g}.{kind}" in have}


def _complete_groups(names: list[str] | tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """(parent, group) for each sibling group whose every part's weight the names hold."""
    have = set(names)
    parents = {n.rsplit(".", 2)[0] for n in names if n.endswith(".weight") and n.count(".") >= 2}
    return [(p, group) for p in parents for group in GROUPS if all(f"{p}.{g}.weight" in have for g in group)]


class NothingToFuse(NotApplicable):
    """Fusing was asked for and no group of this model qualifies (the tuner's candidate is then
    not measured: it would be the unfused one under another name)."""


@functools.cache
def classes() -> tuple[type, type]:
    """(FusedLinear, FusedPart), built on first use (importing this module imports no torch)."""
    import torch

    nn, F = torch.nn, torch.nn.functional

    class FusedLinear(nn.Module):
        """The concatenated weight (and bias) of one group, and the product it computed last.
        ``weight``: the concatenated weight when it was built elsewhere (torchao's, quantized
        whole); by default the parts' weights are concatenated here."""

        def __init__(self, linears: list[Any], weight: Any = None) -> None:
            super().__init__()
            with torch.no_grad():
                if weight is None:
                    weight = torch.cat([m.weight for m in linears], 0)
                self.weight = nn.Parameter(weight, requires_grad=False)
                bias = [m.bias for m in linears]
                self.bias = nn.Parameter(torch.cat(bias, 0), requires_grad=False) if bias[0] is not None else None
            self.in_features = linears[0].in_features
            self.out_features = int(self.weight.shape[0])
            self.parts = len(linears)
            self._x: Any = None
            self._y: Any = None
            self._taken = 0

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts}, bias={self.bias is not None}"

    class FusedPart(nn.Module):
        """Rows ``[start, stop)`` of a :class:`FusedLinear`: ``F.linear(x, those rows)``."""

        def __init__(self, fused: Any, start: int, stop: int) -> None:
            super().__init__()
            object.__setattr__(self, "fused", fused)  # not a child: the parent module holds it once
            self.start, self.stop = start, stop
            self.in_features, self.out_features = fused.in_features, stop - start

        @property
        def weight(self) -> Any:  # code that reads a projection's weight (its dtype, its device) still can
            return self.fused.weight[self.start:self.stop]

        @property
        def bias(self) -> Any:
            b = self.fused.bias
            return None if b is None else b[self.start:self.stop]

        def forward(self, x: Any) -> Any:
            f = self.fused
            if f._x is not x:  # a new input: the whole product, for the siblings that get the same one
                f._x, f._y, f._taken = x, F.linear(x, f.weight, f.bias), 0
            y = f._y[..., self.start:self.stop]
            f._taken += 1
            if f._taken >= f.parts:  # every sibling has its slice: hold no activation past the layer
                f._x, f._y, f._taken = None, None, 0
            return y

        def extra_repr(self) -> str:
            return f"rows={self.start}:{self.stop} of {self.fused.out_features}"

    return FusedLinear, FusedPart


def _weights(m: Any) -> str | None:
    """What a projection holds, as fusing sees it: "plain" (an ``nn.Linear`` of plain tensors),
    "torchao" (an ``nn.Linear`` whose weight torchao's ``quantize_`` made one of its tensor
    subclasses, ``Int8Tensor``, ``Int4TilePackedTo4dTensor``, ...; the module stays, its bias stays
    a plain tensor), or None: another module, one offloaded by accelerate's hooks, or on the meta
    device."""
    import torch

    if type(m) is not torch.nn.Linear or hasattr(m, "_hf_hook"):
        return None
    tensors = [m.weight.detach()] + ([m.bias.detach()] if m.bias is not None else [])
    if any(t.device.type == "meta" for t in tensors) or any(type(t) is not torch.Tensor for t in tensors[1:]):
        return None
    if type(tensors[0]) is torch.Tensor:
        return "plain"
    return "torchao" if type(tensors[0]).__module__.startswith("torchao.") else None


def why_not(linears: list[Any]) -> str | None:
    """Why a group cannot be fused (None: it can, as plain weights or as torchao's)."""
    kinds = {_weights(m) for m in linears}
    if None in kinds or len(kinds) > 1:
        return "not plain nn.Linear weights (quantized other than by torchao, offloaded or on the meta device)"
    if len({type(m.weight.detach()) for m in linears}) > 1:
        return "torchao weights of different kinds"
    first = linears[0]
    if any(m.in_features != first.in_features for m in linears):
        return "different input sizes"
    if any(m.weight.dtype != first.weight.dtype or m.weight.device != first.weight.device for m in linears):
        return "different dtypes or devices"
    if any((m.bias is None) != (first.bias is None) for m in linears):
        return "some with a bias, some without"
    return None


def fuse_projections(model: Any, groups: tuple[tuple[str, ...], ...] = GROUPS) -> dict[str, Any]:
    """Fuse every sibling group of ``model`` that :func:`why_not` allows, in place.

    Returns ``{"fused": [module paths], "skipped": {path: reason}}``. A model with nothing to
    fuse is left as it was (``fused`` empty)."""
    import torch

    FusedLinear, FusedPart = classes()
    fused: list[str] = []
    skipped: dict[str, str] = {}
    source: _Source | None = None  # read once, at the first torchao group
    for path, parent in list(model.named_modules()):
        for names in groups:
            if not all(isinstance(getattr(parent, n, None), torch.nn.Module) for n in names):
                continue
            linears = [getattr(parent, n) for n in names]
            where = f"{path}.{'/'.join(names)}" if path else "/".join(names)
            reason = why_not(linears)
            weight = None
            if not reason and _weights(linears[0]) == "torchao":
                source = source or _Source(model)
                weight, reason = _torchao_group(linears, [f"{path}.{n}" if path else n for n in names], source)
            if reason:
                skipped[where] = reason
                continue
            whole = FusedLinear(linears, weight)
            parent.add_module("fused_" + "_".join(names), whole)
            start = 0
            for n, m in zip(names, linears):
                setattr(parent, n, FusedPart(whole, start, start + m.out_features))
                start += m.out_features
            fused.append(where)
    return {"fused": fused, "skipped": skipped}


class _Source:
    """Where a model that transformers quantized with torchao keeps what its fused weights are
    quantized from: the torchao config transformers applied (``TorchAoConfig``'s
    ``get_apply_tensor_subclass()``, what its loader hands ``quantize_``) and the checkpoint's
    unquantized tensors by name, each file opened once (memory-mapped, released with this
    object). ``why``: why there is none (None: there is)."""

    def __init__(self, model: Any) -> None:
        self.config: Any = None
        self.files: dict[str, Any] = {}  # tensor name -> its file's open safetensors handle
        self.prefix = str(getattr(model, "base_model_prefix", "") or "")
        self.why = self._read(model)

    def _read(self, model: Any) -> str | None:
        from pathlib import Path

        quantizer = getattr(model, "hf_quantizer", None)
        qc = getattr(quantizer, "quantization_config", None)
        if str(getattr(getattr(qc, "quant_method", None), "value", getattr(qc, "quant_method", None))) != "torchao":
            return "torchao weights that transformers did not quantize on loading (no TorchAoConfig to quantize the fused weight with)"
        if getattr(quantizer, "pre_quantized", False):
            return "the checkpoint holds torchao's quantized weights, not the unquantized ones to fuse and quantize"
        self.config = qc.get_apply_tensor_subclass()
        if type(self.config).__name__ == "FqnToConfig":
            return "a torchao config per module (FqnToConfig): which one a fused weight takes is not defined"
        folder = Path(str(getattr(model, "name_or_path", "") or ""))
        if not folder.is_dir():
            try:  # a hub id: its snapshot in the local cache, as from_pretrained read it
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(str(folder), local_files_only=True))
            except Exception:  # noqa: BLE001 - not a hub id, or not cached: say so below
                return f"no local checkpoint folder for {folder} to read the unquantized weights from"
        from safetensors import safe_open

        from .model import checkpoint_files

        config = getattr(model, "config", None)
        for f in checkpoint_files(folder, {"transformers_weights": getattr(config, "transformers_weights", None)}):
            h = safe_open(str(f), framework="pt")
            self.files.update((k, h) for k in h.keys())
        return None if self.files else f"no safetensors in {folder} to read the unquantized weights from"

    def tensor(self, name: str) -> Any:
        """The checkpoint's tensor for the model's parameter ``name`` (None: not there). A
        checkpoint of the base model names it without the prefix (``layers.0...``), one of a
        head model with it (``model.layers.0...``)."""
        p = self.prefix + "."
        for key in (name, name[len(p):] if self.prefix and name.startswith(p) else None, p + name if self.prefix else None):
            if key and key in self.files:
                return self.files[key].get_tensor(key)
        return None


def _same_quantized(a: Any, b: Any) -> bool:
    """Whether two torchao tensors hold the same quantized data: kind, shape and every inner
    tensor (``__tensor_flatten__``: qdata, scales, zeros) equal bit for bit."""
    import torch

    if type(a) is not type(b) or tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    names_a, names_b = a.__tensor_flatten__()[0], b.__tensor_flatten__()[0]
    if list(names_a) != list(names_b):
        return False
    for n in names_a:
        x, y = getattr(a, n), getattr(b, n)
        if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or not torch.equal(x, y))):
            return False
    return True


def _torchao_group(linears: list[Any], paths: list[str], source: _Source) -> tuple[Any, str | None]:
    """A torchao group's fused weight: the parts' unquantized weights read from the checkpoint into
    one weight of the parts' dtype on their device (the only unquantized copy held: 180 MB for a
    7 B Llama's gate/up in bf16) and quantized with the config transformers used. Returns (the
    quantized weight, None), or (None, why not) where the checkpoint lacks a part or the fused
    weight's rows are not the parts' quantized alone."""
    import torch

    if source.why:
        return None, source.why
    from torchao.quantization import quantize_

    first = linears[0]
    # one unquantized copy of the group on its device at a time, filled part by part from the checkpoint
    weight = torch.empty(sum(m.out_features for m in linears), first.in_features, dtype=first.weight.dtype, device=first.weight.device)
    start = 0
    for path, m in zip(paths, linears):
        t = source.tensor(path + ".weight")
        if t is None:
            return None, "a part's weight is not in the checkpoint under its name (its unquantized weights are needed)"
        if tuple(t.shape) != (m.out_features, m.in_features):
            return None, "a part's weight in the checkpoint is not the shape of the model's"
        weight[start:start + m.out_features].copy_(t)  # cast as transformers casts it: to the weight's dtype
        start += m.out_features
        del t
    whole = torch.nn.Linear(first.in_features, weight.shape[0], bias=False, device="meta")
    with torch.no_grad():
        whole.weight = torch.nn.Parameter(weight, requires_grad=False)
        del weight
        quantize_(whole, source.config)
        w = whole.weight.detach()
        start = 0
        for m in linears:
            stop = start + m.out_features
            try:
                piece = w[start:stop]
            except Exception as e:  # noqa: BLE001 - a torchao kind without aten.slice: the rows cannot be checked
                return None, f"torchao's {type(w).__name__} cannot be sliced to check its rows ({type(e).__name__})"
            if not _same_quantized(piece, m.weight.detach()):
                return None, (f"quantized as one, a part's rows are not what quantizing it alone gave "
                              f"({type(source.config).__name__}: a scale shared across rows?)")
            start = stop
    return w, None

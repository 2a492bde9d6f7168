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

Fused: groups whose modules are all plain ``nn.Linear`` with plain tensors (no bitsandbytes,
torchao or other quantized weights, nothing on the meta device or offloaded by accelerate's
hooks), with the same input size, dtype, device and bias presence. Everything else stays as
loaded. The rewritten model is for inference: its state dict names the fused weights
(``<parent>.fused_q_proj_k_proj_v_proj.weight``), so save the model before fusing.
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
    if not names:
        return None
    have = set(names)
    parents = {n.rsplit(".", 2)[0] for n in names if n.endswith(".weight") and n.count(".") >= 2}
    return sum(1 for p in parents for group in GROUPS if all(f"{p}.{g}.weight" in have for g in group))


class NothingToFuse(NotApplicable):
    """Fusing was asked for and no group of this model qualifies (the tuner's candidate is then
    not measured: it would be the unfused one under another name)."""


@functools.cache
def classes() -> tuple[type, type]:
    """(FusedLinear, FusedPart), built on first use (importing this module imports no torch)."""
    import torch

    nn, F = torch.nn, torch.nn.functional

    class FusedLinear(nn.Module):
        """The concatenated weight (and bias) of one group, and the product it computed last."""

        def __init__(self, linears: list[Any]) -> None:
            super().__init__()
            with torch.no_grad():
                self.weight = nn.Parameter(torch.cat([m.weight for m in linears], 0), requires_grad=False)
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


def _plain(m: Any) -> bool:
    import torch

    if type(m) is not torch.nn.Linear or hasattr(m, "_hf_hook"):
        return False
    tensors = [m.weight] + ([m.bias] if m.bias is not None else [])
    return all(type(t.detach()) is torch.Tensor and t.device.type != "meta" for t in tensors)


def why_not(linears: list[Any]) -> str | None:
    """Why a group cannot be fused (None: it can)."""
    if not all(_plain(m) for m in linears):
        return "not plain nn.Linear weights (quantized, offloaded or on the meta device)"
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
    for path, parent in list(model.named_modules()):
        for names in groups:
            if not all(isinstance(getattr(parent, n, None), torch.nn.Module) for n in names):
                continue
            linears = [getattr(parent, n) for n in names]
            where = f"{path}.{'/'.join(names)}" if path else "/".join(names)
            reason = why_not(linears)
            if reason:
                skipped[where] = reason
                continue
            whole = FusedLinear(linears)
            parent.add_module("fused_" + "_".join(names), whole)
            start = 0
            for n, m in zip(names, linears):
                setattr(parent, n, FusedPart(whole, start, start + m.out_features))
                start += m.out_features
            fused.append(where)
    return {"fused": fused, "skipped": skipped}

"""Grouped-query attention without the key/value copies: SDPA's own ``enable_gqa`` with a mask.

transformers 5.17's ``sdpa_attention_forward`` (``integrations/sdpa_attention.py``) gives
``torch.nn.functional.scaled_dot_product_attention`` ``enable_gqa=True`` only when no attention
mask is passed (``use_gqa_in_sdpa``: "otherwise it will fall back to the math kernel"); with a
mask it calls ``repeat_kv``, which materialises the keys and values of every KV head once per
query head. A static cache always passes a mask, so each decode step copies the whole cache at
every layer: on an H200 with torch 2.11, 2 x 32 x 639 x 128 values a layer at a 7 B shape with 8
KV heads (``docs/gpu/h200-s16-inductor-repeat-kv.txt``). cuDNN's SDPA kernel takes ``enable_gqa``
with a mask there, with the repeated path's result, and a 1.1 B Llama's fused decode loop ran
827.8 tok/s instead of 750.8 (``docs/PERFORMANCE.md``, session 16, measured by patching
``use_gqa_in_sdpa`` in the benchmark's process).

:func:`use` switches a loaded model to :data:`NAME`, an attention function registered with
transformers' ``AttentionInterface`` (and ``sdpa_mask`` for it with ``AttentionMaskInterface``):
where a mask is given and the heads are grouped, the same SDPA call as transformers' with
``enable_gqa=True`` instead of ``repeat_kv``; anything else (no mask, no grouping, a position
bias, head sizes SDPA's GQA path does not take) goes to transformers' own ``sdpa_attention_forward``.
Which SDPA backend runs it is torch's choice as always; the flash and memory-efficient kernels
do not take a mask with ``enable_gqa`` and the math kernel does, slowly (rule SDPA-GQA-BACKEND).

transformers 5.23 added a switch of its own, ``TRANSFORMERS_SDPA_FORCE_GQA=1`` (``enable_gqa`` on
every call of every model), and, for an uncompiled one-token step, ``pack_gqa``: the grouped query
heads as rows of their key/value head, no copies; a compiled step still copies (``q_length == 1 and
not is_torchdynamo_compiling()``). :func:`compiled_branches` makes an uncompiled step take the
compiled step's branch, for the tune's screen, which times uncompiled steps to rank compiled runs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .errors import NotApplicable

NAME = "autotune_sdpa_gqa"  # enable_gqa arrived in torch 2.5 (rule SDPA-GQA-TORCH)


class NotGrouped(NotApplicable):
    """The model has no grouped-query attention (or no SDPA attention) to change."""


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: Any = None, is_causal: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' ``sdpa_attention_forward`` with ``enable_gqa`` where it would ``repeat_kv``."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (attention_mask is None or not grouped or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
            or key.shape[-1] != value.shape[-1] or key.shape[-1] > 256):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    # with a mask transformers' is_causal is False (q_length > 1 and attention_mask is None and ...),
    # and its other branches (cropping an empty static cache, the position bias) need no mask
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=False, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :data:`NAME` with transformers (idempotent): the attention function, and SDPA's mask
    function for it (without one, transformers builds no mask for an unknown name)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def grouped_layers(model: Any) -> int:
    """How many attention modules of ``model`` group their query heads (``num_key_value_groups`` > 1)."""
    return sum(1 for m in model.modules() if getattr(m, "num_key_value_groups", 1) > 1)


def use(model: Any) -> int:
    """Switch ``model`` (loaded with ``attn_implementation="sdpa"``) to :data:`NAME`; returns the
    number of grouped attention modules. Raises :class:`NotGrouped` when it has none, or when its
    attention is not SDPA."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise NotGrouped(f"runtime.sdpa_gqa needs attn_implementation \"sdpa\"; this model runs {impl!r}")
    n = grouped_layers(model)
    if not n:
        raise NotGrouped(f"no grouped-query attention in {type(model).__name__} (as many key/value heads as query heads)")
    register()
    model.set_attn_implementation(NAME)
    return n


@contextlib.contextmanager
def compiled_branches() -> Iterator[None]:
    """While active, transformers' ``sdpa_attention_forward`` chooses as it does under
    ``torch.compile``: from 5.23 on it packs the grouped query heads of an uncompiled one-token step
    (no key/value copies) but copies them in a compiled one, so an uncompiled screen would rank
    transformers' attention as if compiling kept that saving. Only that module's
    ``is_torchdynamo_compiling`` is replaced (its one use there is that branch); a no-op where
    transformers has no such branch (5.22 and earlier)."""
    from transformers.integrations import sdpa_attention as m

    if not (hasattr(m, "pack_gqa") and hasattr(m, "is_torchdynamo_compiling")):
        yield
        return
    before = m.is_torchdynamo_compiling
    m.is_torchdynamo_compiling = lambda: True
    try:
        yield
    finally:
        m.is_torchdynamo_compiling = before

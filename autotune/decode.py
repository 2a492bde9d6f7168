"""A decode loop without a host sync per token, through transformers' ``custom_generate`` hook.

transformers 5.17's ``generate`` (``GenerationMixin._sample``) compiles only the model's
forward; logits processing, token selection, the ``input_ids`` concatenation and the stopping
criteria run eagerly, and ``StopCheck`` turns ``unfinished_sequences.max() == 0`` into a Python
bool after every token, so the host waits for the GPU each step (its ``DeferredStopCheck`` is
enabled on ``mps`` only: ``DeferredStopCheck.is_supported``, generation/utils.py).

:func:`generate` is a decoding method with ``_sample``'s signature. ``generate`` prepares
everything as usual (generation config, logits processors, stopping criteria, the static
cache, the prefill's inputs) and then calls it::

    from autotune import decode
    out = model.generate(ids, attention_mask=mask, cache_implementation="static",
                         do_sample=False, max_new_tokens=128, custom_generate=decode.generate)

After transformers' own prefill, each decode step is one function — the forward, the attention
mask built from the cache's device-side position, the logits processing (minimum length,
temperature, top-k, top-p), the token choice, the padding of finished rows and the EOS check —
compiled as one graph on CUDA (``torch.compile`` with the generation config's
``compile_config``). Where its mode asks for CUDA graphs (transformers' default
``reduce-overhead``), greedy decoding captures them itself: the step is compiled without them
and replayed from one ``torch.cuda.CUDAGraph`` (:class:`_Graphs`, kept across calls with a KV
cache of its own), so a token costs the host one graph launch, not dynamo's guards and
cudagraph trees' bookkeeping (with torchao's tensor-subclass weights those took 4 ms a token on
the H200); sampling keeps torch.compile's CUDA graphs. Between calls that set's KV cache and
graph memory stay allocated (a call of another shape frees them before its prefill;
:func:`release` frees them now). The host only queues steps; it looks
at whether every row has finished once every ``check_every`` tokens and trims the steps past
the end, so for greedy decoding the tokens are those ``_sample`` returns.
Sampling draws with the exponential-race trick (``argmax(p / q)``, ``q ~ Exp(1)``), which has
multinomial's distribution but not its random stream.

Prompt-lookup decoding (``prompt_lookup_num_tokens``), greedy and one row per call, runs in the
loop too (:func:`_lookup_step`): the n-gram lookup on the GPU, one forward verifying the
proposals, compiled once over fixed shapes and replayed from a CUDA graph of its own, on a static
cache (transformers runs it only as uncompiled assisted decoding on a dynamic cache). Its tokens
are greedy decoding's, and its proposals transformers' candidate generator's.

What it does not handle — a streamer, beam search, ``return_dict_in_generate``, synced GPUs, a
cache that is not a ``StaticCache``, a logits processor or stopping criterion other than those
above, prompt lookup with sampling or more than one row — goes to ``_sample`` unchanged (the
reason is logged once), and prompt-lookup decoding to ``_assisted_decoding``, so the hook never
changes what a call means.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("autotune.decode")

NAME = "sync-free"  # the config dict's runtime.decode_loop value
CHECK_EVERY = 32  # tokens between looks at whether every row has finished
# decode steps one CUDA graph of the loop's own replays (0: torch.compile's CUDA graphs). One: on
# the H200 a replay of 16 steps ran each step as fast as a replay of one (1.82 ms at 1.1 B, bf16),
# and its launch took the host 15 ms, which the GPU waited out after each EOS check
# (docs/PERFORMANCE.md, issue 12, the loop's own CUDA graphs)
GRAPH_STEPS = 1
_warned: set[str] = set()
# how often the loop ran and fell back to transformers' own, in this process (the worker reports it)
stats = {"runs": 0, "fallbacks": 0}
_compiled: dict[Any, Callable[..., Any]] = {}


def _plan(model: Any, logits_processor: Any, stopping_criteria: Any, generation_config: Any, synced_gpus: bool,
          streamer: Any, model_kwargs: dict[str, Any], batch: int = 1) -> tuple[dict[str, Any] | None, str | None]:
    """What the loop must do, read off transformers' own processors and criteria, or why it
    cannot (then ``_sample`` runs, or ``_assisted_decoding`` for prompt lookup)."""
    from transformers.generation import logits_process as lp
    from transformers.generation import stopping_criteria as sc

    if streamer is not None:
        return None, "a streamer needs each token on the host as it is made"
    if synced_gpus:
        return None, "synced GPUs (DeepSpeed ZeRO-3 / FSDP)"
    if generation_config.return_dict_in_generate:
        return None, "return_dict_in_generate"
    if getattr(generation_config, "is_assistant", False) or model.config.is_encoder_decoder:
        return None, "an assistant or encoder-decoder model"
    lookup = generation_config.prompt_lookup_num_tokens
    if lookup is not None and generation_config.do_sample:
        return None, "prompt-lookup decoding with sampling (transformers' assisted decoding runs it)"
    if lookup is not None and batch != 1:
        return None, "prompt-lookup decoding at batch size > 1 (transformers' assisted decoding takes one row)"
    if not hasattr(model, "_prefill") or not hasattr(model, "_update_model_kwargs_for_generation"):
        return None, "this transformers has no GenerationMixin._prefill"
    plan: dict[str, Any] = {"do_sample": bool(generation_config.do_sample), "min_length": 0, "eos_min": None,
                            "temperature": None, "top_k": None, "top_p": None, "min_tokens_to_keep": 1}
    for p in logits_processor:
        if isinstance(p, lp.MinNewTokensLengthLogitsProcessor):
            plan["min_length"] = max(plan["min_length"], p.prompt_length_to_skip + p.min_new_tokens)
            plan["eos_min"] = p.eos_token_id
        elif isinstance(p, lp.MinLengthLogitsProcessor):
            plan["min_length"] = max(plan["min_length"], p.min_length)
            plan["eos_min"] = p.eos_token_id
        elif isinstance(p, lp.TemperatureLogitsWarper):
            plan["temperature"] = float(p.temperature)
        elif isinstance(p, lp.TopKLogitsWarper):
            plan["top_k"] = int(p.top_k)
            plan["min_tokens_to_keep"] = max(plan["min_tokens_to_keep"], 1)
        elif isinstance(p, lp.TopPLogitsWarper):
            plan["top_p"] = float(p.top_p)
            plan["min_tokens_to_keep"] = max(plan["min_tokens_to_keep"], int(p.min_tokens_to_keep))
        else:
            return None, f"logits processor {type(p).__name__}"
    max_length = None
    eos = None
    for c in stopping_criteria:
        if isinstance(c, sc.MaxLengthCriteria):
            max_length = c.max_length if max_length is None else min(max_length, c.max_length)
        elif isinstance(c, sc.EosTokenCriteria):
            eos = c.eos_token_id
        else:
            return None, f"stopping criterion {type(c).__name__}"
    if max_length is None:
        return None, "no maximum length"
    plan["max_length"], plan["eos"] = max_length, eos
    # the cache's name: "past_key_values" in generate's kwargs, the model's forward and the mask
    # builder up to 5.23, "cache" from 5.24 (each release's own signatures say which)
    plan["cache_key"] = "cache" if "cache" in model_kwargs else "past_key_values"
    plan["forward_cache"] = _cache_param(model.forward)
    from transformers.masking_utils import create_masks_for_generate

    plan["mask_cache"] = _cache_param(getattr(model, "create_masks_for_generate", create_masks_for_generate))
    cache = model_kwargs.get(plan["cache_key"])
    from transformers.cache_utils import StaticCache

    if cache is not None and not isinstance(cache, StaticCache):
        return None, f"a {type(cache).__name__} (the loop needs a static cache: cache_implementation=\"static\")"
    if cache is not None and getattr(cache, "_is_user_defined", False):
        return None, "a cache passed by the caller (it is returned, and the loop runs past the end)"
    if cache is None:
        return None, "no cache (cache_implementation=\"static\" is needed)"
    if model_kwargs.get("inputs_embeds") is not None:
        return None, "inputs_embeds"
    plan["lookup"] = None
    if lookup is not None:
        # the verifying step writes lookup + 1 positions and rewinds the rejected ones: each layer
        # must be a plain StaticLayer that keeps its length as a tensor (transformers 5.17-5.24's
        # cache_utils.StaticLayer.cumulative_length), and the cache one that can be made longer
        import torch

        layers = getattr(cache, "layers", None) or []
        if not layers or getattr(cache, "offloading", False) or any(
                type(layer).__name__ != "StaticLayer" or not torch.is_tensor(getattr(layer, "cumulative_length", None)) for layer in layers):
            return None, ("prompt-lookup decoding on this cache (the loop needs full-attention StaticLayers that keep their length "
                          "as a tensor, transformers 5.17+, not offloaded)")
        plan["lookup"] = int(lookup)
        plan["ngram"] = int(getattr(generation_config, "max_matching_ngram_size", None) or 2)
    return plan, None


def _cache_param(fn: Any) -> str:
    """The name ``fn`` takes the KV cache by: ``cache`` (transformers 5.24+) or ``past_key_values``."""
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _choose(torch: Any, logits: Any, suppress: Any, plan: dict[str, Any]) -> Any:
    """The next token from float32 logits, as ``_sample``'s processors and choice would make it:
    EOS suppressed below the minimum length (``suppress``: a bool tensor, no recompile when it
    flips), then temperature, top-k and top-p, then argmax or a sample."""
    if plan["eos_min"] is not None:
        eos_cols = torch.isin(torch.arange(logits.shape[-1], device=logits.device), torch.as_tensor(plan["eos_min"], device=logits.device))
        logits = torch.where(suppress & eos_cols, torch.full_like(logits, float("-inf")), logits)
    if not plan["do_sample"]:
        return torch.argmax(logits, dim=-1)
    if plan["temperature"] is not None:
        logits = logits / plan["temperature"]
    if plan["top_k"] is not None:
        k = min(max(plan["top_k"], plan["min_tokens_to_keep"]), logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if plan["top_p"] is not None:
        # TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p
        srt, idx = torch.sort(logits, descending=False)
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - plan["top_p"])
        drop[..., -plan["min_tokens_to_keep"]:] = False
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1)


def _forward(torch: Any, model: Any, cache: Any, ids: Any, pos: Any, mask2d: Any, plan: dict[str, Any]) -> Any:
    """The model's logits for ``ids`` (batch x q, at positions ``pos``) after what the static
    ``cache`` holds: the 4D mask built as generate builds it, from the 2D mask over the whole cache
    and the cache's own position."""
    from transformers.masking_utils import create_masks_for_generate

    make_mask = getattr(model, "create_masks_for_generate", create_masks_for_generate)
    mask = make_mask(config=model.config, inputs_embeds=torch.empty((*ids.shape, 0), dtype=model.dtype, device=ids.device),
                     attention_mask=mask2d, position_ids=pos, is_first_iteration=False, **{plan["mask_cache"]: cache})
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, return_dict=True, **{plan["forward_cache"]: cache})
    return out.logits


def _step(model: Any, cache: Any, tok: Any, pos: Any, mask2d: Any, unfinished: Any, suppress: Any, pad: Any,
          eos: Any, plan: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """One decode step: forward of the last token, choice, padding of finished rows, EOS check.
    Returns the next token, position and unfinished rows, and the step's raw float32 logits (a
    graph output costs nothing more: they are computed in float32 for the choice anyway)."""
    import torch

    logits = _forward(torch, model, cache, tok[:, None], pos, mask2d, plan)[:, -1].to(dtype=torch.float32)
    nxt = _choose(torch, logits, suppress, plan)
    if eos is not None:
        nxt = torch.where(unfinished, nxt, pad)
        unfinished = unfinished & ~torch.isin(nxt, eos)
    return nxt, pos + 1, unfinished, logits


# transformers' CompileConfig defaults (generation/configuration_utils.py, 5.17.0)
COMPILE_CONFIG_DEFAULTS = {"fullgraph": False, "dynamic": False, "backend": "inductor", "mode": "reduce-overhead", "options": None}


def compile_kwargs(compile_config: dict[str, Any] | None, *, greedy: bool, graph_steps: int) -> tuple[dict[str, Any], bool]:
    """torch.compile's keywords for the step from a CompileConfig's fields (a dict, missing ones at
    their defaults), and whether the loop captures the CUDA graphs itself: where the mode or the
    inductor options ask for CUDA graphs, ``graph_steps`` > 0 and decoding is greedy, the step is
    compiled without them (see :func:`_step_fn`). No torch needed: the search asks it of configs."""
    opts = {k: v for k, v in {**COMPILE_CONFIG_DEFAULTS, **(compile_config or {})}.items() if k in COMPILE_CONFIG_DEFAULTS}
    if opts.get("options"):
        opts.pop("mode", None)  # torch.compile takes one of mode / options
    if opts.get("dynamic") is None:
        opts["dynamic"] = False
    own = False
    if graph_steps > 0 and greedy and opts.get("backend", "inductor") == "inductor":
        if opts.get("options"):
            if opts["options"].get("triton.cudagraphs"):
                opts["options"] = {**opts["options"], "triton.cudagraphs": False}
                own = True
        elif opts.get("mode") in ("reduce-overhead", "max-autotune"):
            opts["mode"] = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}[opts["mode"]]
            own = True
    return opts, own


def _step_fn(model: Any, plan: dict[str, Any], generation_config: Any, device: Any,
             graph_steps: int = 0, fn: Callable[..., Any] | None = None) -> tuple[Callable[..., Any], bool]:
    """The step, compiled as one graph on CUDA with the generation config's CompileConfig
    (transformers' own defaults: mode reduce-overhead, dynamic False); eager elsewhere. And
    whether the loop captures the CUDA graphs itself: where the mode asks for CUDA graphs
    (reduce-overhead, max-autotune) and ``graph_steps`` > 0 for greedy decoding, the step is
    compiled without them (default / max-autotune-no-cudagraphs) and :func:`generate` captures
    ``graph_steps`` steps in one ``torch.cuda.CUDAGraph``: torch.compile's CUDA graphs replay one
    step per Python call, each call paying dynamo's guards and cudagraph trees' bookkeeping on the
    host."""
    fn = fn or _step
    if device.type != "cuda" or generation_config.disable_compile:
        return fn, False
    import torch

    cc = generation_config.compile_config
    opts, own = compile_kwargs(cc.to_dict() if cc is not None else None, greedy=not plan["do_sample"], graph_steps=graph_steps)
    key = (id(model), fn.__name__, tuple(sorted((k, str(v)) for k, v in opts.items())), _plan_key(plan))
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = _compiled[key] = torch.compile(fn, **opts)
    return compiled, own


class _Graphs:
    """CUDA graphs of the compiled step, kept across generate calls: one of ``k`` steps and one of
    a single step (for the rest), over state tensors of their own (token, position, unfinished
    rows, length, the 2D mask) that each call loads, and over a KV cache of their own: the static
    cache of the call that captured them, which later calls of the same shape decode in (reset,
    before their prefill: :meth:`adopt`) instead of the new StaticCache transformers 5.17 makes for
    each call, whose memory can land elsewhere. A graph reads memory by address, so a set is also
    dropped when the model's parameters moved. One set is kept at a time (``_graph_sets``): each
    holds a KV cache and a graph memory pool."""

    def __init__(self, torch: Any, step: Callable[..., Any], model: Any, cache: Any, plan: dict[str, Any],
                 tok: Any, pos: Any, unfinished: Any, full: Any, pad: Any, eos: Any, k: int) -> None:
        dev = tok.device
        self.where = _addresses(model)
        self.cache = cache
        self.tok, self.pos, self.unfinished = tok.clone(), pos.clone(), unfinished.clone()
        self.length = torch.zeros((), dtype=torch.long, device=dev)
        self.full = full.clone()
        # the first call's pad, EOS and plan tensors themselves, kept (later calls load their values
        # into them): the compiled step's guards include their aliasing (the plan's EOS ids are the
        # eos argument), which copies would break, and a recompile during a capture ruins it
        self.pad, self.eos, self.plan = pad, eos, plan
        self.min_length = torch.tensor(plan["min_length"], dtype=torch.long, device=dev)
        self.blocks, self.replays = {}, {}
        for n in sorted({k, 1}, reverse=True):
            block = self.blocks[n] = torch.empty((tok.shape[0], n), dtype=tok.dtype, device=dev)

            def steps(n: int = n, block: Any = block) -> None:
                t, p, u, ln = self.tok, self.pos, self.unfinished, self.length
                for j in range(n):
                    t, p, u, _ = step(model, self.cache, t, p, self.full, u, ln < self.min_length, self.pad, self.eos, self.plan)
                    block[:, j] = t
                    ln = ln + 1
                for dst, src in ((self.tok, t), (self.pos, p), (self.unfinished, u), (self.length, ln)):
                    dst.copy_(src)

            self.replays[n] = self._capture(torch, steps)

    @staticmethod
    def _capture(torch: Any, fn: Callable[[], None]) -> Callable[[], None]:
        """``fn``'s kernels captured in a CUDA graph; the graph's replay (the CPU tests replace this
        with ``fn`` itself: there is no CUDA graph to capture there)."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    def adopt(self, model: Any, cache: Any) -> bool:
        """Whether this call (its fresh, still empty ``cache``) can decode in the set's cache: the
        parameters where they were, a cache of the same kind and layer shapes. Then the set's
        cache is reset for it."""
        mine, theirs = getattr(self.cache, "layers", None), getattr(cache, "layers", None)
        if type(cache) is not type(self.cache) or not mine or not theirs or len(mine) != len(theirs):
            return False
        if any(type(a) is not type(b) or getattr(a, "max_cache_len", None) != getattr(b, "max_cache_len", None) for a, b in zip(mine, theirs)):
            return False
        if any(getattr(b, "is_initialized", False) for b in theirs) or _addresses(model) != self.where:
            return False
        self.cache.reset()
        return True

    def load(self, torch: Any, tok: Any, pos: Any, unfinished: Any, length: int, full: Any, pad: Any, eos: Any,
             plan: dict[str, Any]) -> None:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.unfinished.copy_(unfinished)
        self.length.fill_(length)
        self.full.copy_(full)
        _load_values(torch, ((self.pad, pad), (self.eos, eos)), self.plan, plan)

    def run(self, n: int) -> Any:
        """Replay ``n`` steps (``k`` or 1); their tokens (a fresh tensor, batch x n)."""
        self.replays[n]()
        return self.blocks[n].clone()


def _load_values(torch: Any, pairs: Any, mine_plan: dict[str, Any], plan: dict[str, Any]) -> None:
    """A new call's values copied into a captured set's own tensors (a graph reads them by
    address), and the tensors of its plan into the set's plan's."""
    for mine, theirs in (*pairs, *((mine_plan[k], v) for k, v in plan.items() if torch.is_tensor(v))):
        if mine is not None and mine is not theirs:
            mine.copy_(theirs)


_graph_sets: dict[Any, _Graphs] = {}


def release() -> None:
    """Free the loop's captured CUDA graphs and the KV cache they decode in (the next greedy call
    on CUDA captures again)."""
    _graph_sets.clear()


def _addresses(model: Any) -> tuple[Any, ...]:
    """Where the parameters and buffers a captured step reads sit: each one's data pointer (a
    tensor subclass without one, such as torchao's: its identity)."""
    def ptr(t: Any) -> Any:
        try:
            return t.data_ptr()
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            return ("id", id(t))

    return tuple(ptr(t) for t in (*model.parameters(), *model.buffers()))


def _desc(v: Any) -> Any:
    """A plan value as a key: a tensor by its shape and dtype (its values are loaded per call)."""
    return ("tensor", tuple(v.shape), str(v.dtype)) if hasattr(v, "shape") and hasattr(v, "dtype") else str(v)


def _cache_len(cache: Any) -> Any:
    layers = getattr(cache, "layers", None) or []
    return tuple(getattr(layer, "max_cache_len", None) for layer in layers)


def _plan_key(plan: dict[str, Any]) -> tuple[Any, ...]:
    """A plan as a key: what the step reads of it (its EOS ids come as the step's argument), tensors
    by shape and dtype (str() of a CUDA tensor would wait for the GPU)."""
    return tuple(sorted((a, _desc(v)) for a, v in plan.items() if a != "eos"))


def _graph_key(model: Any, plan: dict[str, Any], b: int, cache: Any, pad: Any, eos: Any, k: int, step: Any) -> Any:
    return (id(model), id(step), b, _cache_len(cache), k, None if pad is None else _desc(pad), None if eos is None else _desc(eos),
            _plan_key(plan))


def _column(torch: Any, tokens: Any, i: int) -> Any:
    """Column ``i`` as a fresh contiguous tensor, laid out like the token the step itself returns
    (a strided view would be a new input layout to the compiled step: a recompile)."""
    return tokens[:, i].clone(memory_format=torch.contiguous_format)


def _masked(torch: Any, logits: Any, length: int, plan: dict[str, Any]) -> Any:
    """Raw logits as ``_sample``'s processors hand them on (a copy on the host): EOS at -inf
    while ``length`` (tokens so far) is below the minimum length."""
    out = logits.detach().float().cpu()
    if plan["eos_min"] is not None and length < plan["min_length"]:
        cols = torch.as_tensor(plan["eos_min"]).reshape(-1)
        out[:, cols[cols < out.shape[-1]]] = float("-inf")
    return out


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("autotune's sync-free decode loop not used (%s): transformers' own loop runs", reason)


def _max_len(cache: Any) -> int:
    return cache.get_max_length() if hasattr(cache, "get_max_length") else cache.max_cache_len


def _prefill(torch: Any, model: Any, input_ids: Any, generation_config: Any, model_kwargs: dict[str, Any], plan: dict[str, Any],
             eos: Any) -> tuple[dict[str, Any], Any, Any, Any]:
    """The prefill, exactly as ``_sample`` runs it (uncompiled; it fills the static cache), and
    the first token: the updated model kwargs, its float32 logits, the token, the unfinished rows."""
    device = input_ids.device
    b, start = input_ids.shape
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
    del outputs
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    tok = _choose(torch, logits, torch.tensor(start < plan["min_length"], device=device), plan)
    if eos is not None:
        unfinished = unfinished & ~torch.isin(tok, eos)
    return model_kwargs, logits, tok, unfinished


def _decode_inputs(torch: Any, model_kwargs: dict[str, Any], cache: Any, b: int, start: int, device: Any) -> tuple[Any, Any]:
    """What each decode step takes besides the tokens: the 2D mask over the whole static cache
    (the prompt's, then ones: the causal part of the mask, from the cache's own position, hides
    what is not written yet) and the last token's position id."""
    mask2d = model_kwargs.get("attention_mask")
    max_len = _max_len(cache)
    full = torch.ones(b, max_len, dtype=torch.long, device=device)
    if mask2d is not None:  # (one new token: the cache holds the prompt only, the mask one more)
        n = min(mask2d.shape[1], max_len)
        full[:, :n] = mask2d[:, :n]
    pos = model_kwargs.get("position_ids")
    # contiguous, as the step's own ``pos + 1`` is: a slice's clone keeps the prompt's stride, a new
    # input layout that compiled the step a second time (dynamic=False guards on strides)
    pos = pos[:, -1:].clone(memory_format=torch.contiguous_format) if pos is not None else torch.full((b, 1), start, dtype=torch.long, device=device)
    return full, pos


def generate(model: Any, input_ids: Any, logits_processor: Any, stopping_criteria: Any, generation_config: Any,
             synced_gpus: bool = False, streamer: Any = None, first_token_hook: Callable[[], None] | None = None,
             check_every: int | None = None, forced_tokens: Any = None, logits_out: list[Any] | None = None,
             graph_steps: int | None = None, **model_kwargs: Any) -> Any:
    """``GenerationMixin._sample``'s contract without a host sync per token (see the module's
    docstring). ``first_token_hook`` is called once the first new token is queued (a benchmark
    synchronises there to take the time to first token); ``check_every``: tokens between looks
    at whether every row has finished (default :data:`CHECK_EVERY`); ``graph_steps``: decode steps
    one CUDA graph replays on CUDA for greedy decoding (default :data:`GRAPH_STEPS`; 0: the
    compile mode's own CUDA graphs, one replay a step).

    ``forced_tokens`` (batch x n) and ``logits_out`` (a list) make it a quality probe of the very
    graph that decodes: the prefill's and then each step's raw float32 logits (on the host, EOS
    masked below the minimum length as ``_sample``'s processors mask it) are appended to
    ``logits_out`` while the forced tokens, not the chosen ones, are fed back; it stops after
    ``n`` logits. The static cache keeps the call's length, so a compiled step does not compile
    again, as a ``logits_processor`` (which sends the call to ``_sample``) would make it."""
    import torch
    from transformers import GenerationMixin

    plan, why = _plan(model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs,
                      batch=int(input_ids.shape[0]))
    if plan is None:
        stats["fallbacks"] += 1
        stats["last_fallback"] = why
        _warn_once(why or "unsupported")
        # the decoding method generate would have chosen without the hook (a callable custom_generate
        # replaces it): assisted decoding for prompt lookup (it needs no assistant model), else _sample
        method = GenerationMixin._assisted_decoding if generation_config.prompt_lookup_num_tokens is not None else GenerationMixin._sample
        return method(model, input_ids, logits_processor, stopping_criteria, generation_config,
                      synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    stats["runs"] += 1
    device = input_ids.device
    b, start = input_ids.shape
    n_new = plan["max_length"] - start
    if n_new <= 0:
        return input_ids
    pad = generation_config._pad_token_tensor
    eos = plan["eos"]
    if eos is not None:
        eos = eos.to(device)
        pad = (pad if pad is not None else eos[:1]).to(device).reshape(())
    probe = forced_tokens is not None and logits_out is not None
    k = max(0, int(GRAPH_STEPS if graph_steps is None else graph_steps))
    every = max(1, int(check_every or CHECK_EVERY))
    if plan["lookup"] and not probe and n_new > 1:
        return _lookup_generate(torch, model, input_ids, generation_config, model_kwargs, plan, eos, k, every, first_token_hook)
    if plan["lookup"]:
        # a quality probe (forced tokens: nothing to look up) or a single new token: plain steps,
        # uncompiled (a compiled plain step would be a second graph, compiled for these few steps)
        step, own = _step, False
    else:
        step, own = _step_fn(model, plan, generation_config, device, k)
    graphs = key = None
    if own and not probe and n_new > 1:
        key = _graph_key(model, plan, b, model_kwargs[plan["cache_key"]], pad, eos, k, step)
        graphs = _graph_sets.get(key)
        if graphs is not None and graphs.adopt(model, model_kwargs[plan["cache_key"]]):
            model_kwargs[plan["cache_key"]] = graphs.cache  # this call decodes in the set's cache; its own stays empty
        else:
            graphs = None
            release()  # one set at a time: its KV cache and graph pool are freed before this prefill
    model_kwargs, logits, tok, unfinished = _prefill(torch, model, input_ids, generation_config, model_kwargs, plan, eos)
    cache = model_kwargs[plan["cache_key"]]
    if probe:
        n_new = min(n_new, int(forced_tokens.shape[1]))
        logits_out.append(_masked(torch, logits, start, plan))
        forced_tokens = forced_tokens.to(device=device, dtype=tok.dtype)
        tok = _column(torch, forced_tokens, 0)
    toks = [tok]
    if first_token_hook is not None:
        first_token_hook()
    full, pos = _decode_inputs(torch, model_kwargs, cache, b, start, device)
    cudagraphs = device.type == "cuda" and not own and step is not _step
    no = torch.tensor(False, device=device)
    yes = torch.tensor(True, device=device)
    first = 1
    if key is not None:
        if graphs is None:
            # the first step runs uncaptured: it compiles the step and warms its kernels (cuBLAS,
            # triton) before a capture; then the graphs are captured from the state it left
            length = start + 1
            tok, pos, unfinished, _ = step(model, cache, tok, pos, full, unfinished, yes if length < plan["min_length"] else no, pad, eos, plan)
            toks.append(tok)
            first = 2
            graphs = _graph_sets[key] = _Graphs(torch, step, model, cache, plan, tok, pos, unfinished, full, pad, eos, k)
        graphs.load(torch, tok, pos, unfinished, start + first, full, pad, eos, plan)
        done, since, left = False, 0, n_new - first
        while left > 0 and not done:
            n = k if left >= k else 1
            toks.append(graphs.run(n))
            left -= n
            since += n
            if eos is not None and since >= every:
                since = 0
                done = not bool(graphs.unfinished.any())
        first = n_new  # every step ran in the graphs
    for i in range(first, n_new):
        length = start + i  # tokens before this step's; the minimum length is known on the host
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        tok, pos, unfinished, step_logits = step(model, cache, tok, pos, full, unfinished, yes if length < plan["min_length"] else no, pad, eos, plan)
        if cudagraphs:  # a replay's outputs are overwritten by the next one
            tok, pos, unfinished = tok.clone(), pos.clone(), unfinished.clone()
        if probe:
            logits_out.append(_masked(torch, step_logits, length, plan))
            tok = _column(torch, forced_tokens, i)
            toks.append(tok)
            continue
        toks.append(tok)
        if eos is not None and i % every == 0 and not bool(unfinished.any()):
            break
    new = torch.cat([t.reshape(b, -1) for t in toks], dim=1)
    if eos is not None:
        # _sample stops after the step at which every row has finished: each row's first EOS
        hit = torch.isin(new, eos)
        ended = hit.any(dim=1)
        if bool(ended.all()):
            first = torch.where(hit, torch.arange(new.shape[1], device=device), new.shape[1]).min(dim=1).values
            new = new[:, : int(first.max()) + 1]
    return torch.cat([input_ids, new], dim=1)


# ---- prompt-lookup decoding inside the loop (generate.prompt_lookup_num_tokens, greedy, batch 1)

def _lookup_step(model: Any, cache: Any, seq: Any, length: Any, pos: Any, unfinished: Any, forwards: Any, full: Any,
                 eos: Any, plan: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """One step of prompt-lookup decoding as transformers 5.17's ``PromptLookupCandidateGenerator``
    and ``_assisted_decoding`` make it, for one row and greedy choice, in fixed shapes (so that it
    compiles once and replays from a CUDA graph): the earliest earlier occurrence of the last
    ``ngram`` tokens (then ``ngram - 1``, down to 1) proposes the ``lookup`` tokens that followed it
    (cut at the sequence's end and before an EOS; a match whose first proposal the minimum length
    forbids is skipped), one forward over the last token and the proposals verifies them, and the
    longest agreeing run plus the model's own next token are kept.

    ``seq`` (1 x size) holds the prompt and the tokens so far, ``length`` how many (its last is
    not in the KV cache yet), ``pos`` that token's position id. The forward always covers
    ``lookup + 1`` tokens (proposals that do not exist are filler, never kept); the cache's
    length is wound back over the rejected ones, whose keys and values stay behind the causal
    mask until they are overwritten. Returns the new seq, length, pos, unfinished flag and count
    of forwards that produced tokens."""
    import torch

    n, top = plan["lookup"], plan["ngram"]
    row = seq[0]
    size, dev = row.shape[0], row.device
    idx = torch.arange(size, device=dev)
    ahead = torch.arange(n, device=dev)
    eos_min = None if plan["eos_min"] is None else torch.as_tensor(plan["eos_min"], device=dev).reshape(-1)
    start = torch.full((), size, dtype=torch.long, device=dev)  # size: nothing found yet
    for g in range(top, 0, -1):
        match = idx + g < length  # the n-gram at i is not the last one, and a token follows it
        for j in range(g):
            match = match & (row.roll(-j) == row.gather(0, (length - g + j).clamp(min=0).reshape(1)))
        if eos_min is not None:  # the candidate generator's logits-processor check of the first proposal
            match = match & ~((length < plan["min_length"]) & torch.isin(row.roll(-g), eos_min))
        first = torch.where(match, idx, size).min()
        start = torch.where((start == size) & (first < size), first + g, start)
    cand = row.gather(0, (start + ahead).clamp(max=size - 1))
    valid = (start < size) & (length + 1 != plan["max_length"]) & (start + ahead < length)
    if eos is not None:  # proposals stop before an EOS
        valid = valid & (torch.cumsum(torch.isin(cand, eos).long(), 0) == 0)
    if eos_min is not None:  # and before one the minimum length forbids
        valid = valid & (torch.cumsum(((length + ahead < plan["min_length"]) & torch.isin(cand, eos_min)).long(), 0) == 0)
    last = row.gather(0, (length - 1).reshape(1))
    x = torch.cat([last, torch.where(valid, cand, last.expand(n))]).reshape(1, n + 1)
    logits = _forward(torch, model, cache, x, pos + torch.arange(n + 1, device=dev), full, plan)[0].to(dtype=torch.float32)
    if eos_min is not None:  # EOS suppressed where the minimum length is not reached
        cols = torch.isin(torch.arange(logits.shape[-1], device=dev), eos_min)
        short = (length + torch.arange(n + 1, device=dev)) < plan["min_length"]
        logits = torch.where(short[:, None] & cols[None, :], torch.full_like(logits, float("-inf")), logits)
    chosen = torch.argmax(logits, dim=-1)
    kept = torch.cumprod(((chosen[:n] == cand) & valid).long(), 0).sum() + 1
    kept = torch.where(unfinished[0], torch.minimum(kept, plan["max_length"] - length).clamp(min=0), 0)
    row = row.index_copy(0, (length + torch.arange(n + 1, device=dev)).clamp(max=size - 1), chosen)
    done = length + kept >= plan["max_length"]
    if eos is not None:  # only the last kept token can be an EOS: the ones before it were proposals
        done = done | ((kept > 0) & torch.isin(chosen.gather(0, (kept - 1).clamp(min=0).reshape(1)), eos)[0])
    for layer in cache.layers:  # the rejected positions are not part of the sequence
        layer.cumulative_length.sub_(n + 1 - kept)
    return row[None], length + kept, pos + kept, unfinished & ~done, forwards + (kept > 0).long()


class _LookupSet:
    """The state of prompt-lookup decoding (sequence, length, position, unfinished flag, forwards)
    and its step, captured in one CUDA graph where the loop captures its own (the step compiled
    once, replayed per step) and kept across calls with its KV cache, like :class:`_Graphs`."""

    def __init__(self, step: Callable[..., Any], model: Any, cache: Any, plan: dict[str, Any], seq: Any, length: Any,
                 pos: Any, unfinished: Any, full: Any, eos: Any) -> None:
        self.where = _addresses(model)
        self.cache, self.plan, self.eos = cache, plan, eos
        self.seq, self.length, self.pos, self.unfinished, self.full = seq.clone(), length.clone(), pos.clone(), unfinished.clone(), full.clone()
        self.forwards = length.new_zeros(())
        self.replay: Callable[[], None] | None = None

        def one() -> None:
            out = step(model, self.cache, self.seq, self.length, self.pos, self.unfinished, self.forwards, self.full, self.eos, self.plan)
            for dst, src in zip((self.seq, self.length, self.pos, self.unfinished, self.forwards), out):
                dst.copy_(src)

        self.one = one

    def load(self, torch: Any, seq: Any, length: Any, pos: Any, unfinished: Any, full: Any, eos: Any, plan: dict[str, Any]) -> None:
        pairs = ((self.seq, seq), (self.length, length), (self.pos, pos), (self.unfinished, unfinished), (self.full, full), (self.eos, eos))
        _load_values(torch, pairs, self.plan, plan)
        self.forwards.zero_()


def _longer_cache(model: Any, cache: Any, extra: int) -> Any:
    """A static cache like ``cache`` with ``extra`` more positions: the verifying forward writes
    ``lookup + 1`` of them from the last token on, up to ``lookup`` past what generate sized."""
    return type(cache)(config=model.config, max_cache_len=_max_len(cache) + extra)


def _lookup_generate(torch: Any, model: Any, input_ids: Any, generation_config: Any, model_kwargs: dict[str, Any],
                     plan: dict[str, Any], eos: Any, k: int, every: int, first_token_hook: Callable[[], None] | None) -> Any:
    """Prompt-lookup decoding of one row, greedy (see :func:`_lookup_step`): transformers' prefill,
    then verifying steps that the host queues without looking at their results, except every so
    often to read how far they got (at most ``every`` steps between looks). Steps queued past the
    end change nothing."""
    device = input_ids.device
    start = input_ids.shape[1]
    n, name = plan["lookup"], plan["cache_key"]
    step, own = _step_fn(model, plan, generation_config, device, k, fn=_lookup_step)
    fresh = model_kwargs[name]
    key = ("lookup", id(model), id(step), _cache_len(fresh), None if eos is None else _desc(eos), _plan_key(plan))
    held = _graph_sets.get(key) if own else None
    if held is not None and held.where == _addresses(model):
        held.cache.reset()
        cache = held.cache
    else:
        held = None
        if own:
            release()  # one set at a time
        cache = _longer_cache(model, fresh, n + 1)
    model_kwargs[name] = cache
    model_kwargs, _, tok, unfinished = _prefill(torch, model, input_ids, generation_config, model_kwargs, plan, eos)
    if first_token_hook is not None:
        first_token_hook()
    seq = torch.zeros((1, plan["max_length"] + n + 1), dtype=input_ids.dtype, device=device)
    seq[:, :start] = input_ids
    seq[:, start] = tok
    length = torch.tensor(start + 1, dtype=torch.long, device=device)
    full, pos = _decode_inputs(torch, model_kwargs, cache, 1, start, device)
    if held is None:
        held = _LookupSet(step, model, cache, plan, seq, length, pos, unfinished, full, eos)
    else:
        held.load(torch, seq, length, pos, unfinished, full, eos, plan)
    cudagraphs = device.type == "cuda" and not own and step is not _lookup_step
    steps, done_len, finished = 0, start + 1, not bool(unfinished.all())
    if own and held.replay is None and not finished:
        held.one()  # compiles the step and warms its kernels uncaptured; then the capture
        steps = 1
        held.replay = _Graphs._capture(torch, held.one)
        _graph_sets[key] = held
    run = held.replay if own else held.one
    while not finished:
        if steps:
            done_len, finished = (int(v) for v in torch.stack([held.length, (~held.unfinished.all()).long()]).tolist())
        left = plan["max_length"] - done_len
        if finished or left <= 0:
            break
        # as many steps as certainly fit at first (each yields at most lookup + 1 tokens), then half
        # of what the tokens per step so far say is left: a step queued past the end costs a whole
        # forward, a look at the length only the GPU's wait for the host's next launch
        queue = left // (n + 1) if not steps else left / (2 * max(1.0, (done_len - start - 1) / steps))
        for _ in range(max(1, min(every, int(queue)))):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            run()
            steps += 1
    stats["last_forwards"] = 1 + int(held.forwards)  # the prefill's and the steps' that produced tokens
    stats["last_steps"] = steps
    return held.seq[:, :done_len].clone()

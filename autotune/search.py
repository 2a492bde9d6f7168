"""The search: which candidates are measured, in which regime, and in what order.

Decode at small batch runs in one of two regimes (docs/PERFORMANCE.md): with a dynamic cache
(or an uncompiled static one) it is bound by kernel launches and host work; with a static
cache compiled by transformers (CUDA graphs) by the GPU's own time, mostly bytes moved. They
rank dtypes and attention differently (7 B on an H100: fp32 eager 46.9 vs bf16 sdpa 22.2 tok/s
with the dynamic cache; 74.3 vs 117.7 compiled). So each axis is decided in the regime the
pick will run in:

* **compiled** (CUDA, a static cache not ruled out, objective throughput or latency): every
  dtype x attention (x SDPA backend at long prompts, x fused projections where the checkpoint
  has sibling q/k/v or gate/up projections, and SDPA also with its own grouped-query attention
  where the model groups its heads) is screened in one process by the GPU
  kernel time of a decode step with a static cache (what CUDA graphs leave of a step: no
  launch gaps, no host work); the ones within ``SCREEN_MARGIN`` of the best are compiled and
  measured for real (at most ``MAX_COMPILED``), beside the roofline prior's picks, which compiled
  while the screen ran and are timed whatever it said of them; the pick comes from those runs.
  If none compiles, the eager search below runs instead.
* **eager** (the CPU, ``--cache dynamic``, the memory objective, or nothing compiled): staged
  as before — attention at the preferred dtype, then dtype, then the static cache uncompiled.

In the compiled regime the finalists decode with autotune's sync-free loop (``autotune.decode``:
no host sync per token, so the GPU's own time per step is the speed the screen ranks by), and
the screen leader also with transformers' own loop, so the loop has to win its place; other
compile modes (``--compile-modes``) are then tried on the leader, and torchao's weight-only
quantization of it (int8, int4, float8 where the GPU has it) within the quality tolerance.

Then bitsandbytes quantization (memory objective, ``--quantization always``, or nothing fits),
placements on several GPUs, and the two best re-measured head to head when they are close.
"""

from __future__ import annotations

import copy

from typing import Any, Sequence

from .judge import Judge
from .measure import Bench, mark_not_applicable
from .config import launch_command
from .facts import UNKNOWN
from .fuse import may_fuse
from .memory import BYTES
from .space import DTYPES, TORCHAO_KINDS, Space, attention_options, regime, transforms
from .trial import STATUS_OK, Trial

# A stage of the eager search carries forward the simplest option within this fraction of the
# stage's fastest: dynamic-cache candidates move by +-20 % between fresh processes on an H100.
STAGE_MARGIN = 0.10
# Compiled candidates whose screened step time is within this fraction of the best are compiled.
SCREEN_MARGIN = 0.10
MAX_COMPILED = 2
# Attention implementations the screen does not rank like their compiled runs: on the H100 with
# a 4,096-token prompt, flex_attention screened 30 % faster than sdpa (2.864 vs 4.085 ms of GPU
# time per step) but ran 38 % slower compiled (151 vs 245 tok/s; docs/gpu/h100-v5-oracle-1.1b-b1-p4096.json).
# Such a candidate is not screened at all (its screen also compiled flex's kernels for 85 s): the
# finalists come from the others, and the one in the lead's dtype is compiled in addition.
SCREEN_BLIND = frozenset({"flex_attention"})
# Head to head: a leader is decisive when its interval clears the other's by 3x the spread and
# it leads by this factor (dynamic-cache runs move +-20 % between processes, compiled ones ~10 %).
DECISIVE = {"eager": 1.25, "compiled": 1.10}
# ...except between two candidates whose greedy decode replays the sync-free loop's own CUDA
# graph: those agree within 0.5 % between fresh processes on one machine (H200, oracle rows of 2
# processes: 1.1 B bf16 615.4 / 615.0, fp16 613.3 / 613.9; 7 B bf16 212.2 / 212.3, fp16 215.7 /
# 215.9, docs/gpu/h200-oracle-*-b1.json; the tune's process against the oracle's: 1.1 B batch 8
# bf16 3,693.6 / 3,683.6, fp16 3,690.7 / 3,688.7, a 4,096-token prompt fp16 491.6 / 489.2,
# h200-s10-*; max-autotune, which picks its kernels anew in each process, within 1.4 %: 666.6 /
# 676.2), so a second process cannot reorder them by more than that: they get none, neither held
# beside the screen nor in the head-to-head
OWN_GRAPH_SPREAD = 0.005
DECODE_LOOPS = ("auto", "transformers", "sync-free")
# prompt_lookup_num_tokens tried: the method's reference code proposes 10 (apoorvumang/prompt-lookup-decoding,
# find_candidate_pred_tokens(num_pred_tokens=10)); llama-cpp-python's README advises 10 on a GPU and 2 on a
# CPU, where each proposed token costs its share of the verifying forward
PROMPT_LOOKUP_TOKENS = (2, 10)


class Search:
    def __init__(self, space: Space, bench: Bench, judge: Judge, *, quantization: str = "auto", finalist_rounds: int = 2,
                 notes: list[str] | None = None, decode_loop: str = "auto", compile_modes: Sequence[str] = ("reduce-overhead",),
                 fuse_projections: str = "auto", sdpa_gqa: str = "auto") -> None:
        from .config import COMPILE_MODES
        from .errors import UserError

        if quantization not in ("auto", "always", "never"):
            raise UserError("quantization must be auto, always or never")
        if decode_loop not in DECODE_LOOPS:
            raise UserError(f"decode loop must be one of {', '.join(DECODE_LOOPS)}")
        bad = [m for m in compile_modes if m not in COMPILE_MODES]
        if bad or not compile_modes:
            raise UserError(f"unknown compile mode {bad[0] if bad else ''!r}; use one or more of {', '.join(COMPILE_MODES)}")
        if fuse_projections not in ("auto", "never"):
            raise UserError("fuse projections must be auto or never")
        if sdpa_gqa not in ("auto", "never"):
            raise UserError("sdpa gqa must be auto or never")
        self.fuse_projections = fuse_projections
        self.sdpa_gqa = sdpa_gqa
        self.decode_loop = decode_loop
        self.compile_modes = tuple(compile_modes)
        self.space, self.bench, self.judge = space, bench, judge
        self.quantization = quantization
        self.finalist_rounds = finalist_rounds
        self.notes = notes if notes is not None else []
        self.baseline: Trial | None = None
        self.spares: dict[str, Any] = {}  # head-to-head processes launched ahead: {label: launched}

    @property
    def fixed(self) -> dict[str, str]:
        return self.space.fixed

    def make_baseline(self) -> Trial:
        """transformers' defaults as a user loads them: the checkpoint's dtype, sdpa, dynamic cache."""
        self.baseline = self.space.baseline("baseline: from_pretrained(device_map) defaults")
        return self.baseline

    def compiled_applies(self) -> bool:
        return (self.space.device == "cuda" and self.fixed.get("cache") != "dynamic" and self.judge.objective != "memory")

    def run(self) -> None:
        baseline = self.make_baseline()
        if self.compiled_applies():
            if self.compiled_search(baseline):
                self.compile_variants()
                self.weight_quantization()
            else:
                self.bench.cancel(self.spares)
                self.notes.append("no compiled candidate ran: dtype and attention chosen on dynamic-cache runs instead")
                self.no_weight_quantization("no compiled candidate ran")
                self.eager_search(baseline, static_uncompiled=True)
        else:
            if self.space.device == "cuda":
                dynamic = self.fixed.get("cache") == "dynamic"
                what = "--cache dynamic" if dynamic else "the memory objective"
                self.notes.append(f"compiled static cache not searched: {what}" + ("" if dynamic else " (quantized models do not compile)"))
                self.no_weight_quantization(f"{what} compiles nothing")
            else:
                self.no_weight_quantization("the tune compiles on CUDA GPUs only")
            self.eager_search(baseline, static_uncompiled=self.fixed.get("cache") != "dynamic")
        self.prompt_lookup()
        self.quantize()
        self.placements()
        self.head_to_head()
        self.bench.cancel(self.spares)  # held for a head-to-head that did not need them

    # ---- the compiled regime
    def loop(self) -> str | None:
        """The decode loop compiled candidates use: autotune's sync-free one unless told otherwise."""
        return None if self.decode_loop == "transformers" else "sync-free"

    def variant(self, stage: str, t: Trial, *, loop: Any = "same", mode: Any = "same", quant: str | None = None, fuse: Any = "same",
                gqa: Any = "same") -> Trial:
        """``t`` with another decode loop, compile mode or torchao quantization (its fused
        projections and attention as ``t``'s unless told), placed anew."""
        fp = t.config["from_pretrained"]
        rt, gen = t.config["runtime"], t.config["generate"]
        return self.space.make(stage, fp["dtype"] if not quant else "bfloat16", fp.get("attn_implementation") or "sdpa",
                               backend=rt.get("sdpa_backend"), cache=gen.get("cache_implementation"), compile_=not gen.get("disable_compile"),
                               quant=quant, loop=rt.get("decode_loop") if loop == "same" else loop,
                               compile_mode=(gen.get("compile_config") or {}).get("mode") if mode == "same" else mode,
                               fuse=bool(rt.get("fuse_projections")) if fuse == "same" else fuse,
                               gqa=bool(rt.get("sdpa_gqa")) if gqa == "same" else gqa)

    def compiled_search(self, baseline: Trial) -> bool:
        sp, bench = self.space, self.bench
        dtypes = [self.fixed["dtype"]] if "dtype" in self.fixed else list(DTYPES)
        options = attention_options(sp.device, sp.workload, self.fixed, self.notes)
        loop = self.loop()
        # each also with its sibling projections fused (q/k/v, gate/up: one matmul each), where the
        # checkpoint has such siblings (or its tensor names are unknown): the screen ranks them too
        fuse = self.fuse_projections == "auto" and may_fuse(sp.model)
        # and SDPA with its own grouped-query attention where the model groups its query heads (a
        # static cache always passes a mask, so transformers copies the keys and values per query
        # head instead: runtime.sdpa_gqa, autotune.gqa), fused and not: which of those is faster
        # changes with the batch (an H200's screen, 7 B shape: fused 7 % ahead at batch 1, 3 % behind
        # at batch 8, while GQA took 9 % and 33 % off the fused step; docs/gpu/h200-s17-tune-7b*.json)
        gqa = self.sdpa_gqa == "auto" and sp.model.gqa is True
        cands = [sp.make("compiled", d, a, backend=b, cache="static", compile_=True, loop=loop, fuse=f, gqa=g)
                 for d in dtypes for a, b in options for f, g in transforms(a, b, fuse=fuse, gqa=gqa)]
        bench.add([baseline])
        cands = bench.add(cands)
        live = [t for t in cands if t.status != "dropped"]
        if not live:
            return False
        # float32 as loaded only, where a half dtype runs too: it reads twice their weight bytes a
        # step, and its fused and GQA rows cost the screen most (12-14 s each at 7 B on an H200)
        # while in every recorded screen the fastest float32 row ran 1.28-3.23x the best one's step
        # (docs/gpu/h200-s17-tune-*.json); its plain rows stay, for its speed and as the quality
        # reference (the judge holds every candidate's logits to the most precise one's)
        if any(t.config["from_pretrained"]["dtype"] != "float32" for t in live):
            for t in live:
                rt = t.config["runtime"]
                if t.config["from_pretrained"]["dtype"] == "float32" and (rt.get("fuse_projections") or rt.get("sdpa_gqa")):
                    t.status, t.reason = "not measured", ("not screened: float32 reads twice a half dtype's weight bytes a step, so only its "
                                                          "candidates as loaded are screened (for its speed, and as the quality reference)")
            live = [t for t in live if t.status != "not measured"]
        # the screen first: it needs only the GPU's clock, so it may run while the fork server
        # still imports; the baseline's timed runs come after
        # screen-blind candidates are not screened (flex_attention compiles its kernels even
        # there: 85 s of a 198 s screen on the H100); while others are screened, the simplest
        # of them is compiled in addition to the screen's finalists and the runs decide
        blind = [t for t in live if t.config["from_pretrained"].get("attn_implementation") in SCREEN_BLIND]
        seen = [t for t in live if t not in blind] or blind
        blind = [t for t in blind if t not in seen]
        # While the screen runs, what will be timed after it loads and warms up, held before its
        # timed runs: the likeliest finalists (compiling them is host work, and the screen reads
        # the GPU's own time per step, which host load does not move), transformers' default,
        # and the finalists' head-to-head processes — as many of these as fit in memory together
        # (fused projections before the same candidate unfused: at batch 1 on an H200 they decoded
        # 19.8 % faster at the 1.1 B shape and 10.4 % at 7 B, docs/gpu/h200-s16-graphs-*-fused.json;
        # then SDPA's GQA before transformers' copies: 13.6 % and 8.0 % more, h200-s17-graphs-*-gqa.json)
        def roofline(t: Trial) -> tuple:  # the prior's order, also where no screen ranks them
            rt = t.config["runtime"]
            return (BYTES.get(t.config["from_pretrained"]["dtype"], 4), not rt.get("fuse_projections"), not rt.get("sdpa_gqa"), t.simplicity,
                    t.config["from_pretrained"]["dtype"] != sp.half)

        prior = sorted(seen, key=roofline)
        ahead_of = prior[:MAX_COMPILED] if len(seen) > 1 else []
        # the sync-free loop's twin with transformers' own loop (it has to win its place) is the
        # prior's first pick's, compiled ahead too: made after the screen it compiled alone, 30 s
        # that every timed run waited for (the H200 tune, docs/PERFORMANCE.md); unfused, as
        # transformers loads it: the twin is today's best without autotune's code
        added = bench.add([self.variant("compiled", ahead_of[0], loop=None, fuse=False, gqa=False)]) if loop and ahead_of else []  # [] if already there
        twin = added[0] if added else None
        ahead_of = [*ahead_of, *added]
        plan = [*ahead_of, baseline, *[t for t in ahead_of if t is not twin and not own_graph(t)]] if ahead_of else []
        while plan and not self.overlap_fits(plan, also=seen):
            plan.pop()
        ahead = bench.launch(plan[:len(ahead_of)])
        ahead_labels = list(ahead)
        base_launch = bench.launch([baseline]) if baseline in plan else {}
        self.spares = bench.launch(plan[len(ahead_of) + 1:], later=1)
        spare_labels = list(self.spares)
        screened = bench.screen(seen) if len(seen) > 1 else False
        if screened:
            for t in seen:
                if mark_not_applicable(t, t.screen):  # nothing to fuse, no grouped heads: the plain candidate is the same one
                    continue
                if t.screen.get("status") != STATUS_OK:
                    t.status, t.reason = "error", "screen: " + str(t.screen.get("error", "failed"))[:300]
            ranked = sorted((t for t in seen if t.screen.get("status") == STATUS_OK), key=lambda t: (t.screen["step_ms"], t.simplicity, t.config["from_pretrained"]["dtype"] != sp.half))
            if not ranked:
                for group in (ahead, base_launch, self.spares):
                    bench.cancel(group)
                return False
            lead = ranked[0]
            best_ms = lead.screen["step_ms"]
            queue = [t for t in ranked if t.screen["step_ms"] <= best_ms * (1 + SCREEN_MARGIN)][:MAX_COMPILED]
            # the prior's picks, compiled and warm by now, are timed whatever their screen said:
            # timing one costs seconds, and the screen reads kernel times while they warm up on the
            # same GPU, which can stretch a row's prefill or its steps. An H100 tune (7 B, batch 8)
            # screened bf16 eager fused at 6.89 ms a step (its prefill 371 ms, its fp16 twin's 132,
            # the twin 11.21 ms a step), ended the prior's fp16 sdpa + GQA fused (7.72 ms) and
            # picked eager at 1,017.5 tok/s, where that fp16 one had decoded 1,457.7 the session before
            # (docs/gpu/h100-s21-tune-7b-b8.json, h100-s20-tune-7b-b8.json)
            queue += [t for t in ranked if t.label in ahead and t not in queue]
            blind.sort(key=lambda t: (t.config["from_pretrained"]["dtype"] != lead.config["from_pretrained"]["dtype"], BYTES.get(t.config["from_pretrained"]["dtype"], 4)))
            if blind:
                queue.append(blind[0])
                self.notes.append(f"{blind[0].label} compiled in addition to the screen's finalists: a screen does not rank it like its "
                                  "compiled runs (on an H100 it screened 30 % ahead of sdpa and ran 38 % behind), so the runs decide")
                for t in blind[1:]:
                    t.status, t.reason = "not measured", f"only {blind[0].label} of its attention was compiled (no screen ranks them)"
            spare = [t for t in ranked if t not in queue]
            for t in spare:
                t.status = "not measured"
                within = t.screen["step_ms"] <= best_ms * (1 + SCREEN_MARGIN)  # close enough, but the best MAX_COMPILED took the places
                t.reason = (f"screened out: {t.screen['step_ms']:.3f} ms of GPU time per decode step against {best_ms:.3f} ms "
                            f"for {lead.label} (+{t.screen['step_ms'] / best_ms - 1:.0%}; "
                            + (f"only the {MAX_COMPILED} fastest are compiled)" if within else f"compiled only within +{SCREEN_MARGIN:.0%})"))
        else:
            # no proxy (one candidate, or the screen failed): the roofline prior orders them, as it
            # chose what compiled while the screen ran, so those warm picks are the ones timed
            queue = sorted(live, key=roofline)
            spare = queue[MAX_COMPILED:]
            queue = queue[:MAX_COMPILED]
            for t in spare:
                t.status, t.reason = "not measured", "not compiled: no screen measurement, and the roofline prior (bytes per weight, fused, SDPA's GQA) ranks it lower"
            if len(live) > 1:
                self.notes.append("screen failed: compiled candidates chosen by the roofline prior instead (bytes per weight, fused, SDPA's GQA)")
        if twin is not None and queue:
            queue.append(twin)
        elif loop and queue:
            # the leader with transformers' own loop as well: the sync-free loop has to win its place
            # (and a model it cannot run still has a compiled candidate)
            queue += bench.add([self.variant("compiled", queue[0], loop=None, fuse=False, gqa=False)])  # nothing if already there
        # every finalist compiles before anything is timed: beside the others where they fit
        # together, ahead of the screen where it was the prior's pick
        bench.cancel(ahead, keep=[t.label for t in queue])
        bench.cancel(self.spares, keep=[t.label for t in queue])
        rest = [t for t in queue if t.label not in ahead]

        def held() -> list[Trial]:  # what is loaded and waiting now
            return [t for t in queue if t.label in ahead] + ([baseline] if base_launch else []) + [t for t in queue if t.label in self.spares]

        if rest and (ahead or len(rest) > 1) and not self.overlap_fits(rest + held()):
            bench.cancel(self.spares)  # room for the finalists first
        launched = {**ahead, **(bench.launch(rest) if (ahead or len(rest) > 1) and self.overlap_fits(rest + held()) else {})}
        # and the head-to-head process of each finalist the prior did not foresee, where it fits:
        # launched by the head-to-head, one compiled alone while the GPU waited (17 s of the 7 B
        # tune on an H200, docs/PERFORMANCE.md)
        started = [t for t in rest if t.label in launched]
        unforeseen = [t for t in started if t.label not in self.spares and t is not twin and not own_graph(t)]
        if unforeseen and self.overlap_fits(unforeseen + started + held()):
            self.spares.update(bench.launch(unforeseen, later=1))
        if ahead_labels:
            others = (["transformers' default"] if base_launch else []) + ([f"{len(spare_labels)} head-to-head process(es)"] if spare_labels else [])
            self.notes.append(f"compiled while the screen ran (the roofline prior's picks): {', '.join(ahead_labels)}; "
                              f"{'kept ' + ', '.join(ahead) if ahead else 'none was a finalist'}"
                              + (f"; also warmed up then: {' and '.join(others)}" if others else ""))
        for group in (launched, base_launch, self.spares):  # one by one: a finalist and its second process share a label
            bench.warm(group)
        bench.measure(baseline, base_launch.get(baseline.label))
        for t in queue:
            bench.measure(t, launched.get(t.label))
        # a finalist that failed to compile gives its place to the next screened candidate
        while not any(t.status == STATUS_OK for t in queue) and spare:
            nxt = spare.pop(0)
            nxt.status, nxt.reason = "planned", ""
            queue.append(nxt)
            bench.measure(nxt)
        return any(t.status == STATUS_OK for t in queue)

    def compiled_leader(self) -> Trial | None:
        return self.judge.best([t for t in self.bench.trials if t.status == STATUS_OK and t.stage in ("compiled", "compile mode")
                                and regime(t.config, self.space.device) == "compiled"])

    def compile_variants(self) -> None:
        """The compiled leader under the other compile modes asked for (``--compile-modes``):
        max-autotune tries GEMM configurations while compiling, which takes longer."""
        lead = self.compiled_leader()
        others = [m for m in self.compile_modes if m != "reduce-overhead"]
        if lead is None or not others:
            if lead is not None:
                self.notes.append("other compile modes not measured (transformers' default, reduce-overhead, only; --compile-modes "
                                  "reduce-overhead,max-autotune measures max-autotune too; on an H200 with the sync-free loop and fused "
                                  "projections it decoded a 1.1 B shape 3 % slower, 727.8 vs 752.7 tok/s, after 51 s of compiling; "
                                  "unfused it had been 9 % faster there, 671 vs 615, and 3 % slower at 7 B, 206 vs 212)")
            return
        trials = self.bench.add([self.variant("compile mode", lead, mode=m) for m in others])
        self.launch_and_measure(trials)

    def weight_quantization(self) -> None:
        """torchao weight-only quantization (int8, int4) and float8 of the compiled leader, as
        throughput candidates: fewer weight bytes per token, still compiled. Only bfloat16 (int4's
        tinygemm layout needs it); the rules drop what this machine cannot run (no torchao, a GPU
        without float8 or int4 kernels); the judge keeps only those within the quality tolerance.
        Measured with ``--quantization always`` only: they change the weights (a lossy option is
        the user's to ask for), each compiles for a minute or more, and on the H100 none beat
        bfloat16 with the sync-free loop then; with the loop's own CUDA graphs int4 ran 1.56x
        bfloat16 at 7 B batch 1 on the H200, and 0.92x at batch 8 (docs/PERFORMANCE.md, issue 12)."""
        if self.quantization != "always":
            self.notes.append("torchao weight-only quantization not measured (--quantization always measures int8, int4 and float8 of the "
                              "pick, within --quality-tolerance; they change the weights; with the sync-free loop int4 decoded a 7 B "
                              "shape at batch 1 1.56x bfloat16 on an H200, 334.0 vs 213.8 tok/s)")
            return
        lead = self.compiled_leader()
        if lead is None:
            self.no_weight_quantization("no compiled candidate ran")
            return
        # fused where the leader is: autotune.fuse quantizes each torchao group's weights whole,
        # from the checkpoint; where it cannot (a checkpoint saved quantized, a scale across rows)
        # the worker finds nothing to fuse, and the kind is measured unfused instead
        kinds = {q: self.variant("weight quantization", lead, quant=q) for q in TORCHAO_KINDS}
        trials = self.bench.add(kinds.values())
        self.launch_and_measure(trials)
        unfused = [self.variant("weight quantization", lead, quant=q, fuse=False) for q, t in kinds.items()
                   if t in trials and t.status == "not measured" and t.config["runtime"].get("fuse_projections")]
        if unfused:
            self.launch_and_measure(self.bench.add(unfused))

    def no_weight_quantization(self, why: str) -> None:
        """Say why ``--quantization always`` measured no torchao kind: they are variants of the
        compiled leader, and there is none."""
        if self.quantization == "always":
            self.notes.append(f"torchao weight-only quantization not measured: its candidates are int8, int4 and float8 of the fastest "
                              f"compiled static-cache candidate, and {why}")

    def launch_and_measure(self, trials: list[Trial]) -> None:
        """Compile ``trials`` side by side where they fit together (beside nothing else: the held
        head-to-head processes are ended first when they do not fit), then time each alone."""
        live = [t for t in trials if t.status == "planned"]
        if not live:
            return
        if self.spares and not self.overlap_fits(live + self.held_spares()):
            self.bench.cancel(self.spares)  # room for these first (one alone too)
        launched = self.bench.launch(live) if len(live) > 1 and self.overlap_fits(live + self.held_spares()) else {}
        self.bench.warm(launched)
        for t in live:
            self.bench.measure(t, launched.get(t.label))

    def held_spares(self) -> list[Trial]:
        return [t for t in self.bench.trials if t.label in self.spares]

    # ---- decoding that depends on the text
    def prompt_lookup(self) -> None:
        """Prompt-lookup decoding (``prompt_lookup_num_tokens`` in :data:`PROMPT_LOOKUP_TOKENS`)
        of the fastest dynamic-cache candidate, and of the fastest compiled one with the sync-free
        loop, measured on the user's prompts only (``--prompts``): one forward verifies the tokens
        that followed the last n-gram's earlier occurrence in the prompt, so the gain is the share
        of the output the prompt already holds. On a dynamic cache it runs through transformers'
        assisted decoding (uncompiled); the sync-free loop runs it itself, compiled, on a static
        cache (``autotune.decode``). Both take one row per call; the rules drop it where that does
        not hold."""
        sp = self.space
        if not sp.workload.prompts:
            self.notes.append("prompt-lookup decoding not measured: its speed depends on the text (how much of the output the "
                              "prompt already holds); give your prompts with --prompts FILE (batch size 1)")
            return
        made = []
        if self.fixed.get("cache") != "static":  # transformers' assisted decoding: the dynamic cache
            dynamic = [t for t in self.bench.trials if t.status == STATUS_OK and t.stage in ("attention", "dtype")
                       and not t.config["generate"].get("cache_implementation")]
            src = max(dynamic, key=self.judge.score, default=None)  # the fastest: each lookup candidate is that one plus lookup
            if src is not None:
                fp, rt = src.config["from_pretrained"], src.config["runtime"]
                dtype, attn, backend = fp["dtype"], fp.get("attn_implementation") or "sdpa", rt.get("sdpa_backend")
            else:  # the compiled regime measured no dynamic-cache candidate but transformers' default
                dtype, attn, backend = self.fixed.get("dtype", sp.half), self.fixed.get("attention", "sdpa"), None
            made = [sp.make("prompt lookup", dtype, attn, backend=backend, lookup=n) for n in PROMPT_LOOKUP_TOKENS]
        looped = [t for t in self.bench.trials if t.status == STATUS_OK and t.config["runtime"].get("decode_loop") == "sync-free"
                  and t.config["generate"].get("cache_implementation") == "static" and not t.config["generate"].get("prompt_lookup_num_tokens")]
        # the loop's own prompt lookup, on its compiled static cache: on the fastest loop candidate
        # with unquantized weights, and on the fastest quantized one if that is faster (its quality
        # is judged after the search: the unquantized one keeps a lookup candidate within the
        # tolerance), each where no rule warns about lookup that did not about the candidate itself
        # (torchao int8's verifying forward of several rows crawls: TORCHAO-INT8WO-LOOKUP)
        plain = [t for t in looped if not t.config["from_pretrained"].get("quantization_config")]
        quantized = [t for t in looped if t not in plain]
        floor = max(map(self.judge.score, plain), default=None)  # a quantized base must beat the fastest plain one
        for group in (plain, quantized):
            for base in sorted(group, key=self.judge.score, reverse=True):
                if group is quantized and floor is not None and self.judge.score(base) <= floor:
                    break
                variants = []
                for n in PROMPT_LOOKUP_TOKENS:
                    cfg = copy.deepcopy(base.config)
                    cfg["generate"]["prompt_lookup_num_tokens"] = n
                    variants.append(sp.place("prompt lookup", cfg))
                added = sorted({w.split(":")[0] for v in variants for w in v.warnings} - {w.split(":")[0] for w in base.warnings})
                if added:
                    self.notes.append(f"prompt lookup not tried on {base.label}: {', '.join(added)}")
                    continue
                made += variants
                break
        if not made:
            self.notes.append("prompt-lookup decoding not measured: --cache static pins the static cache, where only the sync-free loop "
                              "runs it, and no compiled candidate with that loop ran")
            return
        trials = self.bench.add(made)
        # side by side like the other stages (each compiled loop lookup took 40-80 s one after
        # another in an H200 tune: docs/gpu/h200-s13-tune-trained-quant-first.json's timeline)
        self.launch_and_measure(trials)
        for t in trials:
            pl = t.metric("prompt_lookup") or {}
            if t.status == STATUS_OK and pl:
                same = "the same tokens as" if pl.get("tokens_equal") else f"{pl.get('agree_tokens')} of {pl.get('of')} leading tokens equal to"
                why = ""
                if not pl.get("tokens_equal") and t.config["runtime"].get("decode_loop") and t.config["from_pretrained"].get("dtype") != "float32":
                    # float32 repeats the reference token for token (tests/test_gpu_decode.py); half
                    # precision compiled kernels round differently from eager ones, and near-ties flip
                    why = " (compiled and eager half-precision kernels round differently)"
                self.notes.append(f"{t.label}: {pl.get('tokens_per_forward')} tokens per forward on your prompts; {same} "
                                  f"{pl.get('against') or 'greedy decoding without it'}{why}")

    # ---- the eager regime
    def eager_search(self, baseline: Trial, *, static_uncompiled: bool) -> None:
        sp, bench, judge = self.space, self.bench, self.judge
        first = self.fixed.get("dtype", sp.half)
        options = attention_options(sp.device, sp.workload, self.fixed, None if self.compiled_applies() else self.notes)
        stage1 = [sp.make("attention", first, a, backend=b) for a, b in options]
        bench.add([baseline])
        for t in bench.add(stage1):
            bench.measure(t)
        best_attn = judge.best(stage1, margin=STAGE_MARGIN)
        if best_attn is None:
            self.notes.append("no attention implementation ran at the preferred dtype; trying float32")
        attn = best_attn.config["from_pretrained"]["attn_implementation"] if best_attn else "sdpa"
        backend = best_attn.config["runtime"].get("sdpa_backend") if best_attn else None

        dtypes = [] if "dtype" in self.fixed else DTYPES
        stage2 = [sp.make("dtype", d, attn, backend=backend) for d in dtypes if d != first]
        for t in bench.add(stage2):
            bench.measure(t)
        self.measure_baseline(baseline, stage1 + stage2)
        best_dtype = judge.best(stage1 + stage2, margin=STAGE_MARGIN)
        dtype = best_dtype.config["from_pretrained"]["dtype"] if best_dtype else first
        if best_dtype:
            attn = best_dtype.config["from_pretrained"]["attn_implementation"]
            backend = best_dtype.config["runtime"].get("sdpa_backend")
        if static_uncompiled:
            # the uncompiled static cache: on the CPU (transformers compiles on CUDA only), or on
            # CUDA when compiling failed; same regime as the dynamic runs it is compared with
            for t in bench.add([sp.make("cache", dtype, attn, backend=backend, cache="static", compile_=False)]):
                bench.measure(t)

    def measure_baseline(self, baseline: Trial, trials: list[Trial]) -> None:
        """transformers' default, measured — unless one of ``trials`` is the same configuration:
        then it shares that one's measurements (one configuration measured twice would show two
        speeds for one thing, and a pick "slower than the default" that is the default)."""
        if baseline.results:
            return
        twin = self.baseline_twin(baseline, trials)
        if twin is not None:
            baseline.results, baseline.status = twin.results, twin.status
            baseline.reason = f"same configuration as '{twin.label}' on transformers {self.space.facts.package('transformers')}: measured once"
        else:
            self.bench.measure(baseline)

    def baseline_twin(self, baseline: Trial, trials: list[Trial]) -> Trial | None:
        """transformers 5.x defaults (checkpoint dtype, sdpa, dynamic cache) may equal a candidate."""
        tv = self.space.facts.package("transformers")
        if not isinstance(tv, str) or not tv.split(".")[0].isdigit() or int(tv.split(".")[0]) < 5:
            return None
        for t in trials:
            fp = t.config["from_pretrained"]
            if (fp.get("dtype") == self.space.model.checkpoint_dtype and fp.get("attn_implementation") == "sdpa" and not t.config["runtime"].get("sdpa_backend")
                    and not t.config["generate"] and fp.get("device_map") in ({"": 0}, "cpu") and t.status == STATUS_OK):
                return t
        return None

    # ---- quantization
    def quantize(self) -> None:
        sp, bench = self.space, self.bench
        best_fp = self.judge.best(bench.trials)
        want = self.quantization == "always" or (self.quantization == "auto" and (self.judge.objective == "memory" or best_fp is None))
        if not want:
            self.notes.append("bitsandbytes quantization not measured: the model fits unquantized and the objective is not memory (use --quantization always)")
            return
        self.bench.cancel(self.spares)  # their memory is the quantized candidates' now
        src = best_fp.config["from_pretrained"] if best_fp else {"dtype": sp.half, "attn_implementation": "sdpa"}
        dtype = src.get("dtype") if src.get("dtype") != "float32" else sp.half
        attn = src.get("attn_implementation") or "sdpa"
        for t in bench.add([sp.make("quantization", dtype, attn, quant=q) for q in ("bnb-4bit-nf4", "bnb-4bit-fp4", "bnb-8bit")]):
            bench.measure(t)

    # ---- placements (several GPUs)
    def placements(self) -> None:
        """On several GPUs: the best configuration so far, placed every way that can apply —
        one GPU, device_map splits (auto; sequential when it differs), tensor parallel over
        2, 4, ... GPUs (torchrun), CPU offload only when nothing else holds the model."""
        sp, bench = self.space, self.bench
        gpus = sp.gpu_indexes()
        if len(gpus) < 2:
            return
        self.bench.cancel(self.spares)  # placements fill every GPU
        top = self.judge.best([t for t in bench.trials if t.stage not in ("baseline", "placement")])
        if top is None:
            self.notes.append("placements not measured: no configuration ran")
            return
        fp = {k: v for k, v in top.config["from_pretrained"].items() if k not in ("device_map", "max_memory")}
        gen, rt = dict(top.config["generate"]), dict(top.config["runtime"])
        est = sp.estimate({"from_pretrained": fp, "generate": gen})
        fits_one = sp.fits_one(est) is True

        def cfg(extra: dict[str, Any], launch: str | None = None, generate: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"from_pretrained": {**fp, **extra}, "generate": dict(gen if generate is None else generate),
                    "runtime": {**rt, "launch": launch} if launch else dict(rt)}

        split = sp.split_memory(est, gpus)
        plans: list[Trial] = [sp.trial("placement", cfg({"device_map": {"": 0}}))]
        plans.append(sp.trial("placement", cfg({"device_map": "auto", "max_memory": split})))
        balanced = sp.trial("placement", cfg({"device_map": "balanced", "max_memory": split}))
        balanced.status, balanced.reason = "not measured", ("same placement as device_map=\"auto\": transformers hands every strategy but "
                                                            "\"sequential\" to accelerate's get_balanced_memory (integrations/accelerate.py, 5.17)")
        plans.append(balanced)
        seq = sp.trial("placement", cfg({"device_map": "sequential", "max_memory": split}))
        if fits_one and seq.status != "dropped":
            seq.status, seq.reason = "not measured", "same placement as one GPU: sequential fills GPU 0 first and the model fits there"
        plans.append(seq)
        k = 2
        while k <= len(gpus):
            plans.append(sp.trial("placement", cfg({"distributed_config": {"tp_plan": "auto", "tp_size": k}}, launch=launch_command(k))))
            k *= 2
        if not sp.fits_gpus(est):
            plans.append(sp.trial("placement", cfg({"device_map": "auto", "max_memory": sp.split_memory(est, gpus, offload=True)})))
        else:
            self.notes.append("CPU offload not measured: the model fits on the GPUs (offload is the last resort)")
        if sp.model.num_heads is UNKNOWN or sp.model.num_kv_heads is UNKNOWN:
            self.notes.append("tensor parallel: head counts unknown, the rules could not check that they divide")
        for t in bench.add(plans):
            if t.status == "planned":
                bench.measure(t)
            # transformers' compiled static cache may not run on a split or sharded model: measure
            # the same placement with the dynamic cache rather than lose the placement
            if t.status not in (STATUS_OK, "dropped", "not measured") and gen.get("cache_implementation") and "out of memory" not in t.reason:
                plain = sp.trial("placement", cfg(t.config["from_pretrained"], launch=t.config["runtime"].get("launch"), generate={}))
                for p in bench.add([plain]):
                    bench.measure(p)

    # ---- the finalists
    def head_to_head(self) -> None:
        """The two best, re-measured interleaved in fresh processes unless one leads decisively."""
        judge = self.judge
        ranked = sorted((t for t in self.bench.trials if t.status == STATUS_OK and t.stage != "baseline"), key=judge.score, reverse=True)
        if len(ranked) < 2:
            return
        a, b = ranked[:2]
        if own_graph(a, self.space.device) and own_graph(b, self.space.device):
            gap = (a.median("decode_tok_s") or 0) / max(b.median("decode_tok_s") or 0, 1e-9) - 1
            self.notes.append(f"finalists not re-measured: {a.label} and {b.label} ({gap:+.1%}) both replay the sync-free loop's "
                              f"own CUDA graph, whose speed moves about {OWN_GRAPH_SPREAD:.1%} between fresh processes")
            return
        factor = DECISIVE["compiled" if regime(a.config, self.space.device) == regime(b.config, self.space.device) == "compiled" else "eager"]
        if judge.objective == "throughput" and decisive(a, b, factor):
            self.notes.append(f"finalists not re-measured: {a.label} leads {b.label} by more than {factor:.2f}x and 3x the spread of either")
            return
        # compiled runs are steady within a process (their interval is a fraction of a per cent)
        # and move ~10 % between processes: one more round each, not two
        rounds = 1 if factor == DECISIVE["compiled"] else self.finalist_rounds
        for i in range(rounds):
            # compiled ones warm up (compile again) side by side, then are timed one after the other;
            # the first round's processes may have warmed up during the screen already
            launched = {k: self.spares.pop(k) for k in (a.label, b.label) if k in self.spares} if i == 0 else {}
            missing = [t for t in (a, b) if t.label not in launched]
            if factor == DECISIVE["compiled"] and missing and self.overlap_fits([a, b]):
                launched.update(self.bench.launch(missing))
            self.bench.warm(launched)
            for t in (a, b):  # interleaved, in fresh processes
                self.bench.measure(t, launched.get(t.label))

    def overlap_fits(self, trials: list[Trial], also: Sequence[Trial] = ()) -> bool:
        """May ``trials`` warm up at once (beside the biggest of ``also``, a screen)? See Space.fit_together."""
        return self.bench.can_launch() and self.space.fit_together(trials, also)


def own_graph(t: Trial, device: str = "cuda") -> bool:
    """Does ``t``'s greedy decode replay the sync-free loop's own CUDA graph (compiled on CUDA, and
    ``decode.compile_kwargs`` says so of its compile config)? The tune measures greedy decoding only."""
    from . import decode

    _, own = decode.compile_kwargs((t.config.get("generate") or {}).get("compile_config"), greedy=True, graph_steps=decode.GRAPH_STEPS)
    return (t.config.get("runtime") or {}).get("decode_loop") == "sync-free" and regime(t.config, device) == "compiled" and own


def decisive(a: Trial, b: Trial, factor: float = DECISIVE["eager"]) -> bool:
    ca, cb = a.ci("decode_tok_s"), b.ci("decode_tok_s")
    if not ca or not cb:
        return False
    spread = max(ca[1] - ca[0], cb[1] - cb[0], 1e-9)
    return (ca[0] - cb[1]) > 3 * spread and (a.median("decode_tok_s") or 0) > factor * (b.median("decode_tok_s") or 0)

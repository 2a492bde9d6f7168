"""The command line: parse arguments, call one API function, print what it returns."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from .errors import RuleFileError, UserError
from .quality import QUALITY_TOLERANCE

EXIT_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _facts_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--facts", metavar="FILE", help="judge the machine described in FILE (from `autotune probe --json`)")
    g.add_argument("--target", metavar="NAME", help="judge a built-in profile (see `autotune targets`), e.g. t4, 2xh100, t4+a100-80gb")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one fact, e.g. packages.flash-attn=2.8.3, gpus.count=2, packages.optimum=null (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autotune", description="Compatibility checker and auto-tuner for Hugging Face transformers inference.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("probe", help="what is on this machine (NVML and package metadata; no torch import)")
    p.add_argument("--json", action="store_true", help="print the facts file (DESIGN.md contract)")
    p.add_argument("--deep", action="store_true", help="also import torch & co. in a subprocess (with a timeout)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the facts file to FILE")

    p = sub.add_parser("doctor", help="every option's verdict on this machine (or a described one), and what is broken")
    _facts_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--deep", action="store_true", help="run the checks that need imports (subprocess, with a timeout)")
    p.add_argument("--model", metavar="DIR", help="also judge against this local model folder (config.json only)")

    p = sub.add_parser("check", help="judge a config dict (or from_pretrained kwargs) before deployment; exit 1 on errors")
    p.add_argument("config", metavar="CONFIG", help="a JSON file: a config from `autotune tune`, or bare from_pretrained kwargs")
    _facts_args(p)
    p.add_argument("--model", metavar="DIR", help="a local model folder (config.json and safetensors headers are read)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 also when a rule could not be evaluated")
    p.add_argument("--batch-size", type=int, help="workload to judge memory for (default: the config's, else 1)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--padding", action="store_true", help="batches are padded (varied prompt lengths)")

    p = sub.add_parser("rules", help="list the rules, or explain one")
    p.add_argument("rule", nargs="?", metavar="ID", help="a rule ID, e.g. ATTN-FA2-ARCH")
    p.add_argument("--markdown", action="store_true", help="print docs/rules.md")

    sub.add_parser("targets", help="the built-in target profiles")

    p = sub.add_parser("tune", help="measure the options that run here and print the fastest working config")
    p.add_argument("model", nargs="?", metavar="MODEL", help="a local model folder (default: a small random Llama built locally)")
    _facts_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (default 512)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per row (default 128)")
    p.add_argument("--seq-len", type=int, help="for an encoder (embedding) model: tokens per sequence (default 128); "
                   "--prompt-len/--new-tokens are for text generation")
    p.add_argument("--padding", action="store_true", help="rows of different lengths, padded (left for generation, right for an encoder)")
    p.add_argument("--prompts", metavar="FILE", help="your own prompts (.txt one per line, .jsonl, or a .json list; the model's tokenizer "
                   "is used): the prompt length is theirs, and prompt-lookup decoding, whose speed depends on the text, is measured on them")
    p.add_argument("--objective", choices=["throughput", "latency", "memory"], default="throughput")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no measurement after this long (runs under way, and candidates already warming up "
                   "beside each other, finish); what was measured is kept")
    p.add_argument("--max-memory", metavar="SPEC", help="a memory budget enforced in each candidate, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    p.add_argument("--quantization", choices=["auto", "always", "never"], default="auto",
                   help="auto: bitsandbytes only for --objective memory or when the model does not fit; always: also torchao "
                        "weight-only int8/int4/float8 of the compiled pick (within --quality-tolerance)")
    p.add_argument("--quality-tolerance", type=float, default=QUALITY_TOLERANCE, metavar="KL",
                   help=f"the mean KL (nats) to the unquantized model a torchao-quantized candidate may have and still be picked (default {QUALITY_TOLERANCE:g})")
    p.add_argument("--decode-loop", choices=["auto", "sync-free", "transformers"], default="auto",
                   help="compiled candidates decode with autotune's sync-free loop (auto) or only with transformers' own")
    p.add_argument("--compile-modes", default="reduce-overhead", metavar="MODES",
                   help="torch.compile modes to try on the compiled pick, comma-separated (default transformers' reduce-overhead; "
                        "add max-autotune for GEMM autotuning, a longer compile)")
    p.add_argument("--fuse-projections", choices=["auto", "never"], default="auto",
                   help="auto: compiled candidates also with q/k/v and gate/up fused into one matmul each (where the checkpoint has "
                        "them), ranked by the screen like the rest; never: the model as transformers loads it")
    p.add_argument("--sdpa-gqa", choices=["auto", "never"], default="auto",
                   help="auto: compiled SDPA candidates of a model with grouped-query attention also with SDPA's own grouped heads "
                        "(enable_gqa) instead of transformers' key/value copies, ranked by the screen; never: transformers' attention")
    p.add_argument("--min-throughput", type=float, default=0.0, metavar="TOK_S", help="with --objective memory: the floor in tokens/s")
    p.add_argument("--headroom", type=float, default=1.0, metavar="GIB",
                   help="GiB kept free on each GPU beyond the estimate when max_memory is derived for a device_map split (default 1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="pin the dtype instead of searching it")
    p.add_argument("--attention", metavar="IMPL", help="pin attn_implementation (eager, sdpa, flash_attention_2, ...) instead of searching it")
    p.add_argument("--cache", choices=["dynamic", "static"], help="pin the KV cache instead of searching it")
    p.add_argument("--no-capacity-check", action="store_true", help="report capacity from the memory model without the check run")
    p.add_argument("--wait", type=float, default=900.0, metavar="SECONDS",
                   help="when another tune is measuring on this machine, wait at most this long for it (0: refuse at once; default 900)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (config.json's auto_map); read it first. Recorded in the config")
    p.add_argument("--reps", type=int, default=3, help="timed generate calls per candidate run at most (at least 2 while they agree within 10 %%)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-candidate timeout")
    p.add_argument("--no-cache", action="store_true", help="measure afresh; do not read or write the result cache")
    p.add_argument("--json", action="store_true", help="print the full report (every candidate's measurements)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the config dict to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="draw the candidates side by side (needs matplotlib)")
    return parser


# The signal that interrupted the run: SIGTERM is turned into the KeyboardInterrupt that SIGINT
# raises, so both end the same way (children killed, partial results marked); exit 128 + signal.
_INTERRUPT = {"signal": 2}


def _on_sigterm(signum: int, frame: Any) -> None:
    _INTERRUPT["signal"] = signum
    raise KeyboardInterrupt


def interrupted_exit() -> int:
    return 128 + _INTERRUPT["signal"]


def _short(label: str, width: int = 40) -> str:
    """A progress label cut to ``width``, its closing remark in parentheses kept: the candidate's
    name gives way first ("bfloat16 sdpa static-cach… (again: run 2)")."""
    if len(label) <= width:
        return label
    head, sep, tail = label.rpartition(" (")
    if sep and label.endswith(")") and len(tail) + 3 < width:
        return head[: width - len(tail) - 3] + "…" + sep + tail
    return label[: width - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    import signal

    if argv is None:  # the command line, not a caller's own process
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(args)
    except (UserError, RuleFileError) as e:
        print(f"autotune: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("autotune: interrupted", file=sys.stderr)
        return interrupted_exit()
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - a bug: one line unless debugging
        if os.environ.get("AUTOTUNE_DEBUG"):
            raise
        print(f"autotune: internal error: {type(e).__name__}: {e} (set AUTOTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "probe":
        from .machine import probe
        from .render import facts_lines

        facts = probe(deep=args.deep)
        if args.output:
            from pathlib import Path

            try:
                Path(args.output).write_text(facts.to_json() + "\n", encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write {args.output}: {e}") from None
        if args.json:
            print(facts.to_json())
        elif not args.output:
            print("\n".join(facts_lines(facts.to_dict())))
        return 0

    if cmd == "doctor":
        from .gate import resolve_facts
        from .diagnosis import doctor
        from .model import read_model
        from .render import doctor_text

        if args.deep and (args.facts or args.target):
            raise UserError("--deep probes this machine; it cannot be combined with --facts or --target")
        if args.deep:
            from .machine import probe

            facts = resolve_facts(facts=probe(deep=True), overrides=args.overrides)
        else:
            facts = resolve_facts(facts_file=args.facts, target=args.target, overrides=args.overrides)
        report = doctor(facts, read_model(args.model) if args.model else None)
        _print_json(report) if args.json else print(doctor_text(report))
        return report["exit_code"]

    if cmd == "check":
        from .gate import check, exit_code
        from .config import Workload, read_config
        from .render import check_text

        workload = None
        if any(v is not None for v in (args.batch_size, args.prompt_len, args.new_tokens)) or args.padding:
            for name in ("batch_size", "prompt_len", "new_tokens"):
                v = getattr(args, name)
                if v is not None and v < 1:
                    raise UserError(f"--{name.replace('_', '-')} must be at least 1")
            workload = Workload(
                batch_size=args.batch_size or 1, prompt_len=args.prompt_len or 512, new_tokens=args.new_tokens or 128, padding=args.padding
            )
        report = check(
            read_config(args.config), facts_file=args.facts, target=args.target, overrides=args.overrides, model=args.model, workload=workload,
            strict=args.strict,
        )
        _print_json(report) if args.json else print(check_text(report))
        return exit_code(report, strict=args.strict)

    if cmd == "rules":
        from .render import rule_text, rules_table
        from .rules import default_rules
        from .rulesdoc import rules_markdown

        rules = default_rules()
        if args.markdown:
            print(rules_markdown(rules), end="")
            return 0
        if args.rule:
            match = [r for r in rules if r.id == args.rule.upper() or r.name == args.rule]
            if not match:
                raise UserError(f"unknown rule {args.rule!r}; `autotune rules` lists them")
            print(rule_text(match[0]))
            return 0
        print(rules_table(rules))
        return 0

    if cmd == "tune":
        return _tune(args)

    if cmd == "targets":
        from .profiles import describe_targets

        for name, desc in describe_targets():
            print(f"{name:12} {desc}")
        print("Combine: 2xh100-80gb (two of them), t4+a100-80gb (mixed); override with --set KEY=VALUE.")
        return 0
    raise UserError(f"unknown command {cmd!r}")


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def writable_path(path: str, what: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Checked before a tune starts (not after it, when its result would be lost): the folder
    exists and can be written, the path is not a folder, and its suffix is one we can write."""
    from pathlib import Path

    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(f"{what} {path}: the file name must end in {', '.join(suffixes)}")
    if p.is_dir():
        raise UserError(f"{what} {path} is a folder; name a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{what} {path}: not writable")


def _tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .gate import resolve_facts
    from .render import tune_text
    from .tuner import tune

    if args.output:
        writable_path(args.output, "-o")
    if args.plot:
        writable_path(args.plot, "--plot", PLOT_FORMATS)

    facts = None
    if args.facts or args.target or args.overrides:
        facts = resolve_facts(facts_file=args.facts, target=args.target, overrides=args.overrides)
    bar = None
    if not args.json and sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.monitor_interval = 0
        bar = tqdm(total=1, unit="run", dynamic_ncols=True, file=sys.stderr)

    def progress(label: str, done: int, total: int) -> None:
        if bar is not None:
            bar.total = max(total, done + 1)
            bar.n = done
            bar.set_description(_short(label))
            bar.refresh()
        else:  # a log (with --json too: stdout holds only the report)
            print(f"[{done + 1}/{total}] {label}", file=sys.stderr, flush=True)

    try:
        result = tune(args.model, batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens, padding=args.padding,
                      objective=args.objective, time_budget=args.time_budget, facts=facts, max_memory=args.max_memory,
                      quantization=args.quantization, min_throughput=args.min_throughput, use_cache=not args.no_cache, reps=args.reps,
                      candidate_timeout=args.timeout, progress=progress, report=True, headroom_gib=args.headroom, dtype=args.dtype,
                      attention=args.attention, cache=args.cache, check_capacity=not args.no_capacity_check,
                      trust_remote_code=args.trust_remote_code, wait=args.wait, seq_len=args.seq_len, decode_loop=args.decode_loop,
                      compile_modes=args.compile_modes, quality_tolerance=args.quality_tolerance, prompts=args.prompts,
                      fuse_projections=args.fuse_projections, sdpa_gqa=args.sdpa_gqa,
                      say=lambda msg: print(f"autotune: {msg}", file=sys.stderr, flush=True))
    finally:
        if bar is not None:
            bar.close()
    config = result.config
    if result.interrupted and config:
        # the best of what was measured before the interrupt: usable, but say so in the file
        config = {**config, "autotune": {**(config.get("autotune") or {}), "interrupted": True}}
    if args.output and (config or not result.interrupted):  # interrupted before any pick: no file
        try:
            Path(args.output).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e}") from None
    if args.plot:
        from .plot import plot_trials

        plot_trials(result, args.plot)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(tune_text(result))
    if result.interrupted:
        print("autotune: interrupted" + (f"; the config in {args.output} is marked \"interrupted\": true" if args.output and config else ""), file=sys.stderr)
        return interrupted_exit()
    return 0 if result.config else 1

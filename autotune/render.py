"""Human-readable views of what the API returns. No logic beyond layout."""

from __future__ import annotations

import textwrap
from typing import Any, Iterable, Mapping

from .facts import PACKAGES

# probed packages no option depends on by itself (the doctor's package line leaves them out)
_PLUMBING = frozenset({"nvidia-ml-py", "safetensors", "huggingface-hub"})

_MARK = {"available": "ok  ", "unavailable": "NO  ", "warning": "warn", "not evaluated": "?   "}
_SEV = {"error": "error  ", "warning": "warning", "info": "info   "}


def _wrap(text: str, indent: int) -> str:
    # rule IDs (INST-NVML-ERROR) and paths stay whole: break at spaces only
    return textwrap.fill(text, width=100, initial_indent=" " * indent, subsequent_indent=" " * indent, break_on_hyphens=False, break_long_words=False)


def facts_lines(facts: Mapping[str, Any]) -> list[str]:
    out = [f"Machine ({facts.get('source', '?')}{', ' + facts['taken_at'] if facts.get('taken_at') else ''})"]
    gpus = facts.get("gpus")
    if gpus is None:
        out.append("  GPUs: unknown")
    elif not gpus:
        nv = facts.get("nvml", {})
        reason = f" (NVML: {nv.get('status')})" if nv and nv.get("status") not in (None, "ok", "no-library") else ""
        out.append(f"  GPUs: none{reason}")
    for g in gpus or []:
        mem = f"{g.get('memory_total_gib', '?')} GiB"
        if "memory_free_gib" in g:
            mem += f", {g['memory_free_gib']} free"
        extra = []
        if g.get("other_processes"):
            extra.append(f"{g['other_processes']} other process(es) hold {g.get('memory_used_by_others_gib', '?')} GiB")
        if g.get("mig_mode"):
            extra.append("MIG on")
        if g.get("clock_event_reasons"):
            extra.append("clocks: " + ",".join(g["clock_event_reasons"]))
        out.append(f"  GPU {g.get('index')}: {g.get('name', '?')}  sm{str(g.get('compute_capability', '?')).replace('.', '')}  {mem}" + (f"  [{'; '.join(extra)}]" if extra else ""))
    for link in facts.get("links") or []:
        kind = f"NVLink x{link['nvlink_links']}" if link.get("nvlink_links") else f"PCIe ({link.get('topology', '?')})"
        out.append(f"  GPU {link['a']} <-> GPU {link['b']}: {kind}, P2P {'yes' if link.get('p2p') else 'no' if link.get('p2p') is False else '?'}")
    drv = facts.get("driver") or {}
    if drv:
        out.append(f"  Driver {drv.get('version', '?')} (CUDA {drv.get('cuda', '?')})")
    pk = facts.get("packages", {})
    names = [n for n in PACKAGES if n not in _PLUMBING]  # every package an option needs, torchao and gemlite too
    shown = [f"{n} {pk[n] if pk.get(n) else '-'}" for n in names if n in pk]
    if shown:
        tc = facts.get("torch_cuda", "?")
        out.append("  " + ", ".join(shown[:3]) + f" (torch CUDA: {tc if tc else 'none, CPU build'})")
        out.append("  " + ", ".join(shown[3:]))
    host = facts.get("host") or {}
    if host:
        flags = ",".join(host.get("cpu_flags", [])) or "-"
        out.append(f"  Host: Python {host.get('python', '?')}, {host.get('cpu', host.get('machine', '?'))}, {host.get('cpu_count', '?')} cores, {host.get('ram_gib', '?')} GiB RAM, CPU flags: {flags}")
    return out


def doctor_text(report: Mapping[str, Any]) -> str:
    lines = facts_lines(report["facts"])
    lines.append("")
    lines.append("Options")
    axis = None
    for opt in report["options"]:
        if opt["option"] != axis:
            axis = opt["option"]
            lines.append(f"  {axis}")
        lines.append(f"    [{_MARK[opt['status']]}] {opt['value']}" + ("" if opt["findings"] or opt["status"] != "not evaluated" else f"  (needs: {', '.join(opt['needs'])})"))
        for f in opt["findings"]:
            if f["severity"] == "info" and opt["status"] != "available":
                continue
            lines.append(_wrap(f"{f['rule']}: {f['message']}", 12))
            lines.append(_wrap(f"fix: {f['fix']}", 12))
    lines.append("")
    inst = report["installation"]
    if inst["findings"]:
        lines.append("Installation")
        for f in inst["findings"]:
            lines.append(f"  {_SEV[f['severity']]} {f['rule']}")
            lines.append(_wrap(f["message"], 10))
            lines.append(_wrap(f"fix: {f['fix']}", 10))
    else:
        lines.append("Installation: nothing broken found.")
    deep = sorted({r["rule"] for r in inst["not_evaluated"]})
    if deep:
        lines.append(_wrap(f"Not evaluated without --deep (or unknown in these facts): {', '.join(deep)}", 2))
    if isinstance(report["facts"].get("deep"), dict):
        lines.append("")
        lines.extend(deep_lines(report["facts"]["deep"]))
    return "\n".join(lines)


def deep_lines(deep: Mapping[str, Any]) -> list[str]:
    """What ``--deep`` found by importing (in a subprocess): torch and its GPUs, each SDPA
    backend, the optional packages, bitsandbytes' native library."""
    if deep.get("status") not in (None, "ok"):
        return [_wrap(f"Deep checks: {deep.get('status')}: {deep.get('error', '')}", 0)]
    out = ["Deep checks (imports, in a subprocess)"]
    t = deep.get("torch") or {}
    if t:
        if t.get("import") is False:
            out.append(_wrap(f"torch: does not import: {t.get('error', '')}", 2))
        else:
            gpus = ", ".join(f"{d.get('index')}: {d.get('name')} sm{str(d.get('capability', '')).replace('.', '')}" for d in t.get("devices") or [])
            out.append(_wrap(f"torch {t.get('version')}: CUDA build {t.get('cuda_build') or 'none'}, CUDA available {t.get('cuda_available')}, "
                             f"{t.get('device_count', 0)} GPU(s){': ' + gpus if gpus else ''}", 2))
    sdpa = deep.get("sdpa") or {}
    if sdpa:
        runs = [k for k, v in sdpa.items() if isinstance(v, dict) and v.get("ok")]
        fails = {k: v.get("error", "") for k, v in sdpa.items() if isinstance(v, dict) and v.get("ok") is False}
        out.append(_wrap(f"SDPA backends on {sdpa.get('device', '?')}: run: {', '.join(runs) or 'none'}"
                         + (f"; do not run: {', '.join(fails)}" if fails else ""), 2))
        for k, err in fails.items():
            out.append(_wrap(f"{k}: {err}", 4))
    imports = deep.get("imports") or {}
    if imports:
        state = {True: "imports", False: "FAILS to import", None: "not installed"}
        out.append(_wrap("packages: " + ", ".join(f"{k} {state.get(v.get('ok'), v.get('ok'))}" for k, v in imports.items()), 2))
        for k, v in imports.items():
            if v.get("ok") is False:
                out.append(_wrap(f"{k}: {v.get('error', '')}", 4))
    bnb = deep.get("bitsandbytes_native")
    if isinstance(bnb, dict) and bnb:
        out.append(_wrap(f"bitsandbytes native library: {'loads' if bnb.get('ok') else 'does not load'}"
                         + (f" (backend {bnb['backend']})" if bnb.get("backend") else "") + (f": {bnb['error']}" if bnb.get("error") else ""), 2))
    if "transformers_sees_torch" in deep:
        out.append(f"  transformers sees torch: {deep['transformers_sees_torch']}")
    return out


def check_text(report: Mapping[str, Any]) -> str:
    verdict = "OK" if report["ok"] else "FAILS"
    if report.get("strict") and not report["ok"] and report["not_evaluated"] and not any(f["severity"] == "error" for f in report["findings"]):
        verdict += f" (--strict: {len(report['not_evaluated'])} rule(s) could not be evaluated)"
    lines = [f"Checked {report['candidate']} against {report['facts']['source']}: " + verdict]
    for f in sorted(report["findings"], key=lambda f: ("error", "warning", "info").index(f["severity"])):
        where = f" (GPU {f['gpu']})" if "gpu" in f else ""
        lines.append(f"  {_SEV[f['severity']]} {f['rule']}{where}")
        lines.append(_wrap(f["message"], 10))
        lines.append(_wrap(f"fix: {f['fix']}", 10))
        lines.append(_wrap(f"source: {f['source']}", 10))
    for n in report["not_evaluated"]:
        lines.append(f"  not evaluated: {n['rule']} (needs {', '.join(n['needs'])})")
    return "\n".join(lines)


def rules_table(rules: Iterable[Any]) -> str:
    rows = [f"{'ID':40} {'severity':8} {'option':20} name"]
    for r in rules:
        status = "" if r.active else f"  ({r.status})"
        rows.append(f"{r.id:40} {r.severity:8} {r.option:20} {r.name}{status}")
    return "\n".join(rows)


def rule_text(rule: Any) -> str:
    """One rule's page: the same template as docs/rules.md."""
    return rule_markdown(rule, heading="#")


def rule_markdown(rule: Any, heading: str = "##") -> str:
    lines = [f"{heading} {rule.id} `{rule.name}`", ""]
    lines.append(f"- severity: {rule.severity}; option: `{rule.option}`; scope: {rule.scope}; file: `rules/{rule.file}`" + ("" if rule.active else f"; status: {rule.status}"))
    lines += ["", "**What it says.** " + rule.message.replace("\n", " ")]
    if rule.why:
        lines += ["", "**Why.** " + rule.why]
    lines += ["", "**Fix.** " + rule.fix]
    ex = [e for e in rule.examples]
    if ex:
        lines += ["", "**Examples.**"]
        for e in ex:
            where = e.target or "facts"
            if e.set:
                where += " + " + ", ".join(e.set)
            lines.append(f"- {'fires' if e.fires else 'does not fire'} on {where}: `{_compact(e.candidate)}`" + (f" — {e.note}" if e.note else ""))
    lines += ["", "**Sources.**"] + [f"- {s}" for s in rule.sources] + [""]
    return "\n".join(lines)


def _compact(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(", ", ": ")) if obj else "{}"


def _encoder_lines(result: Any) -> list[str]:
    """An encoder's tune: sequences/s and latency per forward, and the pick against the default."""
    w = result.workload
    lines = [f"Workload: encoder forward, batch {w.batch_size} x {w.prompt_len} tokens{', padded' if w.padding else ''}; "
             f"objective {result.objective}; {result.wall_s:.0f} s", ""]
    lines.append(f"{'candidate':50} {'status':12} {'seq/s':>9} {'95% CI':>17} {'p50 ms':>8} {'p99 ms':>8} {'peak GiB':>8}  reason")
    for t in result.trials:
        s = t.to_dict().get("summary") or {}
        ci = s.get("seq_s_ci95")
        peak = s.get("gpu_peak_gib") if s.get("gpu_peak_gib") is not None else s.get("host_peak_gib")
        cells = [
            f"{'*' if result.pick is t else ' '}{t.label[:49]:49}",
            f"{t.status:12}",
            f"{s['seq_s']:9.1f}" if s.get("seq_s") is not None else f"{'-':>9}",
            f"{ci[0]:8.1f}-{ci[1]:<8.1f}" if ci else f"{'-':>17}",
            f"{s['latency_p50_ms']:8.2f}" if s.get("latency_p50_ms") is not None else f"{'-':>8}",
            f"{s['latency_p99_ms']:8.2f}" if s.get("latency_p99_ms") is not None else f"{'-':>8}",
            f"{peak:8.2f}" if isinstance(peak, (int, float)) else f"{'-':>8}",
        ]
        lines.append(" ".join(cells) + "  " + (t.reason[:110] if t.reason else ""))
    lines.append("(* the pick; peak is GPU memory on a GPU, host RSS on the CPU)")
    b = result.baseline.median("seq_s") if result.baseline is not None and result.baseline.status == "ok" else None
    p = result.pick.median("seq_s") if result.pick is not None else None
    if b and p:
        lines.append(f"Pick vs AutoModel.from_pretrained defaults: {p:.1f} vs {b:.1f} sequences/s ({p / b:.2f}x)")
    return lines


def _tail(result: Any) -> list[str]:
    """How to start a multi-process config, the notes, then the config itself."""
    import json as _json

    lines: list[str] = []
    launch = (result.config.get("runtime") or {}).get("launch") if result.config else None
    if launch:
        lines += ["", "This config runs as one process per GPU. Start your script with:", f"  {launch}",
                  "and in it:", "  import autotune, json",
                  "  model = autotune.load(MODEL, json.load(open('config.json')))  # each process loads its shard",
                  "  out = model.generate(**inputs)  # every process runs the same generate; rank 0's output is the answer"]
    for n in result.notes:
        lines.append(_wrap(f"note: {n}", 0))
    lines.append("")
    lines.append(_json.dumps(result.config, indent=2) if result.config else "No working configuration found.")
    return lines


def tune_text(result: Any) -> str:
    """The final table: candidate, status, tokens/s, TTFT, peak memory, reason; then the config."""
    lines = []
    w = result.workload
    head = "Predicted" if not result.measured else "Measured"
    lines.append(f"{head} on {result.facts.source}: model {result.model.path} ({result.model.param_count:,} parameters)" if isinstance(result.model.param_count, int) else f"{head}: {result.model.path}")
    if getattr(w, "task", "generate") == "encode":
        return "\n".join(lines + _encoder_lines(result) + _tail(result))
    lines.append(f"Workload: batch {w.batch_size}, prompt {w.prompt_len}, {w.new_tokens} new tokens{', padded' if w.padding else ''}; objective {result.objective}; {result.wall_s:.0f} s")
    if result.trials and result.measured:
        lines.append("")
        lines.append(f"{'candidate':46} {'status':12} {'tok/s':>8} {'95% CI':>15} {'TTFT ms':>8} {'peak GiB':>8} {'est GiB':>7}  reason")
        for t in result.trials:
            s = t.to_dict().get("summary") or {}
            ci = s.get("decode_tok_s_ci95")
            peak = s.get("gpu_peak_gib") if s.get("gpu_peak_gib") is not None else s.get("host_peak_gib")
            mark = "*" if result.pick is t else " "
            cells = [
                f"{mark}{t.label[:45]:45}",
                f"{t.status:12}",
                f"{s['decode_tok_s']:8.1f}" if s.get("decode_tok_s") is not None else f"{'-':>8}",
                f"{ci[0]:7.1f}-{ci[1]:<7.1f}" if ci else f"{'-':>15}",
                f"{s['ttft_ms']:8.1f}" if s.get("ttft_ms") is not None else f"{'-':>8}",
                f"{peak:8.2f}" if isinstance(peak, (int, float)) else f"{'-':>8}",
                f"{t.estimate_gib:7.2f}" if isinstance(t.estimate_gib, (int, float)) else f"{'-':>7}",
            ]
            lines.append(" ".join(cells) + "  " + (t.reason[:110] if t.reason else ""))
        lines.append("(* the pick; peak is GPU memory on a GPU, host RSS on the CPU; est is autotune's estimate)")
    if result.pick is not None and result.baseline is not None and result.baseline.status == "ok" and result.measured:
        b, p = result.baseline.median("decode_tok_s"), result.pick.median("decode_tok_s")
        if result.objective == "memory":  # the objective's own figure first: peak memory
            def peak(t: Any) -> Any:
                g = t.gpu_peak_gib()
                return g if g is not None else t.metric("host_peak_gib")

            bm, pm = peak(result.baseline), peak(result.pick)
            if bm and pm:
                lines.append(f"Pick vs transformers' defaults: peak {pm:.2f} vs {bm:.2f} GiB ({pm / bm:.2f}x)"
                             + (f"; decoding {p:.1f} vs {b:.1f} tok/s" if b and p else ""))
        elif b and p:
            lines.append(f"Pick vs transformers' defaults: {p:.1f} vs {b:.1f} tok/s ({p / b:.2f}x)")
    gpus_seen = sorted({k for t in result.trials for r in t.results if r.get("status") == "ok" for k in (r.get("gpu_peak_gib") or {})})
    if len(gpus_seen) > 1:
        lines.append("Per-GPU peak memory (GiB):")
        for t in result.trials:
            peaks = next((r.get("gpu_peak_gib") for r in reversed(t.results) if r.get("status") == "ok" and r.get("gpu_peak_gib")), None)
            if peaks:
                lines.append(f"  {t.label[:60]:60} " + "  ".join(f"GPU {k}: {v:.2f}" for k, v in sorted(peaks.items())))
    if result.capacity:
        c = result.capacity
        checked = c.get("checked")
        if checked is True:
            how = "checked by a run" if (c.get("runs") or 1) <= 1 else f"checked by {c['runs']} runs (the estimate did not fit; the largest that ran)"
        elif isinstance(checked, str):
            how = ("check " + checked) if checked.startswith("failed") else "not checked by a run: " + checked
        else:
            how = "not checked by a run"
        lines.append(f"Capacity of the pick (memory model, calibration x{c.get('calibration')}; {how}): batch up to {c.get('max_batch_size')} "
                     f"at this prompt length; prompt up to {c.get('max_prompt_len')} tokens at this batch size")
    return "\n".join(lines + _tail(result))

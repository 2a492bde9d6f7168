"""--plot FILE.png: the candidates side by side (decode tokens/s with its 95 % interval, and peak memory)."""

from __future__ import annotations

from typing import Any

from .errors import UserError


def plot_trials(result: Any, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'autotune[plot]'") from None
    ok = [t for t in result.trials if t.status == "ok" and t.median("decode_tok_s")]
    if not ok:
        raise UserError("--plot: no candidate was measured")
    labels = [t.label for t in ok]
    speed = [t.median("decode_tok_s") for t in ok]
    cis = [t.ci("decode_tok_s") or (s, s) for t, s in zip(ok, speed)]
    err = [[s - lo for s, (lo, hi) in zip(speed, cis)], [hi - s for s, (lo, hi) in zip(speed, cis)]]
    mem = [t.gpu_peak_gib() if t.gpu_peak_gib() is not None else (t.metric("host_peak_gib") or 0) for t in ok]
    colors = ["tab:green" if t is result.pick else "tab:blue" for t in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 1.8), sharey=True)
    y = range(len(ok))
    a.barh(y, speed, xerr=err, color=colors)
    a.set_yticks(list(y), labels, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("decode tokens/s (median, 95% CI)")
    b.barh(y, mem, color=colors)
    b.set_xlabel("peak memory GiB (GPU; host RSS on CPU)")
    w = result.workload
    fig.suptitle(f"autotune: batch {w.batch_size}, prompt {w.prompt_len}, {w.new_tokens} new tokens (green: the pick)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

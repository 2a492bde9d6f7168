"""Regenerate README.md's sample outputs from real runs, so they cannot go stale.

    python scripts/readme_samples.py                 # every sample (the tune takes about a minute)
    python scripts/readme_samples.py --only check    # one
    python scripts/readme_samples.py --check         # exit 1 if a machine-independent sample differs

A sample sits between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``. ``rule-count``
and ``check`` do not depend on the machine (the test suite compares them); ``tune`` and
``doctor`` show this machine and are re-taken by hand with this script.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CHECK_CONFIG = '{"attn_implementation": "flash_attention_2", "torch_dtype": "float16", "load_in_8bit": true}'
DOCTOR_LINES = 24
MACHINE_INDEPENDENT = ("rule-count", "check")


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "100", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    return p.stdout.rstrip("\n"), p.returncode


def rule_count() -> str:
    sys.path.insert(0, str(ROOT))
    from autotune.rules import default_rules

    return str(len(default_rules()))


def check() -> str:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "cfg.json").write_text(CHECK_CONFIG)
        out, code = _cli("check", "cfg.json", "--target", "t4", cwd=Path(d))
    return f"```text\n$ echo '{CHECK_CONFIG}' > cfg.json\n$ autotune check cfg.json --target t4\n{out}\n$ echo $?\n{code}\n```"


def doctor() -> str:
    out, _ = _cli("doctor")
    lines = out.splitlines()
    more = f"\n... ({len(lines) - DOCTOR_LINES} more lines)" if len(lines) > DOCTOR_LINES else ""
    return "```text\n$ autotune doctor\n" + "\n".join(lines[:DOCTOR_LINES]) + more + "\n```"


def tune() -> str:
    with tempfile.TemporaryDirectory() as d:  # a first run, as a new user's: nothing cached
        out, _ = _cli("tune", env={"AUTOTUNE_CACHE_DIR": d})
        out = out.replace(d, "~/.cache/autotune")
    lines = out.splitlines()
    if "{" in lines:  # the printed config: its from_pretrained part, the rest elided
        start = lines.index("{")
        end = next((i for i in range(start, len(lines)) if lines[i].strip().startswith('"generate"')), len(lines))
        lines = lines[:end] + ["  ...", "}"]
    return "```text\n$ autotune tune\n" + "\n".join(lines) + "\n```"


SAMPLES = {"rule-count": rule_count, "check": check, "doctor": doctor, "tune": tune}
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->)(?P<body>.*?)(<!-- /generated -->)", re.S)


def current(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body").strip("\n") for m in _BLOCK.finditer(text)}


def fill(text: str, new: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in new:
            return m.group(0)
        body = new[name]
        inline = "\n" not in body
        return f"{m.group(1)}{body}{m.group(4)}" if inline else f"{m.group(1)}\n{body}\n{m.group(4)}"

    return _BLOCK.sub(sub, text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", choices=sorted(SAMPLES))
    ap.add_argument("--check", action="store_true", help="compare the machine-independent samples; write nothing")
    args = ap.parse_args()
    text = README.read_text(encoding="utf-8")
    names = args.only or (list(MACHINE_INDEPENDENT) if args.check else list(SAMPLES))
    missing = [n for n in names if n not in current(text)]
    if missing:
        print(f"README.md has no generated block for: {', '.join(missing)}", file=sys.stderr)
        return 1
    new = {n: SAMPLES[n]() for n in names}
    if args.check:
        stale = [n for n in names if current(text)[n] != new[n]]
        for n in stale:
            print(f"README.md sample {n!r} is stale: run python scripts/readme_samples.py --only {n}", file=sys.stderr)
        return 1 if stale else 0
    README.write_text(fill(text, new), encoding="utf-8")
    print(f"regenerated: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

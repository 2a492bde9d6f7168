"""README.md's generated samples that do not depend on the machine match a fresh run of the same
command (scripts/readme_samples.py writes them); its command 1 uses the constraints command 2 uses."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_readme_samples_are_current():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_samples.py"), "--check"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_readme_set_up_commands_share_the_constraints():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()[:10] if ln.startswith("python3 -m venv")]
    assert len(lines) == 2 and all("-c constraints.txt" in ln for ln in lines), lines

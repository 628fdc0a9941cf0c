"""The README's commands cannot drift: the fenced block after a `<!-- tested` marker is run, line by
line, as a user would type it (each must exit 0). Only cheap commands go in such blocks: `--help`,
`compile`, `--print-config` validation."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKED = re.compile(r"<!-- tested[^>]*-->\s*```[^\n]*\n(.*?)```", re.DOTALL)


def readme_commands() -> list[str]:
    blocks = MARKED.findall((REPO / "README.md").read_text())
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readme_marks_commands_for_testing():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_runs(command, tmp_path):
    words = shlex.split(command)
    assert words[0] == "lcr", f"{command!r}: only lcr commands are run here"
    # `compile` writes into the checkout: point it at a temporary file, then compare with the committed one.
    if words[1:3] == ["pipeline", "compile"]:
        words += ["--out", str(tmp_path / "p.yaml")]
    proc = subprocess.run([str(BIN / "lcr"), *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

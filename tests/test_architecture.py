"""The package's shape: imports point down (no cycles), modules stay short enough to read top to bottom."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "continual_rpt"


def test_no_import_cycles(shared_data):
    tool = shared_data.parent / "tools" / "import_cycles.py"
    result = subprocess.run([sys.executable, str(tool), str(PACKAGE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("no import cycles")


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long

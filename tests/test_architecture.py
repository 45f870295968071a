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


def test_the_cycle_check_counts_imports_inside_functions(shared_data, tmp_path):
    # The check above is only as strong as the tool: a cycle closed by a lazy import (the cli's style) must count.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def later():\n    from pkg import high\n    return high\n")
    (package / "high.py").write_text("from pkg import low\n")
    tool = shared_data.parent / "tools" / "import_cycles.py"
    result = subprocess.run([sys.executable, str(tool), str(package)], capture_output=True, text=True)
    assert result.returncode == 1 and "pkg.low" in result.stdout and "pkg.high" in result.stdout, result.stdout


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long

"""The dependency direction in docs/architecture.md, enforced by import-linter."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 3 kept, 0 broken" in proc.stdout


def test_worker_never_imports_the_scheduler_or_requests():
    """A tensor-parallel rank runs the worker alone: loading it must not drag in request bookkeeping."""
    code = ("import sys, kestrel.worker.executor, kestrel.worker.worker\n"
            "bad = [m for m in sys.modules if m.startswith(('kestrel.scheduler', 'kestrel.request', "
            "'kestrel.kvcache.manager', 'kestrel.stop_rules', 'kestrel.engine'))]\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

"""From a checkout that is not installed, megalite imports whole: `kernels/` is found as
`megalite.kernels` (an installed megalite maps it in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UNINSTALLED = f"""
import sys
# Forget the editable install: its finder and path entries, as on a machine that never ran pip.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "editable" not in p]
sys.path.insert(0, {str(ROOT)!r})
import megalite.kernels
import megalite.kernels._common
assert megalite.kernels.__file__ == {str(ROOT / "kernels" / "__init__.py")!r}, megalite.kernels
print("ok")
"""


def test_kernels_import_from_an_uninstalled_checkout(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", UNINSTALLED], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

"""megalite: Llama pretraining with 3D parallelism.

The top-level `kernels/` folder is the package `megalite.kernels`: an installed megalite maps it
(pyproject's package-dir); from a checkout that is not installed (`python launch/pretrain.py`,
`python tools/plan.py`) the finder below finds it there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """`megalite.kernels` from the checkout's kernels/ folder (consulted after every other
    finder, so an installed megalite's own mapping wins)."""

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "megalite.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)]
        )


if (_KERNELS / "__init__.py").is_file() and not any(
    isinstance(f, _CheckoutKernels) for f in sys.meta_path
):
    sys.meta_path.append(_CheckoutKernels())

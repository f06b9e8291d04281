#!/usr/bin/env python3
"""Text generation from any checkpoint (also installed as `megalite-generate`); see
megalite/infer/cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megalite.infer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs' curves in one PNG (also installed as `megalite-plot`); see megalite/train/curves.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megalite.train.curves import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Checkpoint tools (also installed as `megalite-convert`); see megalite/checkpoint/cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megalite.checkpoint.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

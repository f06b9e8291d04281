#!/usr/bin/env python3
"""lm-eval tasks and text perplexity of any checkpoint (also installed as `megalite-evaluate`);
see megalite/infer/evaluate_cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from megalite.infer.evaluate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

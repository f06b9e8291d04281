"""Prepare raw text for training: tokenizer, WebDataset token shards, manifest.

    python tools/prepare_data.py --input data/*.jsonl.zst --output prepared/ [--vocab-size 4096]
    python tools/prepare_data.py stats prepared/ [--plot] [--top 20]

Inputs: .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet (files, folders, globs). Re-running an
interrupted preparation resumes it; `--help` lists the filters, deduplication and `--workers`.

Runs from a checkout without installing megalite; installed, the same tool is `megalite-prepare`.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("megalite") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

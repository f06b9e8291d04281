#!/usr/bin/env python3
"""Set up megalite's environment and run the demo or the tests: the README's two commands.

    python3 tools/dev.py demo   # create .venv, then train model=tiny on the bundled sample
    python3 tools/dev.py test   # create .venv, then lint, type-check and run the whole test suite

Only the standard library is used here, so it runs on a fresh machine with nothing but Python 3.11
and pip. torch is installed first and pinned, so nothing later resolves a (multi-GB CUDA) build on
its own; DeepSpeed is installed without build isolation for the same reason.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MEGALITE_VENV", ROOT / ".venv"))
TORCH = "torch==2.13.0"
DEEPSPEED = "deepspeed==0.19.8"
PINNED = [
    "webdataset==1.0.2",
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "wandb==0.31.0",
    "tokenizers==0.23.3",
    "tqdm==4.70.1",
    "pytest==9.2.0",
    "ruff==0.17.6",
    "import-linter==2.17",  # the layering contract in pyproject.toml
    "mypy==2.4.1",  # types of megalite/ and kernels/ ([tool.mypy] in pyproject.toml)
    "safetensors==0.8.0",
    "matplotlib==3.11.2",
    "tensorboard==2.21.0",  # logging.tensorboard=true
    "submitit==1.5.4",
    "pyarrow==26.0.1",  # prepare_data: parquet input
    "zstandard==0.25.0",  # prepare_data: .jsonl.zst input
    "xxhash==4.1.0",  # shard checksums (data format 2)
    "sentencepiece==0.2.3",  # prepare_data: --tokenizer x.model
    "triton==3.9.0",  # kernels/: tested on CPU through its interpreter (TRITON_INTERPRET=1)
    "jinja2==3.1.6",  # prepare_data --format chat (torch brings it too)
    "transformers==5.23.0",  # tests only: Hugging Face conversion parity
    "lm-eval==0.4.13",  # megalite-evaluate (the `eval` extra in pyproject.toml)
    "python-dateutil==2.9.0.post0",  # what lm-eval's table writer (typepy) accepts: < 3
    "accelerate==1.16.0",  # tests only: lm-eval's `hf` model, the reference of its parity test
]
# The oldest Triton the kernels support (megalite.model.ops.TRITON_OLDEST, what torch 2.11 ships):
# tests/kernels run under it too, from an overlay of .venv. Its interpreter needs NumPy < 2.4
# (2.4 made a size-1 array's conversion to a scalar an error, which Triton < 3.7 relies on).
OLDEST_TRITON = ["triton==3.6.0", "numpy==2.3.5"]
DEMO_RUN = "runs/demo"
DEMO = [
    "launch/pretrain.py",
    "model=tiny",
    "data=shakespeare",
    "parallel.dp=2",
    "parallel.zero_stage=2",
    "trainer.max_steps=300",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=8",
    "trainer.seq_len=128",
    "trainer.log_interval=20",
    "trainer.eval_interval=100",
    "trainer.save_interval=100",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=30",
    f"trainer.run_dir={DEMO_RUN}",
]


def python() -> Path:
    return VENV / "bin" / "python"


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def setup() -> None:
    """Create or update the virtualenv; a stamp of the pins skips work when nothing changed."""
    stamp = VENV / ".megalite-stamp"
    want = hashlib.sha256(
        "\n".join([TORCH, DEEPSPEED, *PINNED, (ROOT / "pyproject.toml").read_text()]).encode()
    ).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        return
    print(
        f"setting up {VENV}: {TORCH} (the CPU build on a CPU machine), {DEEPSPEED} and "
        f"{len(PINNED)} pinned packages, then megalite itself (~3 min the first time)",
        flush=True,
    )
    if not python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [python(), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, TORCH)
    run(*pip, "--no-build-isolation", DEEPSPEED, env={**os.environ, "DS_BUILD_OPS": "0"})
    run(*pip, *PINNED)
    run(*pip, "--no-build-isolation", "--no-deps", "-e", ".")
    stamp.write_text(want)


def demo(extra: list[str]) -> None:
    """Each demo starts afresh: a previous demo's run folder is removed first (a run refuses to
    start over in a folder that holds another run), unless the overrides name a run folder or a
    resume. It ends with the run's curves, `curves.png` in its folder (tools/plot.py)."""
    previous = ROOT / DEMO_RUN
    if previous.exists() and not any(
        a.startswith(("trainer.run_dir=", "trainer.resume=")) for a in extra
    ):
        print(f"removing the previous demo run {DEMO_RUN}/ (each demo starts afresh)", flush=True)
        shutil.rmtree(previous)
    run(python(), *DEMO, *extra)
    named = [a.split("=", 1)[1] for a in extra if a.startswith("trainer.run_dir=")]
    run_dir = named[-1] if named else DEMO_RUN  # the last override wins, as in Hydra
    run(python(), "tools/plot.py", run_dir, "--out", f"{run_dir}/curves.png")


def test(extra: list[str]) -> None:
    run(python(), "-m", "ruff", "check", ".")
    run(python(), "-m", "ruff", "format", "--check", ".")
    run(VENV / "bin" / "lint-imports")  # the package layers (pyproject.toml [tool.importlinter])
    run(python(), "-m", "mypy", "megalite", "kernels")
    run(python(), "-m", "pytest", "-q", "-rs", *extra)  # -rs: each skip's reason
    if not extra:  # the whole suite: the kernels again, under the oldest Triton supported
        kernels_on_oldest_triton()


def kernels_on_oldest_triton() -> None:
    overlay = VENV / "oldest-triton"
    stamp = overlay / ".megalite-stamp"
    if not stamp.is_file() or stamp.read_text() != " ".join(OLDEST_TRITON):
        shutil.rmtree(overlay, ignore_errors=True)
        pip = [python(), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"]
        run(*pip, "--target", overlay, *OLDEST_TRITON)
        stamp.write_text(" ".join(OLDEST_TRITON))
    triton = OLDEST_TRITON[0].split("==")[1]
    env = {**os.environ, "PYTHONPATH": str(overlay), "MEGALITE_EXPECT_TRITON": triton}
    print(f"tests/kernels under {' and '.join(OLDEST_TRITON)}", flush=True)
    run(python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["setup", "demo", "test"])
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed on (overrides / pytest)")
    args = parser.parse_args()
    setup()
    try:
        {"setup": lambda extra: None, "demo": demo, "test": test}[args.what](args.extra)
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
    except KeyboardInterrupt:  # Ctrl-C: the child has had it too; no traceback of the wait
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

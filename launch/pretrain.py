"""megalite pretraining entry point: `python launch/pretrain.py [group=option ...] [key=value ...]`.

Nothing but wiring: Hydra composes `conf/pretrain.yaml` against the schemas in megalite/config.py,
then megalite.launch validates and starts the workers. A bad config exits with status 2 and
one line naming the fix; a failed run exits with status 1 and the failing rank's error.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megalite.cli_errors import exit_on_error
from megalite.config import register_configs
from megalite.launch import check_overrides, launch, to_config

register_configs()


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    with exit_on_error():
        launch(to_config(dcfg), default_run_dir=Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    with exit_on_error():
        check_overrides(sys.argv[1:])
    main()

"""The model presets, read from `conf/model/*.yaml`: the training presets are the planner's presets.

Loaded through the same `ModelConfig` schema Hydra checks them against, so a preset the trainer
would refuse is refused here too.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from megalite.config import ConfigError, ModelConfig, validate_model
from megalite.plan.errors import PlanError

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@cache
def load_preset(name: str) -> ModelConfig:
    """The `ModelConfig` of preset `name` (e.g. "7b"); `PlanError` naming the known ones if
    there is no such preset."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PlanError(f"unknown model {name!r}: use one of {', '.join(preset_names())}")
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(path)))
    assert isinstance(cfg, ModelConfig)  # a structured config's object is its dataclass
    try:
        validate_model(cfg)
    except ConfigError as e:
        raise PlanError(f"preset {name}: {e}") from None
    return cfg

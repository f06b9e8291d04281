"""Every model preset loads into the schema and has the published (or nominal) parameter count."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megalite.config import ModelConfig, validate_model
from megalite.model import count_params

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
NAMES = ["tiny", "125m", "350m", "760m", "1b", "3b", "7b", "13b", "34b", "70b"]

# Published counts, recomputed from the published shapes (embed + L x (wq wk wv wo w1 w2 w3 +
# 2 norms) + final norm + head unless tied).
PUBLISHED = {
    "7b": 6_738_415_616,  # Llama-2-7B
    "13b": 13_015_864_320,  # Llama-2-13B
    "34b": 33_743_970_304,  # Code Llama 34B
    "70b": 68_976_648_192,  # Llama-2-70B
    "1b": 1_235_814_400,  # Llama-3.2-1B
    "3b": 3_212_749_824,  # Llama-3.2-3B
    "tiny": 1_836_160,
}
NOMINAL = {"125m": 125e6, "350m": 350e6, "760m": 760e6}


def load(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(PRESET_DIR / f"{name}.yaml")))


def test_preset_list_is_complete() -> None:
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_loads_and_validates(name: str) -> None:
    cfg = load(name)
    assert isinstance(cfg, ModelConfig)
    assert cfg.name == name
    validate_model(cfg)
    assert cfg.ffn_dim % 128 == 0
    if name != "tiny":
        assert cfg.ffn_dim % 256 == 0


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_count(name: str) -> None:
    assert count_params(load(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_gpt3_shapes_near_nominal(name: str) -> None:
    assert abs(count_params(load(name)) / NOMINAL[name] - 1) <= 0.05


def test_comment_states_the_count() -> None:
    for name in NAMES:
        first_line = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first_line.startswith("# ")
        assert f"{count_params(load(name)):,}" in first_line, name

"""From a composed Hydra config to running workers: everything that can fail before a process starts
fails here, with one line.

Sequence: typed config (with `trainer.init_from`, the model shape of its checkpoint) → validate →
run directory → data (bundled sample prepared on first use) → tokenizer vs model vocabulary →
resume target checked against model shape and layout → resolved `config.yaml` written →
init_from's weights converted for the ranks where needed → workers (`cluster.launch`: spawned
here, submitted to SLURM with `+cluster=slurm`, or this process is one of torchrun's/srun's).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeGuard

from omegaconf import DictConfig, OmegaConf

from megalite.checkpoint import init_from, store
from megalite.cluster.launch import run_workers
from megalite.config import (
    Config,
    ConfigError,
    SourceConfig,
    doubtful,
    register_configs,
    validate,
)
from megalite.data.mixture import (
    SourceSpec,
    check_sources,
    check_tokenizers,
    configured_sources,
)
from megalite.data.sample import prepare_sample
from megalite.data.shards import Location, Retry, is_pattern, locate
from megalite.rank.env import from_environ

log = logging.getLogger("megalite")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] | None = None) -> Config:
    """The typed Config that `python launch/pretrain.py <overrides>` runs (Hydra compose API)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("pretrain", overrides=list(overrides or [])))
    adopt_init_model(cfg, model_given=names_model(overrides or []))
    return cfg


def names_model(overrides: list[str]) -> bool:
    """Whether command-line `overrides` choose the model (`model=...`, `model.<key>=...`)."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return any(k == "model" or k.startswith("model.") for k in keys)


def adopt_init_model(cfg: Config, *, model_given: bool) -> None:
    """With `trainer.init_from`, the model is the checkpoint's: its shape replaces the composed
    model group when the command line chose none, and a chosen one of another shape is refused.
    Idempotent (compose_config and, under Hydra's main, `launch` both call it)."""
    if not cfg.trainer.init_from:
        return
    source = init_from.locate(cfg.trainer.init_from)
    if model_given:
        check_init_model(cfg, source)
    else:
        cfg.model = source.model


def check_init_model(cfg: Config, source: init_from.InitSource) -> None:
    """Refuse a model of another shape than trainer.init_from's checkpoint, naming the fields."""
    diffs = init_from.shape_differences(cfg.model, source)
    if diffs:
        raise ConfigError(
            f"model={cfg.model.name} differs from trainer.init_from={cfg.trainer.init_from} in "
            f"{', '.join(diffs)}: leave model= out (init_from sets it) or choose a matching one"
        )


VALUE_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c",
               "--cfg", "-p", "--package", "--info", "--run", "-r"}  # fmt: skip


def check_overrides(argv: list[str]) -> None:
    """Refuse, in one line naming the fix, a command-line override Hydra would refuse with a
    block of text (or let through to a traceback): a key no schema has, or a group option that
    is not in `conf/`. Sweeps (`-m`, `a,b`) are checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    args = [a for i, a in enumerate(argv) if not a.startswith("-")
            and not (i > 0 and argv[i - 1] in VALUE_FLAGS)]  # fmt: skip
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as e:
        raise ConfigError(f"{str(e).splitlines()[0]} (quote values with spaces)") from None
    groups = _groups()
    for override in overrides:
        key = override.key_or_group
        if override.type == OverrideType.DEL or key.split(".")[0] == "hydra":
            continue
        if key in groups:
            choices = (
                list(override.sweep_string_iterator())
                if override.is_sweep_override()
                else [override.get_value_element_as_str()]
            )
            for choice in choices:
                _check_option(key, choice, groups[key])
        else:
            _check_key(key)


def _groups() -> dict[str, list[str]]:
    """Each config group and its options (the YAML files of `conf/<group>/`)."""
    return {
        f.name: sorted(y.stem for y in (CONF_DIR / f.name).glob("*.yaml"))
        for f in dataclasses.fields(Config)
        if (CONF_DIR / f.name).is_dir()
    }


def _check_option(group: str, choice: str, options: list[str]) -> None:
    if choice not in options:
        raise ConfigError(
            f"{group}={choice}: no such option{_did_you_mean(choice, options)}; "
            f"{group} options: {', '.join(options)}"
        )


def _check_key(key: str) -> None:
    """`key` is a field path of the schema (anything below a field that is not a dataclass, such
    as a list or dict, is the value's business)."""
    schema: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(schema):
            return
        fields = [f.name for f in dataclasses.fields(schema)]
        if part not in fields:
            where = ".".join(parts[:i])
            known = [f"{where}.{n}" if where else n for n in fields]
            raise ConfigError(
                f"unknown config key {key}{_did_you_mean('.'.join(parts[: i + 1]), known)}; "
                f"{'keys of ' + where if where else 'top-level keys'}: {', '.join(fields)}"
            )
        schema = typing.get_type_hints(schema)[part]


def _did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_schema(t: type | None) -> TypeGuard[type]:
    return t is not None and dataclasses.is_dataclass(t)


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys a `+key=value` override added that the schema does not know (Hydra lets them in)."""
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    out = []
    for key in node.keys():
        sub = OmegaConf.select(node, str(key), throw_on_missing=False)
        if key not in known:
            out.append(prefix + str(key))
        elif isinstance(sub, DictConfig) and _is_schema(sub_type := OmegaConf.get_type(sub)):
            out += _unknown_keys(sub, sub_type, f"{prefix}{key}.")
    return out


def to_config(dcfg: DictConfig | Config) -> Config:
    """The typed Config of a composed one; a key no schema knows is refused, not dropped."""
    if isinstance(dcfg, Config):
        return dcfg
    merged = OmegaConf.merge(OmegaConf.structured(Config), dcfg)
    assert isinstance(merged, DictConfig)  # a merge onto a structured dataclass config
    unknown = _unknown_keys(merged, Config)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}: check the spelling")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return cfg


def resolve_data(cfg: Config) -> None:
    """Complete `cfg.data` for the workers: the bundled sample's folder (prepared once) when no
    data is given; local folders made absolute, so every rank, wherever it starts, reads them."""
    d = cfg.data
    if d.sources:  # normalised once, here (the log says so): workers get weights summing to 1
        d.sources = [
            SourceConfig(_absolute(s.path), s.weight, s.name) for s in configured_sources(d)
        ]
    elif d.path is not None:
        d.path = _absolute(d.path)
    elif d.name != "shakespeare":
        raise ConfigError(
            f"data={d.name} needs data.path=DIR (a tools/prepare_data.py output) or data.sources"
        )
    else:
        d.path = str(prepare_sample(Path(d.cache_dir).expanduser(), vocab_size=d.vocab_size))


def _absolute(path: str) -> str:
    return path if is_pattern(path) else str(Path(path).expanduser().resolve())


def check_data(cfg: Config) -> list[tuple[SourceSpec, Location]]:
    """Every source opens (its manifest is read; a pipe: command runs once), all share one
    tokenizer, and it fits the model's vocabulary; returns each source with its location."""
    retry = Retry(attempts=cfg.data.read_attempts, delay_s=cfg.data.retry_delay_s)
    located = [(s, locate(s.path, retry=retry)) for s in configured_sources(cfg.data)]
    check_tokenizers(located)
    for spec, loc in located:
        vocab = loc.manifest.vocab_size
        if vocab > cfg.model.vocab_size:
            raise ConfigError(
                f"the tokenizer of {spec.path} has {vocab} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}: use a model with vocab_size >= "
                f"{vocab} or prepare the data with a smaller vocabulary"
            )
    return located


def check_init_tokenizer(
    source: init_from.InitSource, located: list[tuple[SourceSpec, Location]]
) -> None:
    """Refuse data prepared with another tokenizer than trainer.init_from's model was trained
    with (compared by the sha256 of the tokenizer file's bytes; unknown: not compared)."""
    if source.tokenizer is None:
        log.warning("trainer.init_from=%s names no tokenizer: not compared", source.path)
        return
    sha = init_from.file_sha256(source.tokenizer)
    for spec, loc in located:
        if loc.manifest.tokenizer_sha256 != sha:
            raise ConfigError(
                f"data {spec.path} was prepared with tokenizer sha "
                f"{loc.manifest.tokenizer_sha256[:12]}, the model at {source.path} with "
                f"{sha[:12]}: prepare the data with --tokenizer {source.tokenizer}"
            )


def resolve_resume(cfg: Config, run_dir: Path) -> list[Path]:
    """The checkpoints the ranks may resume from, newest first (see Trainer.resume_newest):
    with `trainer.resume=auto` the run's own that are whole (a damaged one is skipped, named),
    else the one named. Empty: a fresh start, refused where a previous run's files would mix
    with this one's."""
    resume = cfg.trainer.resume
    if resume == "auto":
        found = store.resume_candidates(run_dir / "checkpoints")
    elif resume:
        named = store.resolve(resume, run_dir=run_dir)
        assert named is not None  # only "auto" may find nothing, and it is handled above
        found = [named]
    else:
        refuse_previous_run(run_dir)
        return []
    if not found:
        return []
    meta = store.read_meta(found[0])
    meta["path"] = str(found[0])
    p = cfg.parallel
    layout = {"tp": p.tp, "pp": p.pp, "dp": p.dp} | ({"cp": p.cp} if p.cp > 1 else {})
    store.check_compatible(meta, model=asdict(cfg.model), layout=layout)
    return found


def refuse_previous_run(run_dir: Path) -> None:
    """A fresh start in a folder that holds another run's checkpoints or metrics would append to
    its metrics.jsonl and commit `step_N.1` beside its checkpoints: refused."""
    held = [
        what
        for what, there in (
            ("checkpoints", store.committed(run_dir / "checkpoints")),
            ("metrics.jsonl", (run_dir / "metrics.jsonl").is_file()),
        )
        if there
    ]
    if held:
        raise ConfigError(
            f"trainer.run_dir={run_dir} holds a previous run ({' and '.join(held)}): continue it "
            "with trainer.resume=auto, or start afresh with a new trainer.run_dir"
        )


def prepare_run(
    cfg: Config, *, run_dir: Path, world_size: int | None, writer: bool = True
) -> list[Path]:
    """Validate and set up the run; returns the checkpoints to resume from, newest first (empty:
    a fresh start; see `resolve_resume`).

    Completes `cfg.data` (see `resolve_data`) so every worker reads the same data. With
    `trainer.init_from` (and nothing of this run's own to resume), its weights are made
    readable by the ranks (see `prepare_init`).
    """
    source = init_from.locate(cfg.trainer.init_from) if cfg.trainer.init_from else None
    if source is not None:
        check_init_model(cfg, source)
        cfg.trainer.init_from = str(source.path)  # absolute: every rank reads the same
    validate(cfg, world_size=world_size)
    check_sources(cfg.data)
    if writer:
        for warning in doubtful(cfg):
            log.warning("%s", warning)
    resolve_data(cfg)
    located = check_data(cfg)
    cfg.trainer.run_dir = str(run_dir)
    resume = resolve_resume(cfg, run_dir)
    if source is not None and not resume:
        check_init_tokenizer(source, located)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if source is not None and not resume:
        prepare_init(cfg, source, run_dir=run_dir, writer=writer)
    return resume


def prepare_init(cfg: Config, source: init_from.InitSource, *, run_dir: Path, writer: bool) -> None:
    """trainer.init_from's weights as a layout-free checkpoint the ranks read: the source, or
    its copy under the run folder, converted here once (by the writer; the other ranks of an
    outside launcher wait for it)."""
    p = cfg.parallel
    init_from.prepare_weights(
        source,
        run_dir,
        layout={"tp": p.tp, "pp": p.pp, "dp": p.dp},
        convert=writer,
        timeout_s=cfg.trainer.startup_timeout,
    )


def resolve_run_dir(cfg: Config, *, default_run_dir: Path, outside: bool) -> Path:
    """`trainer.run_dir`, else Hydra's timestamped folder when megalite spawns the ranks itself.

    Ranks started by torchrun/srun each compose their own config, and their timestamps may differ
    by a second: they share a folder named after the job instead, or need `trainer.run_dir`.
    """
    if cfg.trainer.run_dir:
        return Path(cfg.trainer.run_dir).expanduser().resolve()
    if not outside:
        return default_run_dir.resolve()
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job == "none":
        raise ConfigError("set trainer.run_dir=DIR: ranks started by torchrun must share one")
    prefix = "slurm" if "SLURM_JOB_ID" in os.environ else "torchrun"
    return (Path("outputs") / f"{prefix}-{job}").resolve()


def _hydra_names_model() -> bool:
    """Under Hydra's main (launch/pretrain.py), whether its command line chose the model;
    otherwise (compose_config already adopted init_from's model) True: only checked."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    return names_model(list(HydraConfig.get().overrides.task))


def launch(cfg: Config, *, default_run_dir: Path) -> dict[str, Any] | None:
    """Run the job: in this process if an outside launcher started it, on SLURM with
    `cluster.launcher=slurm`, else in tp*pp*dp local children (`cluster.launch.run_workers`)."""
    env = from_environ()
    adopt_init_model(cfg, model_given=_hydra_names_model())
    run_dir = resolve_run_dir(cfg, default_run_dir=default_run_dir, outside=env is not None)
    resume = prepare_run(  # submitted to SLURM, the world is checked when its tasks start
        cfg,
        run_dir=run_dir,
        world_size=env.world_size if env else None,
        writer=env is None or env.global_rank == 0,
    )
    return run_workers(cfg, run_dir=run_dir, resume=resume, env=env)

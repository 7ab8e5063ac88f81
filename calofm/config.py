"""Typed run configuration: a YAML recipe fills these dataclasses, `--set key=value` overrides them, and the
resolved config is written beside every checkpoint. Unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from calofm.geometry import PRETRAIN_DETECTORS
from calofm.particles import PARTICLES


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


@dataclass
class ModelConfig:
    preset: str = "tiny"               # paper | small | tiny (see calofm.models.dit.PRESETS)
    depth: int | None = None           # None: the preset's value
    width: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
    patch: list[int] | None = None     # (r, phi, z) cells per token; must tile the 9 x 16 x 45 mesh
    n_free_slots: int = 1              # F free one-hot slots for adaptation (K + F = 5 in the Par04 contract)
    objective: str = "edm"             # edm (CaloDiT-2's) | fm: flow matching (the `fm` section)
    particles: list[str] = field(default_factory=list)  # [] photons only, as CaloDiT-2; else a particle one-hot
    n_free_particle_slots: int = 0     # ... with this many free slots for `calofm adapt --particle`
    init_from: str = ""                # a pretrained model (folder, shipped name or Hub id) to start from: its
                                       # weights and normaliser; the recipe's schedule runs again (warm restart)

    def __post_init__(self):
        for name in self.particles:
            if name not in PARTICLES:
                raise ConfigError(f"model.particles: unknown particle {name!r}; known: {', '.join(PARTICLES)}")
        _at_least(self, "model", 0, "n_free_particle_slots")
        if self.objective not in ("edm", "fm"):
            raise ConfigError(f"model.objective must be edm or fm (cd models come from `calofm distill`), got "
                              f"{self.objective!r}")


@dataclass
class DataConfig:
    dir: str = "data/synthetic"        # folder of LEMURS/CaloChallenge files, one file, or a Hub dataset repo id
    detectors: list[str] = field(default_factory=lambda: list(PRETRAIN_DETECTORS))
    max_per_detector: int | None = None  # use only the first N showers of each detector
    chunk_size: int = 512              # showers read from HDF5 at once (streaming granularity)
    log_eps: float = 1e-7              # of the unit (the paper's transform: 1e-6 MeV); small enough that an
                                       # empty cell and one at the threshold stay apart (benchmarks/fidelity.md)
    unit: str = "deposit"              # x -> log(x / unit + log_eps): deposit | detector_response | incident_energy
                                       # | mev (README, "Data contract")
    centre: bool = False               # unit deposit: draw the shower's transverse centre with E_dep and make the
                                       # shape around it (calofm/models/dit.py; benchmarks/fidelity.md)
    num_workers: int = 0

    def __post_init__(self):
        _at_least(self, "data", 1, "chunk_size", "max_per_detector")
        _at_least(self, "data", 0, "num_workers")
        _between(self, "data", "log_eps", 0.0, math.inf, low_open=True)
        if self.centre and self.unit != "deposit":
            raise ValueError(f"data.centre needs data.unit=deposit (the centre is drawn with E_dep), got {self.unit}")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_frac: float = 0.1           # WSD: linear warm-up ...
    decay_frac: float = 0.4            # ... constant, then sqrt decay over the last decay_frac of the steps
    ema_max: float = 0.999             # EMA decay ramps as 1 - (1 + step)^-ema_power, capped here
    ema_power: float = 0.75
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str | None = None  # no | fp16 | bf16; None: Accelerate's choice (`accelerate config`,
                                        # `accelerate launch --mixed_precision`), else "no"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard]
    max_nonfinite_steps: int = 10      # steps skipped for a non-finite loss or gradient before the run stops
    allow_world_size_change: bool = False  # resume on another number of processes (no longer bit-exact)

    def __post_init__(self):
        _at_least(self, "train", 1, "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                  "log_every")
        _at_least(self, "train", 0, "max_nonfinite_steps")
        _between(self, "train", "lr", 0.0, math.inf, low_open=True)
        _between(self, "train", "weight_decay", 0.0, math.inf)
        _between(self, "train", "grad_clip", 0.0, math.inf)
        _between(self, "train", "ema_max", 0.0, 1.0)
        _between(self, "train", "warmup_frac", 0.0, 1.0)
        _between(self, "train", "decay_frac", 0.0, 1.0)
        for i, b in enumerate(self.betas):
            _between(self, "train", f"betas[{i}]", 0.0, 1.0, value=b, high_open=True)
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas: expected two numbers, got {self.betas!r}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision must be one of no, fp16, bf16, got {self.mixed_precision!r}")


@dataclass
class EDMConfig:
    """EDM's data scale and training distribution of noise levels (Karras et al. 2022, table 1): ln sigma ~
    N(p_mean, p_std^2), and its sampler's stochasticity (algorithm 2, `calofm.diffusion.edm.Churn`). Saved with the
    model (`sigma_data` and `churn` in its sampler config; an adapted model keeps its pretrained model's sampler);
    benchmarks/fidelity.md measures other values."""
    sigma_data: float = 0.5            # the normalised showers have std 1; EDM's 0.5 measured better
    p_mean: float = -0.4               # EDM2's values (EDM's -1.2, 1.2 trained a worse shape: fidelity.md)
    p_std: float = 1.0
    s_churn: float = 10.0              # 0: the deterministic sampler (algorithm 1), which lights stray cells in
    s_min: float = 0.05                # low-energy showers; 40 (EDM's ImageNet value) blurred the high-energy
    s_max: float = 50.0                # ones (fidelity.md); s_min, s_max, s_noise: EDM's ImageNet-64 values
    s_noise: float = 1.003

    def __post_init__(self):
        _between(self, "edm", "sigma_data", 0.0, math.inf, low_open=True)
        _between(self, "edm", "p_mean", -math.inf, math.inf)
        _between(self, "edm", "p_std", 0.0, math.inf, low_open=True)
        _between(self, "edm", "s_churn", 0.0, math.inf)
        _between(self, "edm", "s_min", 0.0, math.inf)
        _between(self, "edm", "s_max", self.s_min if isinstance(self.s_min, (int, float)) else 0.0, math.inf)
        _between(self, "edm", "s_noise", 0.0, math.inf, low_open=True)


@dataclass
class FMConfig:
    """Flow matching (model.objective fm, `calofm.diffusion.flow`): training times t = sigmoid(n), n ~ N(t_mean,
    t_std^2), and the sampler saved with the model."""
    t_mean: float = 0.0
    t_std: float = 1.0
    solver: str = "heun"               # heun (2 evaluations a step) | euler (1)
    steps: int = 32

    def __post_init__(self):
        _between(self, "fm", "t_mean", -math.inf, math.inf)
        _between(self, "fm", "t_std", 0.0, math.inf, low_open=True)
        _at_least(self, "fm", 1, "steps")
        if self.solver not in ("heun", "euler"):
            raise ConfigError(f"fm.solver must be heun or euler, got {self.solver!r}")


@dataclass
class DistillConfig:
    teacher: str = ""                  # EDM or FM model folder or Hub repo id
    n_boundaries: int = 32             # N of the Karras discretisation
    mu: float = 0.95                   # target-network EMA
    sample_steps: int = 1              # sampler default saved with the student
    student_depth: int | None = None   # None: the teacher's; fewer: a depth-pruned student (distill.pruned_blocks)
    distance: str = "pseudo_huber"     # | l2 (Song et al.'s): consistency.cd_distance; benchmarks/distillation.md
    weighting: str = "uniform"         # uniform | inverse_dt: lambda(t_n) (consistency.cd_weight)
    weights: str = "target"            # what is saved: the target network (the paper's) | ema: a power-decay EMA of
                                       # the student (train.ema_max / ema_power), as Song et al.'s code samples

    def __post_init__(self):
        for key, allowed in (("distance", ("l2", "pseudo_huber")), ("weighting", ("uniform", "inverse_dt")),
                             ("weights", ("target", "ema"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"distill.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")


@dataclass
class DepositConfig:
    """The total-deposit net's own fit after the transformer's training (calofm/train/deposit.py): `epochs` passes
    over the stage's showers in batches of `batch_size` (at least one step), a cosine-decayed learning rate, its
    own EMA. epochs 0: none (the net as trained beside the transformer). Defaults measured on the shipped model
    and on adaptation to 1,000 showers (benchmarks/fidelity.md)."""
    epochs: float = 1000.0
    batch_size: int = 1024
    lr: float = 1e-3
    ema_max: float = 0.999             # as train.ema_max / ema_power
    ema_power: float = 0.75

    def __post_init__(self):
        _at_least(self, "deposit", 1, "batch_size")
        _between(self, "deposit", "epochs", 0.0, math.inf)
        _between(self, "deposit", "lr", 0.0, math.inf, low_open=True)
        _between(self, "deposit", "ema_max", 0.0, 1.0)

    def steps(self, n_showers: int) -> int:
        """Optimiser steps for `epochs` passes over n_showers: 0 when epochs is 0, else at least 1."""
        return 0 if self.epochs == 0 else max(1, math.ceil(self.epochs * n_showers / self.batch_size))


@dataclass
class AdaptConfig:
    pretrained: str = ""               # pretrained folder holding edm/ and cd/ (or an EDM model)
    pretrained_cd: str = ""            # the pretrained CD model, when `pretrained` is an EDM model (else none)
    detector: str = "fccee_allegro"
    data: str = ""                     # file/folder/repo of the new detector's showers
    mode: str = "full"                 # full | lora | conditioning
    n_train: int | None = None
    continue_slot: bool = False        # train an already-allocated slot again instead of refusing
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2", "adaLN"])
    cd_steps: int | None = None        # stage 2 steps (default: train.steps; 0: EDM stage only)
    cd_transfer: bool = True           # stage 2's student: the pretrained CD plus stage 1's change to the EDM's
    #                                    weights (full / conditioning modes; LoRA keeps the pretrained CD, which its
    #                                    adapter loads onto): benchmarks/adaptation.md
    particle: str = ""                 # add this particle in a free particle slot (detector: new or already known)


@dataclass
class RunConfig:
    output_dir: str = "runs/pretrain-tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    fm: FMConfig = field(default_factory=FMConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deposit: DepositConfig = field(default_factory=DepositConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


# ---------------------------------------------------------------------------------------------- validation


def _at_least(cfg: Any, section: str, low: int, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and isinstance(value, int) and value < low:
            raise ConfigError(f"{section}.{name} must be >= {low}, got {value}")


def _between(cfg: Any, section: str, name: str, low: float, high: float, *, value: Any = None,
             low_open: bool = False, high_open: bool = False) -> None:
    """`low <= value <= high` (strict where open), and finite; NaN fails every comparison."""
    value = getattr(cfg, name) if value is None else value
    if not isinstance(value, (int, float)):
        return  # a wrong type is reported by the conversion, with its key
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok or not math.isfinite(value):
        lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
        raise ConfigError(f"{section}.{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


# ---------------------------------------------------------------------------------------------- conversion


def _check(value: Any, tp: Any, key: str) -> Any:
    """Coerce/validate one value against a type hint; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _check(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs; the value is parsed as YAML (so 3, 1e-4, true, [a, b] keep their types)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


RECIPES = Path(__file__).parent / "recipes"  # the recipes installed with calofm


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file: the path if it exists, else the installed recipe of that name (`pretrain-tiny`,
    `recipes/pretrain-tiny.yaml`), so the commands in the README work from any directory."""
    path = Path(recipe)
    if path.is_file():
        return path
    installed = RECIPES / (path.name if path.suffix else f"{path.name}.yaml")
    if installed.is_file():
        return installed
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"recipe {str(path)!r} not found (installed recipes: {names})")


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping at top level")
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from calofm.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

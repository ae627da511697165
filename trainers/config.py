"""Training configuration: dataclasses validated at the edge.

A config is built from a plain dict (YAML) plus dotted `--set key=value` overrides. Every error names
the dotted key at fault, so a typo in a study spec is caught before anything trains. The hot loop never
sees these objects, only the plain values and tensors derived from them.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the dotted key."""


class DataNotFoundError(RuntimeError):
    """No source had the dataset; the message lists every place tried and how to get the data (raised
    by `trainers.data`; defined here, beside ConfigError, so that catching it needs no torch)."""


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass
class SyntheticConfig:
    """Shape of the `synthetic` dataset (deterministic, learnable; for tests and benchmarks)."""

    train_size: int = 4096
    test_size: int = 1024
    channels: int = 3
    image_size: int = 32
    classes: int = 10


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "synthetic"] = "fashion-mnist"
    split: Literal["val", "test"] = "val"  # val: seeded 80/20 split of train; test: train on all, test set
    data_dir: str | None = None  # None: $SWEEPER_DATA_DIR, else ./data
    val_fraction: float = 0.2
    subset: int | None = None  # keep only this many training examples (quick runs)
    augment: bool = True  # random crop with padding + horizontal flip, batched on the device
    crop_padding: int = 4
    flip: bool = True
    download: bool = True  # allow torchvision's download when no local copy is found
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str) -> None:
        _check(0.0 < self.val_fraction < 1.0, f"{key}.val_fraction", "must lie in (0, 1)")
        _check(self.subset is None or self.subset > 0, f"{key}.subset", "must be positive")
        _check(self.crop_padding >= 0, f"{key}.crop_padding", "must be >= 0")
        s = self.synthetic
        for name in ("train_size", "test_size", "channels", "image_size", "classes"):
            _check(getattr(s, name) > 0, f"{key}.synthetic.{name}", "must be positive")
        _check(s.classes >= 2, f"{key}.synthetic.classes", "needs at least 2 classes")


@dataclass
class ModelConfig:
    name: Literal["lenet5", "lenet5-classic", "resnet"] = "lenet5"
    width: int = 16  # resnet: channels of the first stage


@dataclass
class OptimConfig:
    name: Literal["sgdm", "adamw", "lars", "lamb"] = "sgdm"
    lr: float = 1e-3  # at the reference batch; see schedule.scaling
    momentum: float = 0.9  # sgdm, lars
    nesterov: bool = False  # sgdm, lars
    weight_decay: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw, lamb
    eps: float = 1e-8  # adamw, lamb; lars uses it in the trust-ratio denominator
    trust_coefficient: float = 0.001  # lars: eta of You et al. 2017
    exclude_1d: bool = True  # biases and 1-d params: no weight decay, no trust ratio

    def validate(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", "must be positive")
        _check(0 <= self.momentum < 1, f"{key}.momentum", "must lie in [0, 1)")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), f"{key}.betas", "each beta must lie in [0, 1)")
        _check(self.eps > 0, f"{key}.eps", "must be positive")
        _check(self.trust_coefficient > 0, f"{key}.trust_coefficient", "must be positive")
        _check(not (self.nesterov and self.momentum == 0), f"{key}.nesterov", "needs momentum > 0")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warm-up, stepped per iteration
    milestones: list[float] = field(default_factory=list)  # step: epochs where lr *= gamma
    gamma: float = 0.1
    scaling: Literal["none", "linear", "sqrt"] = "none"  # lr rule against reference_batch
    reference_batch: int = 64

    def validate(self, key: str) -> None:
        _check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", "must be >= 0")
        _check(self.gamma > 0, f"{key}.gamma", "must be positive")
        _check(self.reference_batch > 0, f"{key}.reference_batch", "must be positive")
        _check(list(self.milestones) == sorted(self.milestones), f"{key}.milestones", "must be increasing")


@dataclass
class SlowMoConfig:
    """SlowMo (Wang et al. 2020) outer step at each averaging; alpha=1, beta=0 is plain averaging."""

    alpha: float = 1.0
    beta: float = 0.0
    nesterov: bool = False  # DiLoCo-style Nesterov outer step


@dataclass
class DynamicConfig:
    """Dynamic local steps J_t (first source, section 6)."""

    alpha: float = 1000.0
    eps: float = 1e-6
    j_min: int = 4
    j_max: int = 64


@dataclass
class AdaptiveConfig:
    """ADPSGD adaptive averaging period (fifth source, Algorithm 2)."""

    p_init: int = 4
    warmup_epochs: float = 1.0  # period 1 (average every step) during warm-up
    sample_fraction: float = 0.25  # K_s: the first fraction of all steps estimates C2
    low: float = 0.7  # S < low * lr * C2 -> p += 1
    high: float = 1.3  # S > high * lr * C2 -> p -= 1


@dataclass
class NetworkConfig:
    """Network cost model: rounds * (latency + bytes / bandwidth)."""

    preset: Literal["10gbe", "100gib", "nvlink", "custom"] = "10gbe"
    latency_us: float | None = None  # overrides the preset's latency (microseconds)
    bandwidth_gbps: float | None = None  # overrides the preset's bandwidth (Gbit/s)


@dataclass
class DistributedConfig:
    """K simulated data-parallel workers. `algorithm: centralized` (the default) is one model."""

    workers: int = 1  # K
    algorithm: Literal["centralized", "minibatch", "local", "post-local", "dynamic-local", "adaptive-local",
                       "decentralized"] = "centralized"
    local_steps: int = 1  # J: local steps between averagings (local, post-local after the switch)
    switch_epoch: int = 0  # post-local: minibatch SGD before this epoch, Local SGD from it on
    slowmo: SlowMoConfig | None = None  # null: plain averaging
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    topology: Literal["ring", "random", "exponential"] = "ring"  # decentralized gossip graph
    noise_std: float = 0.0  # SSGD*: Gaussian weight noise after each synchronous step (minibatch)
    shards: Literal["contiguous", "random", "reshuffle"] = "contiguous"
    backend: Literal["serial", "vmap", "dist"] = "serial"
    network: NetworkConfig = field(default_factory=NetworkConfig)

    @property
    def enabled(self) -> bool:
        return self.algorithm != "centralized"

    def validate(self, key: str) -> None:
        _check(self.workers >= 1, f"{key}.workers", "must be >= 1")
        _check(self.enabled or self.workers == 1, f"{key}.workers",
               f"{self.workers} workers need a distributed.algorithm (minibatch, local, post-local, "
               "dynamic-local, adaptive-local or decentralized); centralized training has one")
        _check(self.local_steps >= 1, f"{key}.local_steps", "must be >= 1")
        _check(self.switch_epoch >= 0, f"{key}.switch_epoch", "must be >= 0")
        _check(self.noise_std >= 0, f"{key}.noise_std", "must be >= 0")
        _check(self.noise_std == 0 or self.algorithm == "minibatch", f"{key}.noise_std",
               "weight noise (SSGD*) applies to algorithm=minibatch only")
        _check(self.slowmo is None or self.algorithm in ("local", "post-local", "dynamic-local", "adaptive-local"),
               f"{key}.slowmo", f"needs an averaging algorithm (local, post-local, dynamic-local, adaptive-local), "
               f"not {self.algorithm}")
        if self.slowmo is not None:
            _check(self.slowmo.alpha > 0, f"{key}.slowmo.alpha", "must be positive")
            _check(0 <= self.slowmo.beta < 1, f"{key}.slowmo.beta", "must lie in [0, 1)")
        d = self.dynamic
        _check(d.alpha > 0, f"{key}.dynamic.alpha", "must be positive")
        _check(d.eps > 0, f"{key}.dynamic.eps", "must be positive")
        _check(1 <= d.j_min <= d.j_max, f"{key}.dynamic.j_min", f"need 1 <= j_min <= j_max, got {d.j_min}, {d.j_max}")
        _check(self.algorithm != "dynamic-local" or self.workers >= 2, f"{key}.workers",
               "dynamic-local needs at least 2 workers (it uses the variance between workers)")
        a = self.adaptive
        _check(a.p_init >= 1, f"{key}.adaptive.p_init", "must be >= 1")
        _check(a.warmup_epochs >= 0, f"{key}.adaptive.warmup_epochs", "must be >= 0")
        _check(0 < a.sample_fraction <= 1, f"{key}.adaptive.sample_fraction", "must lie in (0, 1]")
        _check(0 < a.low <= a.high, f"{key}.adaptive.low", f"need 0 < low <= high, got {a.low}, {a.high}")
        n = self.network
        _check(n.preset != "custom" or (n.latency_us is not None and n.bandwidth_gbps is not None),
               f"{key}.network", "preset custom needs latency_us and bandwidth_gbps")
        _check(n.latency_us is None or n.latency_us >= 0, f"{key}.network.latency_us", "must be >= 0")
        _check(n.bandwidth_gbps is None or n.bandwidth_gbps > 0, f"{key}.network.bandwidth_gbps", "must be positive")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    epochs: int = 2
    batch_size: int = 64  # per worker
    eval_batch_size: int = 1024
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast, weights and optimizer stay fp32
    channels_last: bool = False
    divergence_loss: float = 1e3  # a train loss above this (or NaN/inf) stops the run as diverged
    threads: int = 0  # torch intra-op threads; 0: torch's default (dist backend: the cores shared by the K ranks)

    def validate(self) -> "TrainConfig":
        _check(self.epochs > 0, "epochs", "must be positive")
        _check(self.batch_size > 0, "batch_size", "must be positive")
        _check(self.eval_batch_size > 0, "eval_batch_size", "must be positive")
        _check(self.divergence_loss > 0, "divergence_loss", "must be positive")
        _check(self.threads >= 0, "threads", "must be >= 0 (0: torch's default)")
        for name in ("data", "optim", "schedule", "distributed"):
            getattr(self, name).validate(name)
        return self

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict | None, overrides: list[str] | dict | None = None) -> "TrainConfig":
        """Build and validate a config from a YAML-shaped dict plus dotted overrides."""
        merged = merge(to_dict(cls()), raw or {}, "")
        if isinstance(overrides, dict):  # already-parsed values, e.g. an Optuna trial's params
            for key, value in overrides.items():
                set_dotted(merged, key, value)
        else:
            for item in overrides or []:
                key, value = parse_override(item)
                set_dotted(merged, key, value)
        return build(cls, merged, "").validate()

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] | dict | None = None) -> "TrainConfig":
        raw = load_yaml(path) if path else {}
        try:
            return cls.from_dict(raw, overrides)
        except ConfigError as err:
            if path:
                raise ConfigError(f"{path}: {err}") from None
            raise

    def to_dict(self) -> dict:
        return to_dict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params and tables."""
        return flatten(self.to_dict())


# --------------------------------------------------------------------------------------------------
# Generic helpers (dataclass <-> dict, dotted keys)


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=0.1` -> ("optim.lr", 0.1); the value is parsed as YAML (numbers, lists, mappings)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = child
    last = parts[-1]
    if isinstance(node.get(last), dict) and isinstance(value, dict):
        node[last] = merge(node[last], value, key)
    else:
        node[last] = value


def merge(base: dict, update: dict, prefix: str) -> dict:
    """Recursive dict merge: `update` wins; mappings merge key by key."""
    if not isinstance(update, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {update!r}")
    out = dict(base)
    for key, value in update.items():
        key = str(key)
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Recursively build dataclass `cls` from `raw`, coercing and checking types by annotation."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {name: coerce(hints[name], raw[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(map(str, args))}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error

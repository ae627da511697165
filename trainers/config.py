"""Training configuration: dataclasses validated at the edge.

A config is built from a plain dict (YAML) plus dotted `--set key=value` overrides. Every error names
the dotted key at fault, so a typo in a study spec is caught before anything trains. The hot loop never
sees these objects, only the plain values and tensors derived from them.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from .registry import ALGORITHMS, BACKENDS, DATASETS, MODELS, OPTIMIZERS, TOPOLOGIES


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the dotted key."""


class YAMLSyntaxError(ConfigError):
    """Text that PyYAML cannot parse (the message gives the position and PyYAML's reason on one line)."""


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
    dataset: Annotated[str, DATASETS] = "fashion-mnist"  # choices: trainers/registry.py
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
    name: Annotated[str, MODELS] = "lenet5"  # a registered name, torchvision/<builder> or package.module:callable
    width: int = 16  # resnet: channels of the first stage


@dataclass
class OptimConfig:
    name: Annotated[str, OPTIMIZERS] = "sgdm"
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
    """SlowMo (Wang et al. 2020) outer step at each averaging; alpha=1, beta=0 is plain averaging. Its
    step is scaled by the inner lr (SlowMo, Algorithm 1), unlike DiLoCo's (`distributed.diloco`)."""

    alpha: float = 1.0
    beta: float = 0.0
    nesterov: bool = False  # the Nesterov form of the slow momentum


@dataclass
class DiLoCoConfig:
    """DiLoCo (Douillard et al. 2023, Algorithm 1): every `distributed.local_steps` (H) inner steps, an
    outer SGD step with Nesterov momentum on the pseudo-gradient (anchor minus the workers' mean), with
    its own lr and momentum, independent of the inner schedule."""

    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True


@dataclass
class DynamicConfig:
    """Dynamic local steps J_t (Poiatti et al., section 6)."""

    alpha: float = 1000.0
    eps: float = 1e-6
    j_min: int = 4
    j_max: int = 64


@dataclass
class AdaptiveConfig:
    """ADPSGD adaptive averaging period (Jiang & Agrawal, Alg. 2)."""

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
    algorithm: Annotated[str, ALGORITHMS] = "centralized"
    local_steps: int = 1  # J: local steps between averagings (local, post-local after the switch)
    switch_epoch: int = 0  # post-local: minibatch SGD before this epoch, Local SGD from it on
    slowmo: SlowMoConfig | None = None  # null: plain averaging
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)  # algorithm diloco's outer optimizer
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    topology: Annotated[str, TOPOLOGIES] = "ring"  # decentralized gossip graph
    noise_std: float = 0.0  # SSGD*: Gaussian weight noise after each synchronous step (minibatch)
    shards: Literal["contiguous", "random", "reshuffle"] = "contiguous"
    backend: Annotated[str, BACKENDS] = "serial"
    network: NetworkConfig = field(default_factory=NetworkConfig)

    @property
    def enabled(self) -> bool:
        return self.algorithm != "centralized"

    def validate(self, key: str) -> None:
        _check(self.workers >= 1, f"{key}.workers", "must be >= 1")
        _check(self.enabled or self.workers == 1, f"{key}.workers",
               f"{self.workers} workers need a distributed.algorithm ({', '.join(ALGORITHMS.names()[1:])}); "
               "centralized training has one")
        _check(self.local_steps >= 1, f"{key}.local_steps", "must be >= 1")
        _check(self.switch_epoch >= 0, f"{key}.switch_epoch", "must be >= 0")
        _check(self.noise_std >= 0, f"{key}.noise_std", "must be >= 0")
        _check(self.noise_std == 0 or self.algorithm == "minibatch", f"{key}.noise_std",
               "weight noise (SSGD*) applies to algorithm=minibatch only")
        averaging = ALGORITHMS.tagged("averaging")
        _check(self.slowmo is None or self.algorithm in averaging, f"{key}.slowmo",
               f"needs an averaging algorithm ({', '.join(averaging)}), not {self.algorithm}")
        o = self.diloco
        _check(o.outer_lr > 0, f"{key}.diloco.outer_lr", "must be positive")
        _check(0 <= o.outer_momentum < 1, f"{key}.diloco.outer_momentum", "must lie in [0, 1)")
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
    """A YAML file's top-level mapping; every problem (missing, unreadable, not UTF-8, bad YAML, a key given
    twice) is one ConfigError line that starts with the path."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at line {line} ({err.reason}); "
                          "save the file as UTF-8") from None
    raw = parse_yaml(text, where=str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def parse_yaml(text: str, where: str, key: str = "", column: int | None = None) -> Any:
    """`yaml.safe_load` that rejects a mapping key given twice (PyYAML keeps the last one silently) and
    reports any problem as one ConfigError line: `WHERE: KEY: duplicate key at line L ...` or `WHERE: not
    valid YAML: line L, column C: ...`. `key` is the dotted key the text is the value of (a --set);
    `column`: the text is one line that starts at this 0-based column of what the user typed (positions
    are then columns only)."""
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())
    except _DuplicateKey as dup:
        first, again = (_position(m, column) for m in (dup.first, dup.again))
        dotted = ".".join(k for k in (key, dup.key) if k) or "config"
        if dup.recursive:
            raise ConfigError(f"{where}: {dotted}: contains itself (a recursive YAML alias at {again})") from None
        raise ConfigError(f"{where}: {dotted}: duplicate key at {again} (first at {first}); give each key "
                          "once") from None
    except yaml.YAMLError as err:
        raise YAMLSyntaxError(f"{where}: {key + ': ' if key else ''}not valid YAML: "
                              f"{_yaml_problem(err, text, column)}") from None


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: Any, again: Any, recursive: bool = False):
        super().__init__(key)
        self.key, self.first, self.again, self.recursive = key, first, again, recursive


def _position(mark: Any, column: int | None) -> str:
    if column is not None:
        return f"column {column + mark.column + 1}"
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: Any, text: str, column: int | None) -> str:
    """A PyYAML error (several lines: context, problem, marks) as one line."""
    import yaml

    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"{_position(mark, column)}: " if mark is not None else ""
        problem = err.problem or err.context or "invalid"
        context = ""
        if err.context and err.problem:
            started = err.context_mark
            same = started is None or mark is None or (started.line, started.column) == (mark.line, mark.column)
            context = f" ({err.context}{'' if same else ' started at ' + _position(started, column)})"
        return f"{where}{problem}{context}"
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow, e.g. NUL
        line = text.count("\n", 0, err.position) + 1
        at = f"column {column + err.position + 1}" if column is not None else f"line {line}"
        if isinstance(err.character, int):
            return f"{at}: character #x{err.character:04x} is not allowed in YAML ({err.reason})"
        return f"{at}: {err.reason}"
    return " ".join(str(err).split())


_LOADER: Any = None


def _strict_loader() -> type:
    """SafeLoader whose documents are checked for duplicate mapping keys before they are constructed."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class StrictLoader(yaml.SafeLoader):
            def get_single_data(self):
                node = self.get_single_node()
                if node is None:
                    return None
                _check_duplicates(node, "", set())
                return self.construct_document(node)

        _LOADER = StrictLoader
    return _LOADER


def _check_duplicates(node: Any, prefix: str, done: set, ancestors: tuple = ()) -> None:
    """Raise _DuplicateKey for a mapping key given twice, with its dotted path and both positions."""
    import yaml

    if id(node) in ancestors:
        raise _DuplicateKey(prefix.rstrip("."), node.start_mark, node.start_mark, recursive=True)
    if id(node) in done:  # an alias of a node checked already
        return
    done.add(id(node))
    inner = ancestors + (id(node),)
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                _check_duplicates(value_node, prefix, done, inner)
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if name is not None:
                ident = (key_node.tag, name)
                if ident in first:
                    raise _DuplicateKey(f"{prefix}{name}", first[ident], key_node.start_mark)
                first[ident] = key_node.start_mark
            _check_duplicates(value_node, f"{prefix}{name if name is not None else '?'}.", done, inner)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{prefix.rstrip('.')}[{i}].", done, inner)


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=0.1` -> ("optim.lr", 0.1); the value is parsed as YAML (numbers, lists, mappings). A value
    that is not valid YAML is an error when it was meant as one (it starts with `{`, `[` or a quote, or
    spans lines); otherwise it is kept as a plain string (e.g. a path starting with `@`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    _check_dotted(key, f"override {item!r}: ")
    if not text.strip():
        return key, None
    try:
        value = parse_yaml(text, where=f"override {item!r}", key=key,
                           column=None if "\n" in text else item.index("=") + 1)
    except YAMLSyntaxError:  # a duplicate key is always an error
        if text.strip()[:1] in ("{", "[", '"', "'") or "\n" in text.strip():
            raise
        value = text
    return key, value


def _check_dotted(key: str, where: str = "") -> None:
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"{where}{key}: empty part in the dotted key (write e.g. optim.lr)")


def set_dotted(tree: dict, key: str, value: Any) -> None:
    _check_dotted(key)
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
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: the registries of Annotated fields
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
    if origin is Annotated:  # Annotated[str, REGISTRY]: the registry checks the value (trainers/registry.py)
        checks = [meta for meta in tp.__metadata__ if callable(getattr(meta, "check", None))]
        for meta in checks:
            value = meta.check(value, key)
        return value if checks else coerce(args[0], value, key)
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
        number = _number(value)  # YAML 1.1 reads "1e3" as a string
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
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


def _number(value: Any) -> float | None:
    """A YAML number (or a numeric string: YAML 1.1 reads "1e-3" as one) as a float; None when it is not
    one (booleans are not numbers). Too large for a float: inf, which the callers reject."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None

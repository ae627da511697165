"""Study specs: a YAML file in, a validated `StudySpec` out, or one error naming the file, key and reason.

A spec is a `base` TrainConfig plus the dimensions a study varies: a `grid` (dotted key -> list of
values, a value may be a whole sub-config such as an optimizer preset) or a `search` space for `tune`
studies (dotted key -> `{low, high, log}` or `{choices: [...]}`). `seeds` repeat every point. Every grid
point, and the corners of every search space, are built as TrainConfigs here, before anything runs.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from trainers.config import ConfigError, TrainConfig, build, coerce, flatten, load_yaml, parse_override, set_dotted
from trainers.registry import ALGORITHMS as REGISTERED_ALGORITHMS
from trainers.results import all_metrics, metrics_for, reported_metrics

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # used in paths and MLflow experiment names (fullmatch)
SEED_KEY = "seed"
MAX_CORNERS = 512  # search spaces with more corner combinations are validated one dimension at a time
# Metrics an objective may name: what a run reports (trainers.results.reported_metrics), which depends on
# the config (the engine's figures need a K-worker distributed.algorithm). Checked for every grid point and
# search corner, so that a study never starts trials that cannot have a value.
KNOWN_METRICS = all_metrics()
ALGORITHMS = REGISTERED_ALGORITHMS.names()


class SpecError(ConfigError):
    """A spec is invalid; the message names the file, the key and the reason."""


@dataclass
class Objective:
    metric: str = "eval_acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    mode: Literal["final", "best"] = "final"  # final: the last epoch's value; best: the best epoch's

    def worst(self) -> float:
        """The value of a diverged trial: it finished, and nothing is worse (see study.py)."""
        return float("-inf") if self.direction == "maximize" else float("inf")

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


@dataclass
class SamplerSpec:
    """TPE settings of `tune` studies (grids are run in spec order)."""

    seed: int | None = 0
    n_startup_trials: int = 10
    multivariate: bool = True


@dataclass
class PrunerSpec:
    """Median pruner of `tune` studies, fed by per-epoch reports of the objective metric."""

    name: Literal["median", "none"] = "median"
    n_startup_trials: int = 5  # finished trials before anything is pruned
    n_warmup_steps: int = 5  # epochs of a trial before it may be pruned
    interval_steps: int = 1


@dataclass
class HeartbeatSpec:
    """How a killed worker is noticed: a trial whose heartbeat is older than `grace` s is failed and
    retried (at most `max_retry` times) by the next worker. Env overrides: SWEEPER_HEARTBEAT_INTERVAL,
    SWEEPER_HEARTBEAT_GRACE."""

    interval: int = 10
    grace: int = 30
    max_retry: int = 3


@dataclass
class BaseFrom:
    """Start from another study's best parameters (same storage). `params` is filled when resolved and
    stored with the study, so a resume does not change when the other study goes on."""

    study: str
    keys: list[str] | None = None  # only these dotted keys (default: every parameter but the seed)
    params: dict[str, Any] | None = None


@dataclass
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None
    int: bool = False  # suggest_int; inferred when low and high are both integers


@dataclass
class Choices:
    choices: list[Any]


@dataclass
class StudySpec:
    name: str
    kind: Literal["grid", "tune"]
    objective: Objective = field(default_factory=Objective)
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    search: dict[str, Range | Choices] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: int | None = None  # tune: finished (COMPLETE + PRUNED) trials; grid: every point
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    heartbeat: HeartbeatSpec = field(default_factory=HeartbeatSpec)
    base_from: BaseFrom | None = None
    description: str = ""
    keep_models: int | None = None  # trials whose MLflow model stays: every one (None), or the best k by the objective
    overrides: list[str] = field(default_factory=list)  # the --set items this spec was made with (recorded)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # as written, for storing with the study
    source: str = ""  # the file, or "study NAME", for error messages
    _base_error: str | None = field(default=None, repr=False)

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict, source: str = "spec", validate: bool = True) -> "StudySpec":
        """Parse and (unless `validate=False`: a spec stored with a study, only read) validate RAW: every
        grid point / search corner is built as a TrainConfig."""
        try:
            spec = _parse(raw, source)
            if validate:
                spec.validate()
        except SpecError:
            raise
        except ConfigError as err:
            raise SpecError(f"{source}: {err}") from None
        return spec

    def to_dict(self) -> dict:
        """The spec as stored with the Optuna study (with `base_from.params` once resolved)."""
        out = copy.deepcopy(self.raw)
        if self.base_from is not None and self.base_from.params is not None:
            out.setdefault("base_from", {})["params"] = self.base_from.params
        return out

    # -- dimensions ----------------------------------------------------------------------------------

    @property
    def dims(self) -> list[str]:
        """The dotted keys a trial varies, in spec order; the seed last (a grid runs it outermost)."""
        keys = list(self.grid if self.kind == "grid" else self.search)
        return keys + [SEED_KEY] if self.kind == "grid" else keys

    def grid_space(self) -> dict[str, list]:
        """Optuna's GridSampler space: every value encoded as a str/int/float/bool/None."""
        space = {key: [encode(v) for v in values] for key, values in self.grid.items()}
        space[SEED_KEY] = list(self.seeds)
        return space

    def points(self) -> list[dict[str, Any]]:
        """Every grid point (decoded values), seed outermost: a first pass over all points with the
        first seed gives a complete table early; later seeds refine it."""
        keys = list(self.grid)
        return [{**dict(zip(keys, combo)), SEED_KEY: seed}
                for seed in self.seeds for combo in itertools.product(*(self.grid[k] for k in keys))]

    def decode(self, key: str, value: Any) -> Any:
        """An Optuna parameter value back to the value the spec wrote (sub-configs are JSON strings)."""
        values = self.grid.get(key) or (self.search[key].choices if isinstance(self.search.get(key), Choices) else None)
        if values is None:
            return value
        for v in values:
            if encode(v) == value:
                return v
        return value

    def config(self, params: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: base, then inherited best params, then the trial's params."""
        overrides = dict(self.base_from.params or {}) if self.base_from else {}
        overrides.update(params)
        return TrainConfig.from_dict(self.base, overrides)

    def label(self, params: dict[str, Any]) -> str:
        """Short human label of a point, e.g. `optim=lars batch_size=256 seed=0`."""
        return " ".join(f"{key}={value_label(params[key])}" for key in self.dims if key in params)

    # -- validation ----------------------------------------------------------------------------------

    def validate(self) -> None:
        where = self.source
        if not NAME.fullmatch(self.name):
            raise SpecError(f"{where}: name: {self.name!r} must be letters, digits, '_', '-' or '.' (it names "
                            "paths and the MLflow experiment)")
        _metric_check(self.objective.metric, where)
        if not isinstance(self.base, dict):
            raise SpecError(f"{where}: base: expected a mapping (a TrainConfig), got {self.base!r}")
        # The base need not be valid alone (e.g. 16 workers whose algorithm each grid point sets), but an
        # error that every point shares is the base's, and is reported as such.
        try:
            TrainConfig.from_dict(self.base)
            self._base_error = None
        except ConfigError as err:
            self._base_error = str(err)
        if self.kind == "grid":
            self._validate_grid()
        else:
            self._validate_search()

    def _point_error(self, err: ConfigError) -> None:
        if str(err) == self._base_error:
            raise SpecError(f"{self.source}: base.{err}") from None

    def _validate_grid(self) -> None:
        where = self.source
        if not self.grid and len(self.seeds) < 2:
            raise SpecError(f"{where}: grid: a grid study needs at least one key (e.g. optim.lr: [0.01, 0.1]) or "
                            "several seeds")
        if self.search:
            raise SpecError(f"{where}: search: belongs to kind: tune; a grid study lists values under grid")
        if self.budget is not None:
            raise SpecError(f"{where}: budget: a grid study runs every point once; remove budget (use "
                            "--n-trials to run only some of them now)")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"{where}: grid.{key}: expected a non-empty list of values, got {values!r}")
            encoded = [encode(v) for v in values]
            if len(set(map(json.dumps, encoded))) != len(encoded):
                raise SpecError(f"{where}: grid.{key}: lists a value twice")
        built = []
        for point in self.points():  # every combination: some values are valid only together
            try:
                built.append((point, self.config(point), f"grid point {self.label(point)}"))
            except ConfigError as err:
                self._point_error(err)
                # Name the grid key (and which of its values) that the config error is about, if any.
                key = next((k for k in self.grid if str(err).startswith((f"{k}:", f"{k}.", f"{k}["))), None)
                if key is None:
                    raise SpecError(f"{where}: grid point {self.label(point)}: {err}") from None
                i = [encode(v) for v in self.grid[key]].index(encode(point[key]))
                raise SpecError(f"{where}: grid.{key}[{i}] = {value_label(point[key])}: {err} (at grid point "
                                f"{self.label(point)})") from None
        self._check_reported(built)

    def _validate_search(self) -> None:
        where = self.source
        if not self.search:
            raise SpecError(f"{where}: search: a tune study needs a search space (e.g. optim.lr: {{low: 1e-4, "
                            "high: 1e-1, log: true}})")
        if self.grid:
            raise SpecError(f"{where}: grid: belongs to kind: grid; a tune study lists ranges under search")
        if self.budget is None or self.budget < 1:
            raise SpecError(f"{where}: budget: a tune study needs budget: N (finished trials), got {self.budget!r}")
        if len(self.seeds) != 1:
            raise SpecError(f"{where}: seeds: a tune study trains one seed per trial; repeat the best point over "
                            "seeds in a grid study with base_from: {study: NAME}")
        corners = {}
        built = []
        for key, dim in self.search.items():
            if isinstance(dim, Choices):
                corners[key] = list(dim.choices)
            elif dim.int:  # what suggest_int draws from
                corners[key] = [int(dim.low), int(dim.high)]
            else:
                corners[key] = [dim.low, dim.high]
            for value in corners[key]:
                try:
                    cfg = self.config({key: value, SEED_KEY: self.seeds[0]})
                except ConfigError as err:
                    self._point_error(err)
                    raise SpecError(f"{where}: search.{key} value {value_label(value)}: {err}") from None
                built.append(({key: value}, cfg, f"search.{key} value {value_label(value)}"))
        if _product_size(corners) <= MAX_CORNERS:
            for combo in itertools.product(*corners.values()):
                point = {**dict(zip(corners, combo)), SEED_KEY: self.seeds[0]}
                try:
                    cfg = self.config(point)
                except ConfigError as err:
                    self._point_error(err)
                    raise SpecError(f"{where}: search corner {self.label(point)}: {err}") from None
                built.append((point, cfg, f"search corner {self.label(point)}"))
        self._check_reported(built)

    def _check_reported(self, built: list[tuple[dict, TrainConfig, str]]) -> None:
        """The objective metric must be one that every trial's config reports (trainers.results): e.g. the
        engine's comm_rounds is not reported by a centralized run, and a trial without a value fails."""
        metric = self.objective.metric
        missing = [(cfg, at) for _, cfg, at in built if metric not in reported_metrics(cfg)]
        if not missing:
            return
        cfg, at = missing[0]
        algorithm = cfg.distributed.algorithm
        article = "an" if algorithm[0] in "aeiou" else "a"
        where = "" if len(missing) == len(built) else f", at {at}"  # not every point: say which one
        others = [a for a in ALGORITHMS if metric in metrics_for(a)]
        raise SpecError(f"{self.source}: objective.metric: {metric!r} is not reported by {article} {algorithm} run "
                        f"(distributed.algorithm: {algorithm}{where}); it reports: {', '.join(reported_metrics(cfg))}"
                        f"; {metric} is reported with distributed.algorithm {_or_list(others)}")


def load_spec(path: str) -> StudySpec:
    """Read and validate a spec file; every error starts with the path."""
    try:
        raw = load_yaml(path)
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return StudySpec.from_dict(raw, source=str(path))


def load_spec_with(path: str, items: list[str] | tuple = (), name: str | None = None) -> StudySpec:
    """`load_spec`, then `--set` ITEMS and `--name` (see `with_overrides`)."""
    if not items and name is None:
        return load_spec(path)
    try:
        raw = load_yaml(path)
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return with_overrides(raw, items, str(path), name)


# --------------------------------------------------------------------------------------------------
# --set KEY=VALUE on a spec
#
# The first segment of KEY is the spec's top-level key (name, kind, objective, base, grid, search, seeds,
# budget, sampler, pruner, heartbeat, base_from, description). Under `grid` and `search` the rest of KEY
# is the dimension's own dotted key, whole: `grid.optim.lr=[0.01,0.1]` sets the dimension `optim.lr`
# (grid keys contain dots themselves). Under `base` (and every other section) the rest is a dotted key
# into it: `base.epochs=2`, `base.optim.name=lamb`, `objective.metric=eval_loss`. VALUE is parsed as YAML
# by the same `trainers.config.parse_override` as `sweeper train --set`, and a mapping merges into a
# mapping (`base.optim={name: lars, lr: 0.25}`); `seeds=[0,1]`. The result is validated as a whole.


def apply_overrides(raw: dict, items: list[str] | tuple) -> dict:
    """A copy of the spec dict RAW with the `--set` ITEMS applied, in order (see above); the items are
    appended to its `overrides` record. A ConfigError names the item and the reason."""
    out = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    for item in items:
        key, value = parse_override(item)  # its errors name the item: "override 'KEY=VALUE': ..."
        head, _, rest = key.partition(".")
        if head == "overrides" or head not in TOP_KEYS:
            keys = [k for k in TOP_KEYS if k != "overrides"]
            close = difflib.get_close_matches(head, keys, n=1)
            raise SpecError(f"--set {item}: {head}: not a key of a spec; the first part of KEY is one of "
                            f"{', '.join(keys)}" + (f" (did you mean {close[0]}?)" if close else ""))
        try:
            if head in ("grid", "search") and rest:
                section = out.get(head)
                if section is None:
                    section = out[head] = {}
                if not isinstance(section, dict):
                    raise ConfigError(f"{head}: is {section!r}, not a mapping of dimensions")
                section[rest] = value  # the dimension's key is `rest`, dots and all
            else:
                set_dotted(out, key, value)
        except ConfigError as err:
            raise SpecError(f"--set {item}: {err}") from None
        out["overrides"] = [*(out.get("overrides") or []), item]
    return out


def with_overrides(raw: dict, items: list[str] | tuple, source: str, name: str | None = None) -> StudySpec:
    """The spec of RAW with `--set` ITEMS applied and, with NAME, renamed; validated. An error that is
    about one of the items' keys names that item, else every item given."""
    items = list(items)
    out = apply_overrides(raw, items)
    if name is not None:
        out["name"] = name
    try:
        return StudySpec.from_dict(out, source=source)
    except SpecError as err:
        if not items:
            raise
        raise SpecError(_blame(str(err), items)) from None


def _blame(message: str, items: list[str]) -> str:
    """`--set ITEM: message` for the item whose key the message is about (the longest such key)."""
    def keys(item: str) -> list[str]:
        key = item.split("=", 1)[0].strip()
        head, _, rest = key.partition(".")
        return [key] + ([rest] if head == "base" and rest else [])

    found = [(len(k), item) for item in items for k in keys(item)
             if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
    if found:
        return f"--set {max(found)[1]}: {message}"
    return f"{message} (with --set {' --set '.join(items)})"


# --------------------------------------------------------------------------------------------------
# Parsing


TOP_KEYS = [f.name for f in dataclasses.fields(StudySpec) if f.name not in ("raw", "source", "_base_error")]


def _parse(raw: Any, source: str) -> StudySpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a mapping with name, kind, base, grid or search")
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(TOP_KEYS)})"
            raise SpecError(f"{source}: {key}: unknown key{hint}")
    for key in ("name", "kind"):
        if key not in raw:
            raise SpecError(f"{source}: {key}: missing (every spec has a name and a kind: grid or tune)")
    simple = {k: raw[k] for k in ("name", "kind", "objective", "budget", "sampler", "pruner", "heartbeat",
                                  "description", "keep_models") if k in raw}
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SpecError(f"{source}: overrides: expected a list of KEY=VALUE strings (what --set recorded), "
                        f"got {overrides!r}")
    spec = build(_Header, simple, "")
    _check_header(spec, source)
    base = {} if raw.get("base") is None else raw["base"]
    if not isinstance(base, dict):
        raise SpecError(f"{source}: base: expected a mapping (a TrainConfig), got {base!r}")
    grid = {} if raw.get("grid") is None else raw["grid"]
    if not isinstance(grid, dict):
        raise SpecError(f"{source}: grid: expected a mapping of dotted keys to lists, got {grid!r}")
    grid = {str(k): v for k, v in grid.items()}
    seeds = raw.get("seeds")
    if SEED_KEY in grid:
        if seeds is not None:
            raise SpecError(f"{source}: grid.seed: give the seeds once, under seeds: [...]")
        seeds = grid.pop(SEED_KEY)
    if seeds is None:
        try:
            seeds = [coerce(int, base.get(SEED_KEY, 0), f"base.{SEED_KEY}")]
        except ConfigError as err:
            raise SpecError(f"{source}: {err}") from None
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise SpecError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{source}: seeds: lists a seed twice")
    search = {} if raw.get("search") is None else raw["search"]
    if not isinstance(search, dict):
        raise SpecError(f"{source}: search: expected a mapping of dotted keys to {{low, high[, log]}} or "
                        f"{{choices: [...]}}, got {search!r}")
    if SEED_KEY in search:
        raise SpecError(f"{source}: search.seed: a tune study trains one seed per trial; give it under seeds: [N]")
    for section, keys in (("grid", grid), ("search", search)):
        for key in keys:
            if any(not part.strip() for part in str(key).split(".")):
                raise SpecError(f"{source}: {section}.{key}: empty part in the dotted key (write e.g. optim.lr)")
    search = {str(k): _parse_dim(f"search.{k}", v, source) for k, v in search.items()}
    base_from = raw.get("base_from")
    if base_from is not None:
        base_from = build(BaseFrom, base_from, "base_from.")
    return StudySpec(name=spec.name, kind=spec.kind, objective=spec.objective, base=base, grid=grid, search=search,
                     seeds=seeds, budget=spec.budget, sampler=spec.sampler, pruner=spec.pruner,
                     heartbeat=spec.heartbeat, base_from=base_from, description=spec.description,
                     keep_models=spec.keep_models, overrides=list(overrides), raw=copy.deepcopy(raw), source=source)


@dataclass
class _Header:
    name: str
    kind: Literal["grid", "tune"]
    objective: Objective = field(default_factory=Objective)
    budget: int | None = None
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    heartbeat: HeartbeatSpec = field(default_factory=HeartbeatSpec)
    description: str = ""
    keep_models: int | None = None


def _parse_dim(key: str, raw: Any, source: str) -> Range | Choices:
    if isinstance(raw, list):
        raw = {"choices": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: {key}: expected {{low, high[, log]}} or {{choices: [...]}}, got {raw!r}")
    if "choices" in raw:
        dim = build(Choices, raw, key + ".")
        if not dim.choices:
            raise SpecError(f"{source}: {key}.choices: must not be empty")
        encoded = [json.dumps(encode(c)) for c in dim.choices]
        if len(set(encoded)) != len(encoded):
            raise SpecError(f"{source}: {key}.choices: lists a value twice")
        return dim
    dim = build(Range, raw, key + ".")
    if not raw.get("int") and all(isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool)
                                  for k in ("low", "high")):
        dim.int = True
    if dim.low >= dim.high:
        raise SpecError(f"{source}: {key}: low ({dim.low}) must be below high ({dim.high})")
    if dim.log and dim.low <= 0:
        raise SpecError(f"{source}: {key}.low: a log range needs low > 0, got {dim.low}")
    if dim.log and dim.step is not None:
        raise SpecError(f"{source}: {key}.step: Optuna does not combine step with log")
    if dim.step is not None and dim.step <= 0:
        raise SpecError(f"{source}: {key}.step: must be positive, got {dim.step}")
    if dim.int:  # Optuna's suggest_int: integer bounds and step
        for name in ("low", "high", "step"):
            value = getattr(dim, name)
            if value is not None and not float(value).is_integer():
                raise SpecError(f"{source}: {key}.{name}: an integer range (int: true) needs an integer, got {value}")
    return dim


def _check_header(spec: "_Header", source: str) -> None:
    """Bounds Optuna would only enforce when the study starts (a traceback then)."""
    checks = [
        (spec.sampler.n_startup_trials >= 0, "sampler.n_startup_trials", "must be >= 0"),
        (spec.pruner.n_startup_trials >= 0, "pruner.n_startup_trials", "must be >= 0"),
        (spec.pruner.n_warmup_steps >= 0, "pruner.n_warmup_steps", "must be >= 0"),
        (spec.pruner.interval_steps >= 1, "pruner.interval_steps", "must be >= 1"),
        (spec.heartbeat.interval >= 1, "heartbeat.interval", "must be >= 1 (seconds)"),
        (spec.heartbeat.grace >= 1, "heartbeat.grace", "must be >= 1 (seconds)"),
        (spec.heartbeat.max_retry >= 0, "heartbeat.max_retry", "must be >= 0"),
        (spec.keep_models is None or spec.keep_models >= 0, "keep_models",
         "must be >= 0 (the best k trials keep their model; omit it to keep every trial's)"),
    ]
    for ok, key, reason in checks:
        if not ok:
            raise SpecError(f"{source}: {key}: {reason}")


def _metric_check(metric: str, where: str) -> None:
    """A name that no config reports (a typo, or a metric of another tool); whether this study's configs
    report it is checked with them (StudySpec._check_reported)."""
    if metric in KNOWN_METRICS:
        return
    close = difflib.get_close_matches(metric, KNOWN_METRICS, n=1, cutoff=0.6)
    central, engine = metrics_for("centralized"), metrics_for("local")
    controlled = [a for a in ALGORITHMS if set(metrics_for(a)) > set(engine)]
    raise SpecError(f"{where}: objective.metric: unknown metric {metric!r}"
                    + (f" (did you mean {close[0]}?)" if close else "")
                    + f"; a run reports {', '.join(central)}; a K-worker run (distributed.algorithm other than "
                    f"centralized) also {', '.join(m for m in engine if m not in central)}; "
                    f"{' and '.join(controlled)} also "
                    f"{', '.join(m for m in KNOWN_METRICS if m not in engine)}")


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _product_size(dims: dict[str, list]) -> int:
    n = 1
    for values in dims.values():
        n *= len(values)
    return n


# --------------------------------------------------------------------------------------------------
# Values: Optuna stores str/int/float/bool/None; sub-configs and lists travel as canonical JSON strings.


def encode(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # keys of mixed types, or YAML values JSON lacks (dates): as strings
        return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), default=str)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def value_label(value: Any) -> str:
    """A sub-config is named by its `name` (an optimizer preset) or written compactly."""
    if isinstance(value, dict):
        if "name" in value:
            rest = ",".join(f"{k}={v}" for k, v in value.items() if k != "name")
            return f"{value['name']}({rest})" if rest else str(value["name"])
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if not isinstance(value, list) else json.dumps(value)


def identity(spec: StudySpec) -> dict[str, Any]:
    """What decides a study's trials: two specs with the same identity can share one Optuna study."""
    inherited = spec.base_from and {"study": spec.base_from.study, "keys": spec.base_from.keys}
    return flatten({"kind": spec.kind, "objective": dataclasses.asdict(spec.objective), "base": spec.base,
                    "grid": {k: [encode(v) for v in vs] for k, vs in spec.grid.items()},
                    "search": {k: dataclasses.asdict(v) for k, v in spec.search.items()},
                    "seeds": spec.seeds, "base_from": inherited or None})


def changed_keys(old: StudySpec, new: StudySpec) -> list[str]:
    a, b = identity(old), identity(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def overlay(params: dict[str, Any], keys: list[str] | None) -> dict[str, Any]:
    """The part of another study's best params that `base_from` takes."""
    chosen = {k: v for k, v in params.items() if k != SEED_KEY}
    if keys is not None:
        missing = [k for k in keys if k not in chosen]
        if missing:
            raise SpecError(f"base_from.keys: {', '.join(missing)} not among the other study's parameters "
                            f"({', '.join(chosen) or 'none'})")
        chosen = {k: chosen[k] for k in keys}
    return chosen

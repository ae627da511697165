"""Registries: the names a config key accepts, what each name builds, and a one-line summary of it.

A registry maps a name to a target `"package.module:attr"` that is imported only when the name is
built. Invariant: importing this module, and checking a value against a registry, imports no torch,
because validating a config or a study spec must not pay torch's import. The same entries give:
- the choices of a config field: `name: Annotated[str, OPTIMIZERS]` (`trainers.config.coerce` asks the
  registry, so an unknown value is `optim.name: unknown value 'lamd'; choose one of sgdm, adamw, lars,
  lamb (did you mean 'lamb'?)`), checked without importing the target;
- the factory that builds it: `OPTIMIZERS.load(cfg.name)`;
- the README's cell for that key: `OPTIMIZERS.markdown()`; tests/test_registries.py compares README.md
  with it and prints the expected row when they differ.

Adding an optimizer, model, dataset or K-worker algorithm is a module of its own plus one `register` line
here (and, for options of its own, a config section). Besides fixed names a registry may accept open
forms (`Form`), e.g. `torchvision/<builder>`: checked here by shape only, and in full by their target
when built.
"""
from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:attr[.attr]", imported by `Registry.load`
    summary: str  # one line of Markdown: the README's text for this name
    tags: frozenset[str] = frozenset()  # properties validation asks about without importing the target


@dataclass(frozen=True)
class Form:
    """An open family of names, e.g. `torchvision/<builder>`: `claim` (a regex matched at the start)
    says a value means this form, `valid` (matched in full) says it is well formed."""

    form: str  # how the docs and error hints write it
    claim: str
    valid: str
    example: str
    target: str
    summary: str

    def claims(self, value: str) -> bool:
        return re.match(self.claim, value) is not None


class Registry:
    """The values of one config key: named entries, in registration order, then open forms."""

    def __init__(self, key: str):
        self.key = key  # the dotted config key whose values these are, for error messages
        self._entries: dict[str, Entry] = {}
        self._forms: list[Form] = []

    def register(self, name: str, target: str, summary: str, tags: tuple[str, ...] = ()) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        _split_target(target)
        self._entries[name] = entry = Entry(name, target, summary, frozenset(tags))
        return entry

    def register_form(self, form: Form) -> Form:
        _split_target(form.target)
        self._forms.append(form)
        return form

    # -- reading ---------------------------------------------------------------------------------------

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def tagged(self, tag: str) -> tuple[str, ...]:
        """The names registered with `tag`, in order (e.g. the algorithms that average parameters)."""
        return tuple(name for name, e in self._entries.items() if tag in e.tags)

    def choices(self) -> tuple[str, ...]:
        """Names, then forms as written in the docs: what an error hint offers."""
        return self.names() + tuple(f.form for f in self._forms)

    def entries(self) -> tuple[Entry | Form, ...]:
        return tuple(self._entries.values()) + tuple(self._forms)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, value: object) -> bool:
        return self.problem(value) is None

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self.choices())})"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not a valid choice (without the key), or None when it is one."""
        if isinstance(value, str):
            if value in self._entries:
                return None
            for form in self._forms:
                if form.claims(value):
                    if re.fullmatch(form.valid, value):
                        return None
                    return f"{value!r} is not of the form {form.form} (e.g. {form.example})"
        close = difflib.get_close_matches(str(value), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown value {value!r}; choose one of {', '.join(self.choices())}{hint}"

    def check(self, value: Any, key: str | None = None) -> str:
        """`value` if valid, else ConfigError `KEY: <problem>`; how `trainers.config.coerce` uses it."""
        why = self.problem(value)
        if why is not None:
            from .config import ConfigError  # config imports this module: import at call time

            raise ConfigError(f"{key or self.key}: {why}")
        return value

    def load(self, value: str) -> Any:
        """The target of `value` (a registered name or a form), imported now."""
        self.check(value)
        entry = self._entries.get(value) or next(f for f in self._forms if f.claims(value))
        return resolve(entry.target)

    def markdown(self) -> str:
        """The README's cell for this key: every name with its summary, in registration order."""
        return ", ".join(f"`{e.name if isinstance(e, Entry) else e.form}` ({e.summary})" for e in self.entries())


def _split_target(target: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":")
    if not (sep and module and attr):
        raise ValueError(f"target {target!r}: expected 'package.module:attr'")
    return module, attr


def resolve(target: str) -> Any:
    """Import `package.module:attr[.attr...]` and return the attribute."""
    module, attr = _split_target(target)
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------
# The catalogue. Each target's protocol is in the docstring of the package that builds it.

# A factory (param_groups, cfg: OptimConfig, lr, stacked) -> torch.optim.Optimizer; see trainers/optim/.
OPTIMIZERS = Registry("optim.name")
OPTIMIZERS.register("sgdm", "trainers.optim.sgdm:build", "SGD with momentum, coupled weight decay")
OPTIMIZERS.register("adamw", "trainers.optim.adamw:build", "AdamW, decoupled weight decay")
OPTIMIZERS.register("lars", "trainers.optim.lars:build", "You et al. 2017, Alg. 1")
OPTIMIZERS.register("lamb", "trainers.optim.lamb:build", "You et al. 2020, Alg. 2")

# A factory (cfg: ModelConfig, channels, image_size, classes) -> nn.Module; see trainers/models/.
MODELS = Registry("model.name")
MODELS.register("lenet5", "trainers.models.lenet:build",
                "Poiatti et al.'s, after Hsu et al. 2020: 64/64 channels, 384/192 units")
MODELS.register("lenet5-classic", "trainers.models.lenet:build_classic", "LeCun's widths: 6/16, 120/84")
MODELS.register("resnet", "trainers.models.resnet:build", "ResNet-8 with BatchNorm; `model.width` = first stage")
MODELS.register_form(Form(
    "torchvision/<builder>", claim=r"torchvision/", valid=r"torchvision/\w+", example="torchvision/resnet18",
    target="trainers.models.external:torchvision_model",
    summary="a torchvision classification model, e.g. `torchvision/resnet18`: untrained, with the dataset's "
            "classes and channels"))
_IDENT = r"[A-Za-z_]\w*"
MODELS.register_form(Form(
    "package.module:callable", claim=r"[^/]*:", valid=rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*",
    example="mymodels.nets:tiny_cnn", target="trainers.models.external:user_model",
    summary="your own: called as `callable(channels, image_size, num_classes)`, returns an `nn.Module`"))

# A loader (cfg: DataConfig, log) -> trainers.data.Loaded; see trainers/data/.
DATASETS = Registry("data.dataset")
DATASETS.register("fashion-mnist", "trainers.data.torchvision_sets:FASHION_MNIST.load", "1x28x28, 10 classes")
DATASETS.register("cifar10", "trainers.data.torchvision_sets:CIFAR10.load", "3x32x32, 10 classes")
DATASETS.register("cifar100", "trainers.data.torchvision_sets:CIFAR100.load", "3x32x32, 100 classes")
DATASETS.register("synthetic", "trainers.data.synthetic:load", "generated, any shape: `data.synthetic.*`")

# A class (engine: engine.WorkerRunner) -> distributed.base.Algorithm; see trainers/distributed/. Tags:
# "averaging": parameters averaged every few steps (SlowMo applies); "controlled": the period adapts
# (the run reports `local_steps`).
ALGORITHMS = Registry("distributed.algorithm")
ALGORITHMS.register("centralized", "trainers.runner:CentralizedRunner", "one model, one optimizer (the default)")
ALGORITHMS.register("minibatch", "trainers.distributed.minibatch:Minibatch",
                    "gradients averaged every step: synchronous SGD (FULLSGD)")
ALGORITHMS.register("local", "trainers.distributed.local:Local",
                    "parameters averaged every J local steps: Local SGD (CPSGD)", tags=("averaging",))
ALGORITHMS.register("post-local", "trainers.distributed.post_local:PostLocal",
                    "minibatch until switch_epoch, then local (post-local SGD)", tags=("averaging",))
ALGORITHMS.register("dynamic-local", "trainers.distributed.dynamic_local:DynamicLocal",
                    "local with J_t from the workers' gradient statistics", tags=("averaging", "controlled"))
ALGORITHMS.register("adaptive-local", "trainers.distributed.adaptive_local:AdaptiveLocal",
                    "local with ADPSGD's period from the parameter spread", tags=("averaging", "controlled"))
ALGORITHMS.register("decentralized", "trainers.distributed.decentralized:Decentralized",
                    "gossip with graph neighbours every step (DPSGD)")
ALGORITHMS.register("diloco", "trainers.distributed.diloco:DiLoCo",
                    "H inner steps, then an outer Nesterov SGD step on the pseudo-gradient")

# A function building the doubly stochastic mixing matrix; see trainers/distributed/decentralized.py.
TOPOLOGIES = Registry("distributed.topology")
TOPOLOGIES.register("ring", "trainers.algorithms:ring_matrix", "each worker with its left and right neighbours")
TOPOLOGIES.register("random", "trainers.algorithms:matching_matrix", "a random perfect matching per step")
TOPOLOGIES.register("exponential", "trainers.algorithms:exponential_matrix",
                    "one peer 2^t places ahead, t cycling: SGP's one-peer exponential graph")

# A backend class stepping the workers; see trainers/engine.py.
BACKENDS = Registry("distributed.backend")
BACKENDS.register("serial", "trainers.engine:SerialBackend", "K model copies, the reference")
BACKENDS.register("vmap", "trainers.engine:VmapBackend", "one batched `torch.func.vmap` step: the GPU path")
BACKENDS.register("dist", "trainers.engine:SerialBackend", "one process per worker under `torch.distributed`: gloo on CPU, NCCL with one GPU per process")


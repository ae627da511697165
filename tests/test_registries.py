"""The registries (trainers/registry.py): the README lists exactly their names, the config takes its choices
from them, every target imports, and the mechanism's messages."""
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from trainers.config import ConfigError, TrainConfig
from trainers.registry import (ALGORITHMS, BACKENDS, DATASETS, MODELS, OPTIMIZERS, TOPOLOGIES, Entry, Form, Registry,
                               resolve)

README = Path(__file__).resolve().parents[1] / "README.md"

# Where the README lists each registry's names. Add a registry here when it gets one:
# - KEY_ROWS: a row of a config-key table (`| \`KEY\` [default] | \`name\` (summary), ... |`); the names are
#   the backticked words outside parentheses, in order, and each `name` (summary) is the registry's.
# - NAME_TABLES: a table of its own whose first header cell is the given word, one name per row
#   (`| \`name\` | summary |`).
KEY_ROWS: dict[str, Registry] = {
    "optim.name": OPTIMIZERS,
    "model.name": MODELS,
    "data.dataset": DATASETS,
    "distributed.topology": TOPOLOGIES,
    "distributed.backend": BACKENDS,
}
NAME_TABLES: dict[str, Registry] = {
    "algorithm": ALGORITHMS,
}


# --------------------------------------------------------------------------------------------------
# Reading the README's tables


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def key_rows() -> dict[str, tuple[str, str]]:
    """`KEY` -> (the key cell, the meaning cell), for every table row whose first cell starts with a key."""
    rows = {}
    for line in README.read_text().splitlines():
        if line.startswith("| `"):
            key_cell, meaning = cells(line)[:2]
            rows[re.match(r"`([^`]+)`", key_cell).group(1)] = (key_cell, meaning)
    return rows


def name_table(header: str, text: str | None = None) -> list[tuple[str, str]]:
    """The (name, summary) rows of the table whose first header cell is `header`."""
    lines = (README.read_text() if text is None else text).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and cells(line)[0] == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                name, summary = cells(row)[:2]
                rows.append((name.strip("`"), summary))
            return rows
    raise AssertionError(f"README.md has no table headed `| {header} |`")


def listed_names(cell: str) -> list[str]:
    """The backticked words of `cell` outside parentheses (a summary's own backticks are skipped)."""
    names, depth, code, start = [], 0, False, 0
    for i, ch in enumerate(cell):
        if ch == "`":
            if code and depth == 0:
                names.append(cell[start:i])
            code, start = not code, i + 1
        elif not code and ch in "()":
            depth += 1 if ch == "(" else -1
    return names


def test_the_readers_read_the_formats():
    cell = "`a` (one `x` (nested `y`)), `b-c` (`f(x)`), `d/<e>`; see `z` (`w`)"
    assert listed_names(cell) == ["a", "b-c", "d/<e>", "z"]
    text = "intro\n\n| thing | what |\n|---|---|\n| `a` | one |\n| `b-c` | two, `x` |\n\nafter\n"
    assert name_table("thing", text) == [("a", "one"), ("b-c", "two, `x`")]


# --------------------------------------------------------------------------------------------------
# README <-> registries


def default_of(key: str):
    return TrainConfig().flat()[key]


@pytest.mark.parametrize("key", list(KEY_ROWS))
def test_readme_row_lists_exactly_the_registry(key):
    registry = KEY_ROWS[key]
    rows = key_rows()
    assert key in rows, f"README.md has no config-key row for `{key}`; add:\n| `{key}` [{default_of(key)}] | " \
                        f"{registry.markdown()} |"
    key_cell, meaning = rows[key]
    expected = f"the row should read:\n| `{key}` [{default_of(key)}] | {registry.markdown()} |"
    assert listed_names(meaning) == list(registry.choices()), expected
    for entry in registry.entries():
        name = entry.name if isinstance(entry, Entry) else entry.form
        assert f"`{name}` ({entry.summary})" in meaning, expected
    assert f"[{default_of(key)}]" in key_cell, expected


def test_readme_tables_list_exactly_their_registries():
    for header, registry in NAME_TABLES.items():
        expected = "\n".join(f"| `{e.name}` | {e.summary} |" for e in registry.entries())
        assert name_table(header) == [(e.name, e.summary) for e in registry.entries()], \
            f"the `| {header} |` table's rows should read:\n{expected}"


# --------------------------------------------------------------------------------------------------
# Config <-> registries


def field_type(key: str):
    """The annotation of dotted config key `key` (with its Annotated metadata)."""
    cls, *path, last = [TrainConfig, *key.split(".")]
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls, include_extras=True)[last]


def field_choices(key: str) -> tuple[str, ...]:
    """The values config key `key` accepts: its registry's names, or its Literal's values."""
    tp = field_type(key)
    registries = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Registry)]
    return registries[0].names() if registries else typing.get_args(tp)


@pytest.mark.parametrize("key", list(KEY_ROWS))
def test_config_takes_its_choices_from_the_registry(key):
    registry = KEY_ROWS[key]
    assert registry.key == key
    assert registry in field_type(key).__metadata__
    assert default_of(key) in registry.names()
    for name in registry.names():
        assert TrainConfig.from_dict({}, {key: name}).flat()[key] == name


def test_shard_modes_are_the_choices_of_distributed_shards():
    from trainers.data import SHARD_MODES

    assert set(SHARD_MODES) == set(field_choices("distributed.shards"))


@pytest.mark.parametrize("registry", [OPTIMIZERS, MODELS, DATASETS], ids=lambda r: r.key)
def test_every_target_imports_and_is_callable(registry):
    for entry in registry.entries():
        assert callable(resolve(entry.target)), entry


def test_validating_registered_names_imports_no_torch():
    script = (
        "import sys\n"
        "from trainers.config import TrainConfig, ConfigError\n"
        "TrainConfig.from_dict({'model': {'name': 'torchvision/resnet18'}, 'optim': {'name': 'lars'},\n"
        "                       'data': {'dataset': 'cifar100'}})\n"
        "TrainConfig.from_dict({'model': {'name': 'mypkg.nets:tiny_cnn'}})\n"
        "try:\n"
        "    TrainConfig.from_dict({'optim': {'name': 'lamd'}})\n"
        "except ConfigError:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Error messages


@pytest.mark.parametrize("key, value, message", [
    ("optim.name", "lamd",
     "optim.name: unknown value 'lamd'; choose one of sgdm, adamw, lars, lamb (did you mean 'lamb'?)"),
    ("optim.name", 3, "optim.name: unknown value 3; choose one of sgdm, adamw, lars, lamb"),
    ("model.name", "resnt", "model.name: unknown value 'resnt'; choose one of lenet5, lenet5-classic, resnet, "
                            "torchvision/<builder>, package.module:callable (did you mean 'resnet'?)"),
    ("model.name", "torchvision/", "model.name: 'torchvision/' is not of the form torchvision/<builder> "
                                   "(e.g. torchvision/resnet18)"),
    ("model.name", "my-models:net", "model.name: 'my-models:net' is not of the form package.module:callable "
                                    "(e.g. mymodels.nets:tiny_cnn)"),
    ("data.dataset", "cifar", "data.dataset: unknown value 'cifar'; choose one of fashion-mnist, cifar10, "
                              "cifar100, synthetic (did you mean 'cifar10'?)"),
])
def test_config_errors_come_from_the_registry(key, value, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({}, {key: value})
    assert str(err.value) == message


def test_building_an_unvalidated_name_is_the_same_config_error():
    """A config made by hand skips validation; the factory lookup gives the validation's message."""
    with pytest.raises(ConfigError, match=r"^optim.name: unknown value 'adagrad'; choose one of sgdm"):
        OPTIMIZERS.load("adagrad")


def test_registry_mechanism():
    reg = Registry("widget.kind")
    reg.register("round", "os.path:join", "a round one", tags=("smooth",))
    reg.register("oval", "os.path:join", "an oval one", tags=("smooth", "long"))
    reg.register_form(Form("plugin/<name>", claim=r"plugin/", valid=r"plugin/\w+", example="plugin/x",
                           target="os.path:basename", summary="a plug-in"))
    assert reg.names() == ("round", "oval") and reg.choices() == ("round", "oval", "plugin/<name>")
    assert reg.tagged("smooth") == ("round", "oval") and reg.tagged("long") == ("oval",)
    assert "round" in reg and "plugin/abc" in reg and "plugin/" not in reg and "square" not in reg
    assert reg.check("plugin/abc", "w") == "plugin/abc"
    assert reg.problem("rund") == "unknown value 'rund'; choose one of round, oval, plugin/<name> " \
                                 "(did you mean 'round'?)"
    import os.path

    assert reg.load("round") is os.path.join and reg.load("plugin/abc") is os.path.basename
    assert reg.markdown() == "`round` (a round one), `oval` (an oval one), `plugin/<name>` (a plug-in)"
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("round", "os:getcwd", "again")
    with pytest.raises(ValueError, match="expected 'package.module:attr'"):
        reg.register("square", "os.getcwd", "no colon")

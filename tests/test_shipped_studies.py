"""Every spec in studies/ and studies/cpu/ starts: `study run SPEC --n-trials 0` creates the study, queues its points and
opens its parent run (a spec that takes its base from another study says that study has no result yet)."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from sweeper.cli import main

STUDIES = sorted((ROOT / "studies").glob("*.yaml")) + sorted((ROOT / "studies" / "cpu").glob("*.yaml"))


@pytest.mark.slow
def test_every_shipped_spec_starts(workdir):
    cli = CliRunner()
    for path in STUDIES:
        result = cli.invoke(main, ["study", "run", str(path), "--n-trials", "0"])
        if "base_from" in Path(path).read_text():
            assert result.exit_code == 2 and ("has no completed trial yet" in result.output
                                              or "no study named" in result.output), (path, result.output)
            continue
        assert result.exit_code == 0 and "is ready:" in result.output, (path, result.output)

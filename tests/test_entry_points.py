"""Every `python -m helpers.*` entry point answers --help with its parameters and exit status 0."""

import importlib

import pytest

ENTRY_POINTS = ["pipeline", "train", "report", "bench", "proof", "data.download", "data.synthetic"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_exits_0_and_lists_the_parameters(name, capsys):
    module = importlib.import_module(f"helpers.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.startswith("usage:") and "--" in printed


def test_train_help_lists_every_parameter_of_a_task_with_its_meaning(capsys):
    from helpers.config import RetrievalConfig
    from helpers.train import main

    with pytest.raises(SystemExit) as done:
        main(["T4", "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for field in ("cls_budget_s", "emb_budget_s", "miner", "num_workers"):
        assert f"--{field} (default " in printed
    assert "--emb_budget_s (default 0.0): > 0: each stage-2 run" in printed
    assert printed.count("\n  --") >= len(RetrievalConfig.__dataclass_fields__) - 2  # (task and profile are not parameters)


def test_the_licence_and_citation_are_there_and_agree():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    citation = (root / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation and "license: MIT" in citation
    assert 'license = { text = "MIT" }' in (root / "pyproject.toml").read_text()

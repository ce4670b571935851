"""Static checks of the committed notebooks (they are executed by `pytest --nbval-lax notebooks/`)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_all_six_notebooks_exist():
    assert [p.stem.split("_")[0] for p in NOTEBOOKS] == ["E1", "E2", "T1", "T2", "T3", "T4"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean_with_one_parameters_cell(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3" and nb["metadata"]["language_info"]["name"] == "python"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), "commit notebooks without outputs"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert "colab-install" in code[0]["metadata"].get("tags", []), "first the Colab install cell (tests/test_colab.py)"
    assert len(tagged) == 1 and tagged[0] is code[1], "exactly one parameters cell, the first code cell after it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_flat_plain_values(path):
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    names = []
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), (
            f"only annotated assignments in the parameters cell (the configuration reads the annotated names): {ast.unparse(node)}"
        )
        ast.literal_eval(node.value)  # plain values only: nothing derived, no calls
        names.append(node.target.id)
    assert names[:2] == ["profile", "data_dir"] and "device" in names and "seed" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_configuration_is_built_from_the_parameters_cell_alone(path):
    """Adding a parameter is the field and the parameters cell: the next cell passes every
    declared name (Config.from_parameters), and each is a field of the task's configuration."""
    from IPython.core.interactiveshell import InteractiveShell

    from helpers.config import config_class

    task = path.stem.split("_")[0]
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    params, config_cell = "".join(cells[1]["source"]), "".join(cells[2]["source"])
    assert f'.from_parameters("{task}", globals())' in config_cell
    shell = InteractiveShell.instance()
    shell.user_ns.pop("__annotations__", None)
    shell.run_cell(params).raise_error()
    shell.run_cell("seed = 7").raise_error()  # as papermill injects a value after the cell
    declared = dict(shell.user_ns["__annotations__"])
    fields = {f.name for f in dataclasses.fields(config_class(task))}
    assert declared and set(declared) <= fields, f"not fields: {sorted(set(declared) - fields)}"
    cfg = config_class(task).from_parameters(task, shell.user_ns)
    assert cfg.seed == 7 and cfg.task == task


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_training_loop_or_metric_code_in_notebooks(path):
    source = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    for forbidden in (".backward(", "zero_grad(", ".step(", "DataLoader(", "cross_entropy(", "torch.topk", "argsort("):
        assert forbidden not in source, f"{forbidden!r} belongs in helpers/, not in a notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(path):
    import papermill

    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = [
        n.targets[0].id if isinstance(n, ast.Assign) else n.target.id for n in ast.parse("".join(cell["source"])).body
    ]
    assert list(papermill.inspect_notebook(str(path))) == assigned, (
        "papermill --help-notebook must list every parameter"
    )


def test_t4_and_e1_expose_p_and_k():
    import papermill

    params = papermill.inspect_notebook(str(next(p for p in NOTEBOOKS if p.stem.startswith("T4"))))
    assert {"pk_classes", "pk_images"} <= set(params)
    e1 = papermill.inspect_notebook(str(next(p for p in NOTEBOOKS if p.stem.startswith("E1"))))
    assert {"pk_classes", "pk_images"} <= set(e1), "E1 too: its P x K message names them"

"""The shared experiment layer and the layering rules: task modules never import each other,
notebooks import only their own task module, one configuration source per training stage."""

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from helpers.config import LayerwiseConfig, RecognitionConfig, RetrievalConfig
from helpers.engine import FitConfig, fit
from helpers.experiment import RunSummary, T3Selection, locate_data, resolve_data_path, save_metrics
from helpers.runinfo import PROFILES, Runtime, generated_data_dir

ROOT = Path(__file__).resolve().parents[1]
TASK_MODULES = {"recognition", "retrieval", "layerwise"}
NOTEBOOK_TASK = {
    "T1": "recognition",
    "T2": "recognition",
    "T3": "recognition",
    "E1": "recognition",
    "T4": "retrieval",
    "E2": "layerwise",
}


def helpers_imports(source: str) -> set[str]:
    """Every helpers.<module> a source imports, at any depth (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
    return found


def test_no_task_module_imports_another():
    for name in TASK_MODULES:
        imported = helpers_imports((ROOT / "helpers" / f"{name}.py").read_text())
        assert not imported & (TASK_MODULES - {name}), f"helpers/{name}.py imports {imported & TASK_MODULES}"
    shared = ("experiment", "config", "engine", "evaluation", "runinfo", "plots", "report")
    for name in shared:
        imported = helpers_imports((ROOT / "helpers" / f"{name}.py").read_text())
        assert not imported & TASK_MODULES, (
            f"the shared helpers/{name}.py imports the task module(s) {imported & TASK_MODULES}"
        )


LAYERS = {  # the README's layout: a module imports only its own layer and those above it
    "runinfo": 0,
    "atomic": 0,
    "errors": 0,
    "lock": 0,
    "tasks": 0,
    "colab": 0,
    "distributed": 0,
    "data": 0,
    "models": 0,
    "objectives": 0,
    "losses": 0,
    "miners": 0,
    "metrics": 0,
    "engine": 1,
    "board": 1,
    "fit_config": 1,
    "optim": 1,
    "checkpoint": 1,
    "console": 1,
    "evaluation": 1,
    "budget": 1,
    "budget_split": 1,
    "precision": 1,
    "memory": 1,
    "config": 2,
    "experiment": 2,
    "recognition": 2,
    "retrieval": 2,
    "layerwise": 2,
    "plots": 3,
    "report": 3,
    "pipeline": 3,
    "execution": 3,
    "plan": 3,
    "bench": 3,
    "peer": 3,
    "proof": 3,
    "train": 3,
}


def test_every_module_imports_only_its_own_layer_and_those_above():
    modules = {p.stem: p for p in (ROOT / "helpers").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name: p for p in (ROOT / "helpers").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert set(modules) == set(LAYERS), "a new module needs its place in LAYERS (and in the README's layout)"
    for name, path in modules.items():
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        imported = set().union(*(helpers_imports(f.read_text()) for f in files)) - {name}
        below = {m for m in imported if LAYERS.get(m, -1) > LAYERS[name]}
        assert not below, f"helpers/{name} ({LAYERS[name]}) imports {below} from a lower layer"


def module_graph() -> dict[str, set[str]]:
    """{helpers module (dotted, packages included): the helpers modules it imports}, counting
    function-local and type-checking imports, and `from helpers.data import X` as the package."""
    paths = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "helpers").rglob("*.py")
    }
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import circle found in `graph` (["a", "b", "a"]), or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if circle := visit(imported):
                return circle
        path.pop()
        done.add(module)
        return None

    return next((circle for module in sorted(graph) if (circle := visit(module))), None)


def test_no_import_circles():
    graph = module_graph()
    assert {"helpers.engine", "helpers.data.images", "helpers.pipeline"} <= set(
        graph
    ) and "helpers.fit_config" in graph["helpers.optim"]
    circle = import_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_circle_check_sees_a_circle():
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b"}, "b": set()}) is None
    assert (
        import_circle({**module_graph(), "helpers.runinfo": {"helpers.pipeline"}}) is not None
    )  # the real graph, one edge added


def test_the_import_scan_sees_local_imports():
    assert helpers_imports("def f():\n    from helpers.recognition import load_metrics\n") == {"recognition"}
    assert helpers_imports("import helpers.retrieval as r\nfrom helpers import layerwise\n") == {
        "retrieval",
        "layerwise",
    }


def test_notebooks_import_their_own_task_module_only():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 6
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        imported = helpers_imports(source) & TASK_MODULES
        assert imported == {NOTEBOOK_TASK[path.stem[:2]]}, f"{path.name} imports {imported}"


def test_fit_reads_in_one_screen():
    assert len(inspect.getsource(fit).splitlines()) <= 80


# ------------------------------------------------------------------------------------ configuration


def test_every_stage_builds_its_fit_config_from_the_fields_it_reads():
    t4 = RetrievalConfig.build("T4", "smoke", device="cpu", emb_epochs=8, cls_lr=0.03, emb_lr=2e-4)
    classifier, embedding = t4.fit_config("classifier"), t4.fit_config("embedding")
    assert (classifier.lr, classifier.epochs, classifier.optimizer, classifier.monitor) == (
        0.03,
        t4.cls_epochs,
        t4.cls_optimizer,
        "",
    )
    assert (embedding.lr, embedding.epochs, embedding.weight_decay, embedding.warmup_epochs) == (
        2e-4,
        8,
        t4.emb_weight_decay,
        1.0,
    )
    e2 = LayerwiseConfig.build("E2", "smoke", device="cpu", epochs=10)
    pretrain, train = e2.fit_config("pretrain"), e2.fit_config("train")
    assert (
        pretrain.optimizer,
        pretrain.schedule,
        pretrain.min_lr_ratio,
        pretrain.warmup_epochs,
        pretrain.channels_last,
    ) == ("adam", "cosine", 0.1, 0.0, False)
    assert (train.monitor, train.warmup_epochs, train.channels_last) == ("heldout_top1", 1.0, False)
    t2 = RecognitionConfig.build("T2", "smoke", device="cpu", momentum=0.8, budget_s=5.0)
    assert t2.fit_config() == FitConfig(
        **{
            **dataclasses.asdict(FitConfig()),
            **{
                k: getattr(t2, k)
                for k in (
                    "epochs",
                    "optimizer",
                    "lr",
                    "momentum",
                    "weight_decay",
                    "schedule",
                    "warmup_epochs",
                    "label_smoothing",
                    "patience",
                    "precision",
                    "channels_last",
                    "compile",
                    "seed",
                    "eval_every",
                    "budget_s",
                )
            },
            "monitor": "heldout_top1",
        }
    )
    assert RetrievalConfig.build(
        "T4", "smoke", device="cpu", miner="xbm", ablation=("ms", "xbm", "none")
    ).miner_runs == ("xbm", "ms", "none")
    with pytest.raises(ValueError, match="stage='embedding' is not valid; choose one of train"):
        t2.fit_config("embedding")


def test_run_keys_hold_what_each_stage_reads():
    t4 = RetrievalConfig.build("T4", "smoke", device="cpu")
    key = {stage: t4.run_key(stage) for stage in ("classifier", "embedding")}
    assert (
        "alpha" not in key["classifier"] and "emb_lr" not in key["classifier"] and "cls_epochs" not in key["classifier"]
    )
    assert {"alpha", "emb_lr", "pk_images", "cls_lr", "cls_epochs"} <= set(key["embedding"]), (
        "stage 2 starts from stage 1"
    )
    assert "emb_epochs" not in key["embedding"], "the engine compares the length itself"
    assert not {"device", "miner", "ablation", "out_dir"} & set(key["embedding"]), "runtime settings"
    e2 = LayerwiseConfig.build("E2", "smoke", device="cpu")
    assert "use_unlabeled" in e2.run_key("pretrain") and not {"lr", "dropout"} & set(e2.run_key("pretrain"))
    assert {"use_unlabeled", "pretrain_lr", "pretrain_epochs", "dropout"} <= set(e2.run_key("train")), (
        "fine-tuning starts from pretraining"
    )
    assert not {"use_unlabeled", "pretrain_lr", "pretrain_epochs"} & set(
        e2.run_key("baseline")
    ) and "dropout" in e2.run_key("baseline")
    assert e2.fit_config("baseline") == e2.fit_config("train")
    assert "channels_last" not in dataclasses.asdict(e2), "E2's MLP has no channels_last setting"
    e1 = RecognitionConfig.build("E1", "smoke", device="cpu")
    center, triplet, plain = (set(e1.run_key(stage)) for stage in ("center", "triplet", "train"))
    assert {"center_weight", "center_lr"} <= center and not {"triplet_margin", "pk_classes", "embedding_dim"} & center
    assert {
        "triplet_margin",
        "pk_classes",
        "pk_images",
        "embedding_dim",
        "ncm_per_class",
    } <= triplet and "center_weight" not in triplet
    assert not {"center_weight", "triplet_margin", "pk_images"} & plain, (
        "E1's loss settings do not block the cross-entropy run"
    )


def test_presets_are_literal_data():
    """No preset is computed or mutated: the class attributes are plain dicts of plain values."""
    for cls in (RecognitionConfig, RetrievalConfig, LayerwiseConfig):
        for task, profiles in cls.PRESETS.items():
            assert set(profiles) == set(PROFILES), task
            for values in profiles.values():
                assert all(isinstance(v, (int, float, str, bool, tuple)) for v in values.values())
                assert set(values) <= {f.name for f in dataclasses.fields(cls)}, f"{task}: a preset names no field"
    source = inspect.getsource(RecognitionConfig)
    assert "PRESETS[" not in source, "presets are not patched after their definition"


# ------------------------------------------------------------------------------------ data


def test_locate_data_finds_each_layout(tiny_root, cars_devkit_root, cars_ml_root, stl10_root):
    assert locate_data(tiny_root.parent, "tiny") == (tiny_root, True)
    assert locate_data(tiny_root, "tiny") == (tiny_root, True), "the dataset folder itself"
    assert locate_data(cars_devkit_root.parent, "cars") == (cars_devkit_root, True)
    assert locate_data(cars_ml_root, "cars") == (cars_ml_root, True)
    assert locate_data(stl10_root.parent, "stl10") == (stl10_root, True)
    assert locate_data(stl10_root, "stl10") == (stl10_root, True)


def test_locate_data_points_at_the_expected_folder_when_nothing_is_there(tmp_path):
    assert locate_data(tmp_path, "tiny") == (tmp_path / "tiny-imagenet-200", False)
    assert locate_data(tmp_path, "cars") == (tmp_path / "stanford_cars", False)
    assert locate_data(tmp_path, "stl10") == (tmp_path / "stl10_binary", False)


def test_locate_data_generates_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPERS_DATA_DIR", str(tmp_path / "generated"))
    root, generated = locate_data(generated_data_dir(), "stl10")
    assert generated and (root / "train_X.bin").is_file() and root.parent == tmp_path / "generated"


def test_gpu_data_path_needs_cuda_in_every_task():
    assert resolve_data_path("auto", "cpu") == "cached" and resolve_data_path("auto", "cuda") == "gpu"
    assert resolve_data_path("lazy", "cuda") == "lazy"
    with pytest.raises(ValueError, match="data_path='gpu' needs device='cuda'"):
        resolve_data_path("gpu", "cpu")


def test_gpu_data_path_without_cuda_is_refused_for_cars(cars_devkit_root, tmp_path):
    from helpers.retrieval import build_cars196

    cfg = RetrievalConfig.build(
        "T4", "smoke", data_dir=str(cars_devkit_root), out_dir=str(tmp_path), device="cpu", data_path="gpu"
    )
    with pytest.raises(ValueError, match="data_path='gpu' needs device='cuda'"):
        build_cars196(cfg)


# ------------------------------------------------------------------------------------ records


def test_runtime_of_each_task():
    assert Runtime.of(RecognitionConfig.build("T2", "smoke", device="cpu", precision="fp16")) == Runtime(
        "cpu", "fp16", True
    )
    assert Runtime.of(LayerwiseConfig.build("E2", "smoke", device="cpu")) == Runtime("cpu", "fp32", False), (
        "auto is fp32 on the CPU"
    )
    x = torch.zeros(2, 3, 4, 4)
    assert Runtime("cpu", "fp32", True).prepare(x) is x, "channels_last acts on CUDA only"


def test_records_round_trip_through_the_metrics_json(tmp_path):
    cfg = RecognitionConfig.build("T3", "smoke", device="cpu", out_dir=str(tmp_path))
    history = [{"epoch": 1, "train_loss": 1.5}]
    training = {
        "epochs_planned": 1,
        "epochs_done": 1,
        "interrupted": False,
        "stopped_early": False,
        "resumed_from": None,
        "complete": True,
    }
    run = RunSummary(
        "T3_parallel",
        {"class": "ResNet", "cubs": "parallel"},
        1,
        1,
        training,
        2.0,
        {"wall": 3.0, "evaluation": 1.0},
        100.0,
        str(tmp_path / "best.pt"),
        {"top1": 0.5},
        {"top1": 0.4},
        history,
    )
    selection = T3Selection("held-out top-1", run.name, "parallel", run.checkpoint, "imagenet")
    assert T3Selection.load(tmp_path) is None, "T3 has not run"
    save_metrics("T3_cubs_resnet18", {"models": {run.name: run}, "selection": selection, "bonus": None}, cfg)
    document = json.loads((tmp_path / "metrics" / "T3_cubs_resnet18.json").read_text())
    assert document["complete"] and list(document["models"]["T3_parallel"])[:3] == [
        "name",
        "architecture",
        "best_epoch",
    ]
    assert RunSummary.from_dict(document["models"]["T3_parallel"]) == run and T3Selection.load(tmp_path) == selection
    partial = dataclasses.replace(run, training=training | {"complete": False, "interrupted": True})
    save_metrics("T3_cubs_resnet18", {"models": {run.name: partial}}, cfg)
    document = json.loads((tmp_path / "metrics" / "T3_cubs_resnet18.json").read_text())
    assert document["complete"] is False and document["partial"] == ["models.T3_parallel.training"]


def test_the_report_and_the_pipeline_name_the_same_notebooks():
    from helpers import pipeline, report

    assert report.NAMES == tuple(step.name for step in pipeline.STEPS)
    assert {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")} == set(report.NAMES)


def test_one_percentage_format():
    from helpers import plots, report

    assert (
        report.pct is plots.pct and plots.pct(0.4321) == "43.2%" and plots.pct(None) == plots.pct(float("nan")) == "n/a"
    )


@pytest.mark.parametrize(
    "files, cap",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 cores of quota -> 2
        ({"cpu.max": "50000 100000\n"}, 1),  # v2: half a core -> 1, never 0
        ({"cpu.max": "max 100000\n"}, None),  # v2: no quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1: 1 core
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1: no quota
        ({"cpu.max": "garbled"}, None),  # an unexpected format: the affinity alone
        ({}, None),  # no cgroup files (macOS, Windows)
    ],
)
def test_usable_cores_are_the_affinity_capped_by_a_container_quota(tmp_path, monkeypatch, files, cap):
    from helpers import runinfo

    monkeypatch.setattr(runinfo.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runinfo.usable_cores(tmp_path) == (8 if cap is None else cap)

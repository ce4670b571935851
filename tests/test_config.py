"""Parameter validation: types, ranges, list strings from papermill, limits of the data."""

import dataclasses
import typing

import pytest
from papermill.cli import _resolve_type

from helpers.config import LayerwiseConfig, RecognitionConfig, RetrievalConfig, parse_list
from helpers.recognition import build_tiny_imagenet
from helpers.retrieval import build_cars196

CONFIGS = {"T2": RecognitionConfig, "T4": RetrievalConfig, "E2": LayerwiseConfig}


def build(task, **params):
    return CONFIGS[task].build(task, "smoke", device="cpu", **params)


@pytest.mark.parametrize(
    "task,params,message",
    [
        ("T2", {"epochs": "three"}, "epochs='three' is not valid; expected a whole number >= 1"),
        ("T2", {"epochs": 2.5}, "epochs=2.5 is not valid; expected a whole number >= 1"),
        ("T2", {"lr": "fast"}, "lr='fast' is not valid; expected a finite number > 0"),
        ("T2", {"classes": -3}, "classes=-3 is not valid; expected a whole number >= 0"),
        ("T2", {"heldout_fraction": 1.0}, "heldout_fraction=1.0 is not valid; expected a finite number in [0, 1)"),
        ("T2", {"budget_s": float("inf")}, "budget_s=inf is not valid; expected a finite number >= 0"),
        ("T2", {"lr": _resolve_type("inf")}, "lr=inf is not valid; expected a finite number > 0"),
        ("T2", {"resume": "maybe"}, "resume='maybe' is not valid; expected True or False"),
        ("T2", {"precision": "fp8"}, "precision='fp8' is not valid; choose one of auto, bf16, fp16, fp32"),
        ("T2", {"stem": 3}, "stem=3 is not valid; choose one of small, imagenet"),
        (
            "T2",
            {"fashions": "diagonal"},
            "fashions='diagonal' is not valid; choose items from parallel, serial12, serial21",
        ),
        ("T4", {"pk_images": 1}, "pk_images=1 is not valid; expected a whole number >= 2"),
        ("T4", {"lam": 2}, "lam=2 is not valid; expected a finite number in [-1, 1]"),
        (
            "T4",
            {"ablation": '["ms", "hardest"]'},
            "choose items from none, ms, batch_hard, semi_hard, adaptive_ms, xbm",
        ),
        ("T4", {"image_size": 64, "resize": 56}, "image_size=64 is not valid; it must not exceed resize=56"),
        ("E2", {"hidden": "64,32"}, "hidden=(64, 32) is not valid; give at least 4 layer sizes"),
        ("E2", {"hidden": [64, 32, 16, 0]}, "hidden=[64, 32, 16, 0] is not valid; expected every item >= 1"),
        ("E2", {"hidden": "wide"}, "hidden='wide' is not valid; expected a list of whole numbers"),
    ],
)
def test_bad_values_name_the_parameter_the_value_and_what_is_allowed(task, params, message):
    with pytest.raises(ValueError) as info:
        build(task, **params)
    assert message in str(info.value)


def test_every_problem_in_one_message():
    with pytest.raises(ValueError) as info:
        build("T2", epochs=0, lr="fast", channels_last="maybe")
    assert str(info.value).splitlines() == [
        "3 invalid parameters:",
        "  epochs=0 is not valid; expected a whole number >= 1",
        "  lr='fast' is not valid; expected a finite number > 0",
        "  channels_last='maybe' is not valid; expected True or False",
    ]


def test_values_are_coerced_to_their_types():
    cfg = build("T2", epochs=3.0, lr=1, batch_size="32", resume="false")
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.resume) == (3, 1.0, 32, False)
    assert type(cfg.epochs) is int and type(cfg.lr) is float


@pytest.mark.parametrize(
    "raw,expected",
    [
        ('["ms"]', ("ms",)),
        ('["ms", "none"]', ("ms", "none")),
        ("('ms', 'xbm')", ("ms", "xbm")),
        ("ms,none", ("ms", "none")),
        (" ms , none ", ("ms", "none")),
        ("ms", ("ms",)),
        (["ms", "none"], ("ms", "none")),
    ],
)
def test_list_parameters_accept_papermill_strings_and_lists(raw, expected):
    value = _resolve_type(raw) if isinstance(raw, str) else raw  # what `papermill -p ablation RAW` passes
    assert build("T4", ablation=value).ablation == expected
    assert parse_list(value) == expected


def test_integer_lists_from_strings():
    assert build("E2", hidden="1024,512,256,128").hidden == (1024, 512, 256, 128)
    assert build("E2", hidden="[64, 32, 16, 8]").hidden == (64, 32, 16, 8)


def test_every_numeric_parameter_has_a_range():
    for cls in CONFIGS.values():
        hints = typing.get_type_hints(cls)
        numeric = [
            f for f in dataclasses.fields(cls) if hints[f.name] in (int, float) or f.metadata.get("items") is int
        ]
        missing = [f.name for f in numeric if f.metadata.get("range") is None]
        assert numeric and not missing, f"{cls.__name__}: no range for {missing}"


def test_t2_notebook_rejects_bad_parameters_before_loading_data(tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from helpers.runinfo import project_root

    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(
            str(project_root() / "notebooks" / "T2_resnet18.ipynb"),
            str(tmp_path / "T2.ipynb"),
            parameters={
                "epochs": _resolve_type("three"),
                "lr": _resolve_type("fast"),
                "out_dir": str(tmp_path),
                "data_dir": str(tmp_path / "nowhere"),
            },
            kernel_name="python3",
            progress_bar=False,
            cwd=str(project_root() / "notebooks"),
        )
    error = info.value
    assert (
        error.ename == "SettingsError"
        and "epochs='three' is not valid" in error.evalue
        and "lr='fast' is not valid" in error.evalue
    )
    assert "RecognitionConfig.from_parameters" in error.source, "the configuration cell, before any data cell"


def test_subsets_beyond_the_data_say_what_the_data_has(tiny_root, tmp_path):
    common = dict(data_dir=str(tiny_root.parent), out_dir=str(tmp_path), image_size=16, train_per_class=0)
    with pytest.raises(
        ValueError, match=r"classes=500 is not valid: the data at .* has 6 classes; use 1 to 6 \(0 = all\)"
    ):
        build_tiny_imagenet(build("T2", **(common | {"classes": 500})))
    with pytest.raises(
        ValueError, match=r"train_per_class=50 is not valid: .* has at most 12 training images per class"
    ):
        build_tiny_imagenet(build("T2", **(common | {"train_per_class": 50})))
    e1 = RecognitionConfig.build("E1", "smoke", device="cpu", pk_classes=4, pk_images=20, **common)
    with pytest.raises(ValueError, match=r"pk_images.*more than any class has") as info:
        build_tiny_imagenet(e1)
    assert "Lower P" not in str(info.value)


def test_t4_p_x_k_beyond_the_data_names_pk_images(cars_devkit_root, tmp_path):
    cfg = RetrievalConfig.build(
        "T4",
        "smoke",
        data_dir=str(cars_devkit_root),
        out_dir=str(tmp_path),
        device="cpu",
        resize=24,
        image_size=16,
        pk_classes=4,
        pk_images=3,
    )
    with pytest.raises(ValueError, match=r"pk_images") as info:
        build_cars196(cfg)
    assert "the data has 98 classes" in str(info.value) and "Lower P" not in str(info.value)


def test_parameter_help_reads_a_fields_comment_beside_or_above_it():
    """The meaning of a parameter (helpers.train --help) is the comment after its field, or the
    comment line right above it (long ones stand above, so the field stays on one line)."""
    import inspect

    from helpers.config import parameter_help

    source = inspect.getsource(RecognitionConfig)
    assert (
        "    # auto (bf16 on GPUs with native bf16" in source
        and "    flip: bool = param(True, older=True)  # random" in source
    )
    meanings = {name: meaning for name, _, meaning in parameter_help(RecognitionConfig)}
    assert meanings["precision"].startswith("auto (bf16 on GPUs with native bf16")
    assert meanings["flip"] == "random horizontal flips of the training batches" and meanings["seed"] == ""

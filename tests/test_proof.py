"""helpers.proof: data resolution, the verdict arithmetic, and one real end-to-end run on the CPU."""

import json
import zipfile

import pytest

from helpers import proof
from helpers.data.errors import DatasetError

from conftest import SHARED_DATA, tiny_archive_cut

KEYS = {"who", "seed", "test_top1", "test_top5", "train_seconds", "images_per_s", "epochs_done", "peak_mem_mb"}


def record(who, seed, top1, **extra):
    return {
        "who": who,
        "seed": seed,
        "test_top1": top1,
        "test_top5": top1 + 0.2,
        "train_seconds": 10.0,
        "images_per_s": 100.0 if who == "peer" else 250.0,
        "epochs_done": 2.0,
        "peak_mem_mb": 900.0,
    } | extra


def test_verdict_needs_a_lead_larger_than_the_larger_seed_range():
    records = [record("project", s, a) for s, a in enumerate((0.30, 0.31, 0.32))] + [
        record("peer", s, a) for s, a in enumerate((0.25, 0.26, 0.28))
    ]
    summary = proof.summarize(records)
    assert summary["project"]["top1_mean"] == pytest.approx(0.31) and summary["peer"]["top1_range"] == pytest.approx(
        0.03
    )
    assert summary["verdict"]["lead"] == pytest.approx(0.31 - 0.79 / 3)
    assert summary["verdict"]["project_wins"]  # lead 0.047 > range 0.03
    assert summary["verdict"]["speed_ratio"] == pytest.approx(2.5)
    close = [record("project", 0, 0.30), record("project", 1, 0.36), record("peer", 0, 0.29), record("peer", 1, 0.30)]
    assert not proof.summarize(close)["verdict"]["project_wins"]  # lead 0.035 < project range 0.06
    table = proof.markdown(
        proof.summarize(close),
        {"budget_s": 10, "image_size": 32, "stem": "imagenet", "device": "cpu", "seeds": 2, "split": "test"},
    )
    assert "NOT clearly ahead" in table and "| project | 2 | 33.00 %" in table


def test_overrides_are_parsed_as_json_values():
    assert proof.parse_overrides(["lr=0.2", "cutmix=0", "crop=rrc", 'fashions=["parallel"]']) == {
        "lr": 0.2,
        "cutmix": 0,
        "crop": "rrc",
        "fashions": ["parallel"],
    }
    with pytest.raises(ValueError, match="key=value"):
        proof.parse_overrides(["lr"])


def test_data_dir_may_be_the_folder_its_parent_or_a_zip(tiny_root, tmp_path):
    assert proof.tiny_imagenet_root(tiny_root, tmp_path) == tiny_root
    assert proof.tiny_imagenet_root(tiny_root.parent, tmp_path) == tiny_root
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in tiny_root.rglob("*"):
            zf.write(path, path.relative_to(tiny_root.parent))
    root = proof.tiny_imagenet_root(archive, tmp_path / "work")
    assert root == tmp_path / "work" / "extracted" / "tiny-imagenet-200" and (root / "wnids.txt").is_file()
    with pytest.raises(DatasetError, match="no Tiny ImageNet found"):
        proof.tiny_imagenet_root(tmp_path / "nothing", tmp_path)


def test_bad_arguments_give_one_clear_message(tiny_root, tmp_path, capsys):
    assert proof.main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "p.json")]) == 2
    assert "no Tiny ImageNet found" in capsys.readouterr().err
    assert proof.main(["--data-dir", str(tiny_root), "--budget-s", "0", "--out", str(tmp_path / "p.json")]) == 2
    assert (
        proof.main(["--data-dir", str(tiny_root), "--set", "optimizer=lbfgs", "--out", str(tmp_path / "p.json")]) == 2
    )
    assert "optimizer='lbfgs' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_plan_only_predicts_and_trains_nothing(tiny_root, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        proof.main(
            [
                "--data-dir",
                str(tiny_root),
                "--budget-s",
                "30",
                "--image-size",
                "16",
                "--seeds",
                "2",
                "--plan",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[proof] plan:" in printed and "for 2 x 2 runs" in printed
    assert not out.exists()


def test_the_sides_alternate_seed_by_seed(tiny_root, tmp_path, monkeypatch):
    """project, peer / peer, project / project, peer ...: neither side always runs first (a warm
    machine, a filled page cache), each run a fresh process; the runs themselves mocked here."""
    import subprocess

    keys = ("seconds_per_step", "epochs_per_run", "eval_seconds", "evals_per_run", "seconds_per_run", "total_seconds")
    monkeypatch.setattr(proof, "plan", lambda args, root: dict.fromkeys(keys, 1.0))
    ran, real_run = [], subprocess.run

    def child(command, **kwargs):
        if "--child" not in command:  # (e.g. git, for the provenance)
            return real_run(command, **kwargs)
        who, seed = command[command.index("--child") + 1].split(":")
        ran.append((who, int(seed)))
        with open(command[command.index("--record") + 1], "w") as f:
            json.dump(record(who, int(seed), 0.3, curve=[[1.0, 0.3]]), f)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(proof.subprocess, "run", child)
    out = tmp_path / "p.json"
    assert proof.main(["--data-dir", str(tiny_root), "--seeds", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["project"]["runs"] == 3
    assert ran == [("project", 0), ("peer", 0), ("peer", 1), ("project", 1), ("project", 2), ("peer", 2)]


@pytest.mark.realdata
def test_proof_on_the_real_mini_archive(tmp_path):
    source = SHARED_DATA / "tiny-imagenet-200-mini.zip"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    archive = tiny_archive_cut(source, tmp_path / "tiny-imagenet-200-mini-4.zip", classes=4)
    out = tmp_path / "proof.json"
    argv = [
        "--data-dir",
        str(archive),
        "--budget-s",
        "2",
        "--image-size",
        "16",
        "--classes",
        "4",
        "--train-per-class",
        "40",
        "--seeds",
        "1",
        "--eval-every",
        "1",
        "--out",
        str(out),
    ]
    assert proof.main(argv) == 0
    document = json.loads(out.read_text())
    records = document["records"]
    assert [(r["who"], r["seed"]) for r in records] == [("project", 0), ("peer", 0)]  # (the order: test above)
    for r in records:
        assert KEYS <= set(r)
        assert r["train_images"] == 4 * 40 and r["eval_images"] == 4 * 50  # the same images on both sides
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 1
        assert (
            r["train_seconds"] > 0 and r["steps"] >= 1 and r["curve"]
        )  # (whether a budget is kept: test_budget, with a controlled clock)
    assert set(document["summary"]) == {"project", "peer", "verdict"}
    assert document["meta"]["run"]["torch"] and document["meta"]["plan"]["total_seconds"] > 0
    assert "| project | 1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_an_unusable_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def work(*args, **kwargs):
        pytest.fail("the proof started with an --out it cannot write")

    for name in ("drive", "tiny_imagenet_root", "plan"):
        monkeypatch.setattr(proof, name, work)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "table.md").mkdir()
    cases = (
        (tmp_path, str(tmp_path)),
        (tmp_path / "a_file" / "p.json", "a_file is a file, not a folder"),
        (tmp_path / "table.json", f"{tmp_path / 'table.md'}: it is a folder"),
    )
    for out, problem in cases:
        assert proof.main(["--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot write ") and problem in err

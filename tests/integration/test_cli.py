"""``python -m harmoniad``: every subcommand on a tiny synthetic dataset, and clear input errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from harmoniad.cli import build_parser, main
from harmoniad.data import make_synthetic

TINY = ["--model", "harmoniad-tiny", "--weights", "random", "--image-size", "128", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_train=4, n_test=4, size=64, categories=["grain"])


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("command", ["extract", "train", "score", "evaluate", "runs"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_extract_then_train_then_score(dataset: Path, tmp_path: Path, cache: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", "--dataset", "synthetic", "--root", str(dataset), "--split", "train", *TINY]) == 0
    assert "4 images, 4 extracted" in capsys.readouterr().out
    assert main(["extract", "--dataset", "synthetic", "--root", str(dataset), "--split", "train", *TINY]) == 0
    assert "0 extracted, 4 already cached" in capsys.readouterr().out

    ckpt = tmp_path / "ckpt"
    assert main(["train", "--dataset", "synthetic", "--root", str(dataset), "--epochs", "1", "--batch-size", "4",
                 "--out", str(ckpt), *TINY]) == 0
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert "fusion of the z-scored maps: anomaly map " in capsys.readouterr().out
    fixed = tmp_path / "ckpt-fixed"
    assert main(["train", "--dataset", "synthetic", "--root", str(dataset), "--epochs", "1", "--batch-size", "4",
                 "--fusion-weights", "fixed", "--out", str(fixed), *TINY]) == 0
    assert "fusion of the z-scored maps: anomaly map 0.45 high + 0.55 joint (fixed weights)\n" \
        in capsys.readouterr().out

    images = dataset / "grain" / "test"
    out = tmp_path / "scored"
    assert main(["score", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
                 "--resolution", "32", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 4 and all(float(r["score"]) >= 0 for r in rows)
    heatmaps = sorted(out.glob("*_anomaly.png"))
    assert len(heatmaps) == 4 and len(list(out.glob("*_high.png"))) == 4
    assert Image.open(heatmaps[0]).size == (32, 32)


def test_evaluate_and_manage_runs(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", str(tmp_path / "runs")]
    assert main(["evaluate", "--dataset", "synthetic", "--root", str(dataset), "--methods", "freqfilter",
                 "--resolution", "32", *store]) == 0
    out = capsys.readouterr().out
    run_id = out.split()[0]
    assert "complete" in out and "grain" in out

    assert main(["runs", *store, "list"]) == 0
    assert run_id in capsys.readouterr().out
    assert main(["runs", *store, "show", run_id]) == 0
    assert "freqfilter on synthetic" in capsys.readouterr().out
    assert main(["runs", *store, "export", run_id, "--out", str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / f"{run_id}_images.csv").is_file()
    assert main(["runs", *store, "delete", run_id]) == 0
    capsys.readouterr()
    assert main(["runs", *store, "list"]) == 0
    assert "no runs" in capsys.readouterr().out


def test_model_choices_reach_harmoniad_and_its_ablations_not_the_baselines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harmoniad.evaluate
    from harmoniad.methods import build_method

    requests = []
    monkeypatch.setattr(harmoniad.evaluate, "evaluate", lambda request, *a, **k: requests.append(request) or [])
    evaluate = ["evaluate", "--dataset", "synthetic", "--root", str(tmp_path), "--store", str(tmp_path / "runs"),
                "--methods", "harmoniad", "harmoniad_high", "patchcore"]
    assert main([*evaluate, "--fsam-input", "whole", "--joint-loss-weight", "0.5"]) == 0 and main(evaluate) == 0
    with_flag, without = requests
    assert set(with_flag.options) == {"harmoniad", "harmoniad_high"} and without.options == {}
    cfg = build_method("harmoniad_high", with_flag.options["harmoniad_high"]).model_cfg
    assert cfg.fsam_input == "whole" and cfg.joint_loss_weight == 0.5


def test_bad_root_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["evaluate", "--dataset", "mvtec", "--root", str(missing), "--methods", "freqfilter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_missing_weights_is_one_clear_line(dataset: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HARMONIAD_CLIP_WEIGHTS", raising=False)
    monkeypatch.delenv("HARMONIAD_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["extract", "--dataset", "synthetic", "--root", str(dataset), "--model", "ViT-B-16",
                 "--weights", "openai", "--image-size", "224"])
    err = capsys.readouterr().err
    assert code == 2 and "ViT-B-16" in err and "HARMONIAD_CLIP_WEIGHTS" in err


def test_a_damaged_run_index_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "runs"
    store.mkdir()
    (store / "index.sqlite").write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("HARMONIAD_STORE", str(store))
    assert main(["runs", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "database" in err[0]

"""The run's record: report_to=[tensorboard] mirrors metrics.jsonl as TensorBoard scalars, also across a
resume, and is refused in one line when unknown or not installed."""
import json
from pathlib import Path

import numpy as np
import pytest

from rankwise.cli import main
from rankwise.config import ConfigError
from rankwise.recipes.train import train
from rankwise.train import metrics
from rankwise.validate import validate


def _board(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in <out>/tensorboard as TensorBoard itself reads it (stale steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers as float32, tagged "<kind>/<key>" at the record's step."""
    expected = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (bool, int, float)):
                expected.setdefault(f"{record['kind']}/{key}", []).append((record["step"], float(np.float32(value))))
    return expected


def test_tensorboard_scalars_equal_the_metrics_file_also_after_a_resume(tiny_cfg, tmp_path):
    common = dict(steps=4, eval_every=2, save_every=2, report_to="[tensorboard]", fast_forward="true", threads=1,
                  **{"ff.interval": 2, "ff.burn_in": 2, "ff.tiny_examples": 4})
    out = tmp_path / "run"
    train(tiny_cfg(out=str(out), **common), say=lambda *_: None)
    expected = _expected(out)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tok_s", "train/flops", "eval/eval_loss",
                "ff/accepted", "ff/pays", "ff/loss_before", "ff/loss_after", "ff/interval", "model/trainable_params"):
        assert expected[tag], tag
    assert _board(out) == expected
    # resumed from step 2: the interrupted run's events after step 2 must go, as its records did
    train(tiny_cfg(out=str(out), resume=str(out / "checkpoints/step-000002"), **common), say=lambda *_: None)
    assert len(list((out / "tensorboard").iterdir())) == 2
    resumed = _expected(out)
    assert [step for step, _ in resumed["train/loss"]] == [1, 2, 3, 4]
    assert _board(out) == resumed


def test_an_unknown_reporter_is_one_line_with_the_choices(tiny_cfg, capsys):
    with pytest.raises(ConfigError, match=r"unknown report_to value 'wandb'; choose from: tensorboard$"):
        validate(tiny_cfg(report_to="[tensorboard,wandb]"))
    assert main(["train", "--dry-run", "report_to=wandb", f"out={tiny_cfg().out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankwise: error: unknown report_to value 'wandb'") and err.count("\n") == 1


def test_tensorboard_not_installed_is_refused_before_weights_load(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_installed", lambda package: package != "tensorboard")
    cfg = tiny_cfg(report_to="[tensorboard]")
    with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install tensorboard"):
        validate(cfg)
    import rankwise.recipes.train as recipe

    monkeypatch.setattr(recipe, "load_model", lambda *_: pytest.fail("weights loaded"))
    assert main(["train", f"model={cfg.model}", "report_to=tensorboard", f"out={cfg.out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankwise: error: report_to=tensorboard needs") and err.count("\n") == 1
    assert "pip install -e '.[tensorboard]'" in err and not Path(cfg.out).exists()

"""rankwise compare: two tiny runs in one PNG, a table whose numbers are the metrics files' own, and
one-line refusals before anything is drawn."""
import json
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from rankwise.cli import main
from rankwise.compare import labels
from rankwise.config import load_config
from rankwise.recipes.train import train


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    """Two 4-step LoRA runs whose directories share a name (x/run, y/run), at different lr."""
    root = tmp_path_factory.mktemp("compare")
    outs = []
    for parent, lr in (("x", 3e-3), ("y", 1e-2)):
        out = root / parent / "run"
        cfg = load_config(None, {"model": str(tiny_model_dir), "steps": 4, "batch_size": 4, "eval_examples": 8,
                                 "eval_every": 2, "lr": lr, "rank": 4, "alpha": 8, "sample": False,
                                 "precision": "fp32", "warmup_steps": 1, "out": str(out)})
        train(cfg, say=lambda *_: None)
        outs.append(out)
    return outs


def _expected_row(out: Path) -> list[str]:
    """The table row, worked out from the run's files without rankwise's readers."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if r["kind"] == "eval" and "eval_loss" in r]
    tok_s = sorted(r["tok_s"] for r in records if r["kind"] == "train")
    config = yaml.safe_load((out / "config.yaml").read_text())
    checkpoint = out / (out / "latest").read_text().strip()
    # LoRA trains exactly the tensors its adapter file holds
    trainable = sum(t.numel() for t in load_file(checkpoint / "adapter/adapter_model.safetensors").values())
    steps = max(r["step"] for r in records)
    return [f"{out.parent.name}/run", config["method"], config["optimizer"], f"{config['lr']:g}", f"{trainable:,}",
            str(steps), f"{evals[-1]:.4f}", f"{min(evals):.4f}", f"{statistics.median(tok_s):.0f}", "-"]


def test_two_runs_in_one_png_and_a_table_of_their_numbers(two_runs, tmp_path, capsys):
    png = tmp_path / "both.png"
    assert main(["compare", *map(str, two_runs), "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > image.height > 100
        image.verify()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "method", "optimizer"]
    rows = [line.split() for line in lines[1:3]]
    assert rows == [_expected_row(out) for out in two_runs]
    assert rows[0][6] != rows[1][6]  # the two lrs really gave two different runs
    assert lines[3] == f"plot written to {png}"


def test_one_x_axis_draws_one_panel(two_runs, tmp_path, capsys):
    wide, narrow = tmp_path / "wide.png", tmp_path / "narrow.png"
    assert main(["compare", str(two_runs[0]), "--out", str(wide)]) == 0
    assert main(["compare", str(two_runs[0]), "--out", str(narrow), "--x", "flops"]) == 0
    with Image.open(wide) as a, Image.open(narrow) as b:
        assert a.height == b.height and a.width > 2.5 * b.width


def test_runs_are_labelled_by_directory_name_made_unique():
    assert labels([Path("/r/lora"), Path("/r/dora")]) == ["lora", "dora"]
    assert labels([Path("/a/x/run"), Path("/b/x/run")]) == ["a/x/run", "b/x/run"]
    assert labels([Path("/r/lora"), Path("/r/lora")])[0].endswith("lora#1")


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a run directory (not found)"),
    ("file", "is not a run directory (not a directory)"),
    ("empty dir", "is not a run directory (no metrics.jsonl)"),
    ("no records", "metrics.jsonl holds no records"),
    ("none", "compare needs at least one run directory"),
    ("bad axis", "unknown x axis 'tokens'; choose from: steps, flops, seconds"),
])
def test_bad_input_is_one_line_before_anything_is_drawn(two_runs, tmp_path, capsys, case, message):
    bad = tmp_path / "bad"
    if case == "file":
        bad.write_text("")
    elif case == "empty dir":
        bad.mkdir()
    elif case == "no records":
        bad.mkdir()
        (bad / "metrics.jsonl").write_text("")
    png = tmp_path / "never.png"
    args = {"none": [], "bad axis": [str(two_runs[0]), "--x", "tokens"]}.get(case, [str(two_runs[0]), str(bad)])
    assert main(["compare", *args, "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankwise: error: ") and message in err and err.count("\n") == 1
    assert not png.exists()  # the good run given first was not drawn either

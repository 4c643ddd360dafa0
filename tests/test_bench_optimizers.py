"""`rankwise bench optimizers`: the sweep grid (lr x matrix-update scale) becomes the right runs, bad grids
are refused before anything trains, and the verdict compares each LoRA-Pre variant with GaLore's best."""
from __future__ import annotations

from pathlib import Path

import pytest

from rankwise.bench.optimizers import SCALES, best_per_optimizer, configs, main, parse_grid, verdict


def test_update_scales_multiply_the_lr_grid_for_low_rank_optimizers_only(tmp_path):
    scale = SCALES["tiny"] | {"lrs": {"adamw": [1e-3], "galore": [1e-2], "lorapre": [1e-2, 3e-2]},
                              "update_scales": {"galore": [0.25], "lorapre": [0.0625, 0.25]}}
    cfgs = configs(scale, ["adamw", "galore", "lorapre"], 5, 1, tmp_path)
    got = [(c.optimizer, c.lr, c.optimizer_args.get("scale"), c.rank) for c in cfgs]
    assert got == [("adamw", 1e-3, None, 16), ("galore", 1e-2, 0.25, 16),
                   ("lorapre", 1e-2, 0.0625, 2), ("lorapre", 1e-2, 0.25, 2),
                   ("lorapre", 3e-2, 0.0625, 2), ("lorapre", 3e-2, 0.25, 2)]
    assert len({c.out for c in cfgs}) == len(cfgs)  # every run writes its own directory
    assert all(c.steps == 5 for c in cfgs)


def test_parse_grid_and_bad_sweeps_are_refused_before_training(tmp_path, capsys):
    assert parse_grid("adamw=1e-3,3e-3;lorapre=3e-3", "--lrs") == {"adamw": [1e-3, 3e-3], "lorapre": [3e-3]}
    with pytest.raises(SystemExit, match="not optimizer=number"):
        parse_grid("lorapre=fast", "--lrs")
    with pytest.raises(SystemExit, match="unknown optimizer 'adam'"):
        parse_grid("adam=1e-3", "--update-scales")
    work = tmp_path / "w"
    for argv, message in ((["--update-scales", "adamw=0.5"], "adamw has no update scale"),
                          (["--optimizers", "adamw,sgd"], "unknown sgd")):
        with pytest.raises(SystemExit, match=message):
            main(["--scale", "tiny", "--workdir", str(work)] + argv)
    assert not work.exists()  # nothing was prepared or trained


def test_verdict_uses_each_optimizers_best_run():
    def row(name, lr, loss, state, matrices):  # chosen on val_loss, compared on test_loss (here val + 0.1)
        return {"optimizer": name, "lr": lr, "val_loss": loss, "test_loss": loss + 0.1, "optimizer_state_bytes": state,
                "matrix_state_bytes": matrices}
    rows = [row("galore", 1e-2, 4.2, 800, 300), row("galore", 3e-2, 4.0, 800, 300),
            row("lorapre", 1e-2, 4.03, 500, 40), row("lorapre", 3e-2, 4.5, 500, 40),
            row("lorapre-muon", 3e-2, 4.2, 450, 20)]
    v = verdict(best_per_optimizer(rows))
    assert v["lorapre"]["test_loss_rel_to_galore"] == pytest.approx(4.13 / 4.1 - 1)
    assert v["lorapre"]["loss_within_1pct"] and v["lorapre"]["matrices_at_most_one_sixth"]
    assert not v["lorapre"]["all_at_most_one_sixth"]
    assert not v["lorapre-muon"]["loss_within_1pct"]
    assert verdict(best_per_optimizer(rows[2:])) == {}  # no GaLore run: nothing to compare with


def test_finetune_compares_methods_at_equal_state_bytes(tmp_path, capsys):
    from rankwise.bench import optimizers_finetune as finetune
    import json

    out = tmp_path / "ft.json"
    argv = ["--finetune", "--scale", "tiny", "--steps", "2", "--workdir", str(tmp_path / "w"), "--out", str(out),
            "--lrs", "lora=3e-3;lorapre=1e-3;lorapre-muon=1e-3"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    by = {r["label"]: r for r in result["runs"]}
    assert set(by) == {"lora", "lorapre", "lorapre-muon"} and set(result["best"]) == set(by)
    lora_state = by["lora"]["optimizer_state_bytes"]
    for name in ("lorapre", "lorapre-muon"):  # same floats as LoRA's AdamW moments, up to per-tensor counters
        assert abs(by[name]["optimizer_state_bytes"] - lora_state) < 0.01 * lora_state
    assert by["lorapre-muon"]["rank"] == 2 * by["lorapre"]["rank"]
    assert by["lora"]["trainable_params"] < by["lorapre"]["trainable_params"]  # LoRA-Pre steps the full weights
    assert all(r["eval_loss"] < r["eval_loss_start"] for r in by.values())
    assert "lorapre vs LoRA" in capsys.readouterr().out
    assert finetune.method_overrides("lorapre", 8)[-2] == "optimizer_args.rest=frozen"


def test_finetune_optimizers_picks_the_methods_that_run(tmp_path):
    import json

    out = tmp_path / "ft.json"
    assert main(["--finetune", "--scale", "tiny", "--steps", "1", "--optimizers", "lorapre-muon", "--workdir",
                 str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["runs"]] == ["lorapre-muon"] * 2  # its default grid, nothing else
    assert set(result["settings"]["lrs"]) == {"lorapre-muon"}


def test_finetune_default_grids_sweep_every_method():
    from rankwise.bench.optimizers_finetune import METHODS, SCALES

    for scale in SCALES.values():  # a method missing here would silently drop out of the comparison
        assert set(scale["lrs"]) == set(METHODS) and all(len(v) >= 2 for v in scale["lrs"].values())


def test_finetune_refuses_pretraining_options(tmp_path):
    work = tmp_path / "w"
    for argv, message in ((["--lrs", "adamw=1e-3"], r"unknown optimizer 'adamw' \(known: lora, lorapre"),
                          (["--optimizers", "galore"], r"--optimizers: unknown galore with --finetune"),
                          (["--update-scales", "lorapre=0.25"], "--update-scales is for pre-training")):
        with pytest.raises(SystemExit, match=message):
            main(["--finetune", "--scale", "tiny", "--workdir", str(work)] + argv)
    assert not work.exists()


def test_tiny_pretraining_runs_each_optimizer_in_its_own_process_and_judges_lorapre_against_galore(tmp_path):
    import json

    out = tmp_path / "opt.json"
    assert main(["--scale", "tiny", "--optimizers", "adamw,galore,lorapre", "--steps", "2", "--workdir",
                 str(tmp_path / "w"), "--out", str(out), "--lrs", "adamw=1e-3;galore=1e-2;lorapre=1e-2"]) == 0
    result = json.loads(out.read_text())
    runs = {r["optimizer"]: r for r in result["runs"]}
    assert list(runs) == ["adamw", "galore", "lorapre"] and set(result["best"]) == set(runs)
    assert set(result["verdict"]) == {"lorapre"}  # the claim is checked for each LoRA-Pre variant that ran
    assert runs["lorapre"]["optimizer_state_bytes"] < runs["galore"]["optimizer_state_bytes"]
    assert all(r["peak_rss_growth_bytes"] > 0 for r in runs.values())  # measured in each run's forked child


def test_finetune_same_betas_curves_and_lora_fa_steps_to_target(tmp_path, capsys):
    import json

    out = tmp_path / "ft.json"
    assert main(["--finetune", "--scale", "tiny", "--steps", "3", "--optimizers", "lora,lorapre,lora-fa", "--betas",
                 "0.9,0.95", "--curve-every", "1", "--workdir", str(tmp_path / "w"), "--out", str(out),
                 "--lrs", "lora=3e-3;lorapre=1e-3;lora-fa=3e-3"]) == 0
    result = json.loads(out.read_text())
    by = {r["label"]: r for r in result["runs"]}
    assert all(r["betas"] == [0.9, 0.95] for r in by.values())  # LoRA-Pre's own (0.9, 0.95) and LoRA's alike
    for row in by.values():  # the test loss at 0, 1, 2 and the final step 3, which is the reported eval_loss
        assert [step for step, _ in row["curve"]] == [0, 1, 2, 3]
        assert row["curve"][0][1] == row["eval_loss_start"] and row["curve"][-1][1] == row["eval_loss"]
    assert (by["lora-fa"]["method"], by["lora-fa"]["optimizer"]) == ("lora-fa", "adamw")
    assert by["lora-fa"]["optimizer_state_bytes"] < 0.6 * by["lora"]["optimizer_state_bytes"]  # B's moments only
    best = result["best"]
    lora_final = best["lora"]["eval_loss"]
    for row in best.values():
        expected = next((s for s, loss in row["curve"] if loss <= lora_final), None)
        assert row["steps_to_lora"] == expected
    assert best["lora"]["steps_to_lora"] is not None  # LoRA reaches its own final loss, at the last step at latest
    assert "lora-fa vs LoRA" in capsys.readouterr().out


def test_steps_to_reach_is_the_first_step_at_or_below_the_target():
    from rankwise.bench.optimizers_finetune import steps_to_reach

    curve = [[0, 3.0], [5, 2.5], [10, 2.6], [15, 2.4]]
    assert steps_to_reach(curve, 2.5) == 5  # at the target counts, the first such step wins
    assert steps_to_reach(curve, 2.45) == 15
    assert steps_to_reach(curve, 2.3) is None


def test_finetune_betas_and_curves_are_checked_before_any_run(tmp_path):
    work = tmp_path / "w"
    for argv, message in ((["--finetune", "--betas", "0.9"], "--betas: expected two numbers"),
                          (["--finetune", "--betas", "0.9,1.5"], r"lora: betas must lie in \[0, 1\)"),
                          (["--curve-every", "5"], "--betas and --curve-every are for --finetune"),
                          (["--finetune", "--curve-every", "-1"], "--curve-every: expected a step count")):
        with pytest.raises(SystemExit, match=message):
            main(["--scale", "tiny", "--workdir", str(work)] + argv)
    assert not list(work.glob("finetune-tiny/lora-*"))  # no run started

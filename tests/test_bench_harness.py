"""The benches' shared harness: a run in a child process (forked or fresh) that reports a failure in one
line, the built-in data as JSONL with the same split, typed overrides that load like typed ones, --reuse
lookups, and a sweep's best. Pure Python here: no torch work in this process (forks follow in later files)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from rankwise.bench._harness import (best_per, builtin_jsonl, config_settings, finished_rows, finished_runs,
                                     in_child, layered, lowest, run_key, typed)
from rankwise.config import ConfigError, load_config, save_config


def _boom():
    raise ValueError("no such lr")


def test_forked_child_returns_its_result_or_one_line_when_it_fails_or_dies():
    assert in_child(lambda a, b: {"sum": a + b}, 2, 40) == {"sum": 42}  # fork: any callable, any result
    assert in_child(os.getpid) != os.getpid()
    assert in_child(_boom) == {"error": "ValueError: no such lr"}
    assert in_child(os._exit, 3) == {"error": "the run's process died"}  # no word sent: not a hang


def test_fresh_child_is_a_new_interpreter_that_sees_the_extra_environment():
    env = {"RANKWISE_HARNESS_PROBE": "131072"}
    assert in_child(os.getenv, "RANKWISE_HARNESS_PROBE", fresh=True, env=env) == "131072"
    assert "RANKWISE_HARNESS_PROBE" not in os.environ  # the parent's own environment is untouched
    assert in_child(os.getpid, fresh=True) != os.getpid()
    failed = in_child(json.loads, "{", fresh=True)
    assert set(failed) == {"error"} and "JSONDecodeError" in failed["error"]


def test_builtin_jsonl_writes_the_first_examples_and_all_of_them_split_as_the_builtin_set(tmp_path):
    from rankwise.data import load_splits
    from rankwise.data.stdlib_docstrings import extract

    path = builtin_jsonl(tmp_path / "three.jsonl", 3)
    assert [json.loads(line) for line in open(path)] == extract()[:3]
    builtin, written = load_splits("stdlib-docstrings"), load_splits(builtin_jsonl(tmp_path / "all.jsonl"))
    assert (written.train, written.tiny, written.test) == (builtin.train, builtin.tiny, builtin.test)


def test_typed_overrides_load_like_the_strings_they_came_from():
    items = ["lr=1e-3", "betas=[0.9,0.95]", "optimizer_args.simple=true", "out=runs/x", " rank=8", "dropout=0"]
    assert typed(items) == {"lr": 1e-3, "betas": [0.9, 0.95], "optimizer_args.simple": True, "out": "runs/x",
                            "rank": 8, "dropout": 0}
    assert load_config(None, typed(items)) == load_config(None, items)
    with pytest.raises(ConfigError, match="expected key=value, got 'fast'"):
        typed(["fast"])
    with pytest.raises(ConfigError, match="^betas: "):
        typed(["betas=[0.9"])


def test_layered_overrides_apply_in_the_order_a_key_value_list_would():
    assert list(layered({"a": 1, "b": 2}, {"a": 3}, {})) == ["b", "a"]  # the later layer wins and comes last
    mine, user = {"optimizer_args.simple": True, "optimizer_args": {"beta": 0.5}}, {"optimizer_args.simple": False}
    as_list = ["optimizer_args.simple=true", "optimizer_args={beta: 0.5}", "optimizer_args.simple=false"]
    assert load_config(None, layered(mine, user)).optimizer_args == {"beta": 0.5, "simple": False}
    assert load_config(None, as_list).optimizer_args == {"beta": 0.5, "simple": False}


def test_run_key_ignores_key_order_and_finished_rows_keep_only_finished_runs_of_the_same_settings(tmp_path):
    assert run_key({"lr": 1e-3, "rank": 4}) == run_key({"rank": 4, "lr": 1e-3}) != run_key({"rank": 4})
    out, common = tmp_path / "r.json", ["model=default", "steps=2"]
    done = {"label": "lora", "overrides": ["method=lora", "rank=1"], "eval_loss": 2.5}
    out.write_text(json.dumps({"common": common, "rows": [done, {"overrides": ["method=dora"], "error": "x"}]}))
    assert finished_rows(str(out), common) == {run_key(["method=lora", "rank=1"]): done}
    assert finished_rows(None, common) == finished_rows(str(tmp_path / "absent.json"), common) == {}
    with pytest.raises(SystemExit, match="other settings"):
        finished_rows(str(out), ["model=default", "steps=3"])


def _run_dir(folder, name: str, records: list[dict], drop: str | None = None, **overrides):
    """A run directory as the recipe leaves it: config.yaml (without key `drop`, as an older run's) and metrics."""
    cfg = load_config(None, {"steps": 2, "out": str(folder / name), **overrides})
    (folder / name).mkdir()
    save_config(cfg, folder / name / "config.yaml")
    if drop:
        saved = yaml.safe_load((folder / name / "config.yaml").read_text())
        del saved[drop]
        (folder / name / "config.yaml").write_text(yaml.safe_dump(saved))
    (folder / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfg


def test_finished_runs_are_the_complete_runs_found_by_their_config(tmp_path):
    complete = [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}, {"kind": "eval", "step": 2}]
    done = _run_dir(tmp_path, "done", complete, drop="eval_generate", lr=1e-3)  # saved before eval_generate existed
    _run_dir(tmp_path, "stopped", complete[:1] + [{"kind": "eval", "step": 1}])
    _run_dir(tmp_path, "no-final-eval", complete[:2])
    (tmp_path / "tiny-model").mkdir()  # not a run
    found = finished_runs(tmp_path)
    assert found == {run_key(config_settings(done.to_dict())): tmp_path / "done"}
    again = load_config(None, {"steps": 2, "out": str(tmp_path / "done"), "lr": 1e-3, "overwrite": True})
    assert run_key(config_settings(again.to_dict())) in found  # overwrite does not change what trains
    other = load_config(None, {"steps": 2, "out": str(tmp_path / "done"), "lr": 2e-3})
    assert run_key(config_settings(other.to_dict())) not in found


def test_sweeps_choose_on_validation_where_a_row_has_it_and_on_test_where_none_does():
    from rankwise.bench._harness import selection_loss

    rows = [{"m": "lora", "eval_loss": 2.0, "validation_loss": 2.9, "i": 0},
            {"m": "lora", "eval_loss": 2.5, "validation_loss": 2.1, "i": 1},
            {"m": "dora", "eval_loss": 2.2, "validation_loss": None, "i": 2},
            {"m": "dora", "eval_loss": 2.3, "i": 3}]
    best = best_per(rows, "m", selection_loss)
    assert best["lora"]["i"] == 1 and best["dora"]["i"] == 2


def test_lowest_and_best_per_take_the_lowest_loss_and_the_earlier_row_on_a_tie():
    rows = [{"m": "lora", "loss": 2.5, "i": 0}, {"m": "dora", "loss": 2.4, "i": 1},
            {"m": "lora", "loss": 2.2, "i": 2}, {"m": "lora", "loss": 2.2, "i": 3}, {"m": "dora", "loss": 2.6, "i": 4}]
    assert lowest(rows, "loss")["i"] == 2 and lowest([], "loss") is None
    assert lowest({"1e-3": 3.0, "2e-3": 1.0}, lambda lr: {"1e-3": 3.0, "2e-3": 1.0}[lr]) == "2e-3"
    best = best_per(rows, "m", "loss")
    assert list(best) == ["lora", "dora"] and (best["lora"]["i"], best["dora"]["i"]) == (2, 1)
    assert best_per(rows, lambda r: r["i"] % 2, lambda r: -r["loss"]) == {0: rows[4], 1: rows[1]}
    assert best_per([], "m", "loss") == {}

"""Config parsing and validation: bad configs are refused with one line, before any weights load."""
import pytest

from rankwise import models
from rankwise.config import Config, ConfigError, load_config
from rankwise.validate import validate


def test_overrides_parse_types(tmp_path):
    cfg = load_config(None, ["lr=1e-4", "steps=12", "betas=[0.9,0.95]", "target_modules=q_proj,v_proj",
                             "fast_forward=true", "optimizer_args.simple=true", "resume=null"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 12 and cfg.betas == (0.9, 0.95)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.fast_forward is True and cfg.optimizer_args == {"simple": True}
    assert cfg.resume is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dora\nrank: 8\nlr: 0.001\n")
    cfg = load_config(path, ["rank=4"])
    assert (cfg.method, cfg.rank, cfg.lr) == ("dora", 4, 0.001)


@pytest.mark.parametrize("overrides, message", [
    (["lr=abc"], "lr must be a number"),
    (["steps=1.5"], "steps must be an integer"),
    (["rnak=4"], "did you mean 'rank'"),
    (["rank"], "expected key=value"),
    (["steps.x=1"], "has no sub-keys"),
    (["max_length=nan"], "max_length must be an integer"),
    (["steps=inf"], "steps must be an integer"),
    (["lr=nan"], "lr must be a finite number"),
    (["alpha=1e400"], "alpha must be a finite number"),
    (["clip=" + "9" * 400], "clip must be a finite number"),
    (["target_modules=[q_proj"], "target_modules: '\\[q_proj' is not a valid list"),
    (["ff=0", "ff.interval=3"], "ff must be a mapping"),
])
def test_parse_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    bad.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="keys must be names, got 1"):
        load_config(bad)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "lorq"}, "unknown method 'lorq'"),
    ({"optimizer": "sgdd"}, "unknown optimizer"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"schedule": "linearish"}, "unknown schedule"),
    ({"precision": "fp8"}, "unknown precision"),
    ({"data": "/no/such/file.jsonl"}, "dataset not found"),
    ({"model": "/no/such/model"}, "model directory not found"),
    ({"betas": (0.9, 1.5)}, "betas must lie in"),
    ({"hooks": ["nope"]}, "unknown hook"),
    ({"resume": "latest", "overwrite": True}, "contradict"),
    ({"method_args": {"bias": "some"}}, "method_args.bias must be one of"),
    ({"method_args": {"use_rslora": "yes please"}}, "use_rslora must be true or false"),
    ({"method_args": {"init_lora_weights": 5}}, "init_lora_weights must be"),
    ({"method": "lora-fa", "method_args": {"delta": 10**400}}, "delta must be a finite number"),
    ({"optimizer": "loft", "optimizer_args": {"eps": float("nan")}}, "eps must be a finite number"),
    ({"method": "full", "optimizer": "lorapre", "optimizer_args": {"delta": 0}}, "delta must be a number > 0"),
    ({"method": "full", "optimizer": "lorapre", "optimizer_args": {"eps": "tiny"}}, "eps must be a number"),
    ({"method": "full", "optimizer": "lorapre", "optimizer_args": {"targets": [1]}}, "targets must be"),
    ({"method": "full", "optimizer": "lorapre-muon", "optimizer_args": {"momentum": 1.0}}, "momentum must be"),
    ({"method": "full", "optimizer": "lorapre-muon", "optimizer_args": {"ns_steps": 0}}, "ns_steps must be"),
    ({"method": "full", "optimizer": "galore", "optimizer_args": {"update_proj_gap": 0}}, "update_proj_gap must"),
    ({"method": "full", "optimizer": "galore", "optimizer_args": {"proj_type": "diag"}}, "proj_type must be"),
    ({"method": "full", "optimizer": "galore", "optimizer_args": {"scale": "big"}}, "scale must be a number"),
    ({"fast_forward": True, "ff": {"cap": 10**400}}, "ff.cap must be a number"),
])
def test_validation_rejects_before_loading(monkeypatch, tiny_model_dir, tmp_path, overrides, message):
    def no_load(*a, **k):
        raise AssertionError("weights were loaded for an invalid config")

    monkeypatch.setattr(models, "load_model", no_load)
    base = dict(model=str(tiny_model_dir), out=str(tmp_path / "out"))
    base.update(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(Config(**base))


def test_existing_run_needs_resume_or_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        validate(Config(model=str(tiny_model_dir), out=str(out)))
    validate(Config(model=str(tiny_model_dir), out=str(out), overwrite=True))

"""FLOP accounting: predictions equal FlopCounterMode's counts, and counting stops once they can be made."""
from __future__ import annotations

import pytest
import torch

import rankwise.recipes.train as recipe
from rankwise.tiny import make_tiny_model_dir
from rankwise.train.flops import FlopMeter, _Key
from rankwise.train.metrics import read_metrics


def test_periodic_blocks_are_predicted_after_they_repeat():
    key = _Key()
    seen = []
    for value in [5, 9, 7, 3, 7, 3, 7, 3]:
        seen.append(key.predict(None))
        if seen[-1] is None:
            key.record(None, value)
        else:
            key.remember(seen[-1])
    # period 2 is recognised once 2p+1 = 5 values repeat (7, 3, 7, 3, 7): the eighth is predicted
    assert seen == [None] * 7 + [3]


def test_a_wrong_prediction_turns_prediction_off():
    key = _Key()
    for value in [4, 4, 4]:
        key.record(None, value)
    assert key._periodic() == 4
    key.record(None, 6)  # counted on a recheck: not what the pattern said
    assert key.counted_only and key.predict(None) is None


def test_linear_fit_needs_a_confirmation_before_predicting():
    key = _Key()
    truth = lambda s: 7 * s[0] + 3 * s[1] + 11 * s[2] + 5 * s[3]  # noqa: E731
    sizes = [(8, 64, 3, 1), (16, 256, 5, 1), (24, 576, 2, 1), (8, 64, 7, 2), (32, 1024, 9, 1)]
    for size in sizes[:4]:
        assert key.predict(size) is None
        key.record(size, truth(size))
    assert key.predict(sizes[0]) == truth(sizes[0])  # seen: the exact count, reused
    assert key.predict(sizes[4]) is None  # the fit exists but no unseen size has confirmed it yet
    key.record(sizes[4], truth(sizes[4]))
    assert key.predict((40, 1600, 4, 1)) == truth((40, 1600, 4, 1))
    key.record((48, 48 * 48, 1, 1), truth((48, 48 * 48, 1, 1)) + 2)  # a count that breaks the model
    assert key.counted_only and key.predict((56, 56 * 56, 1, 1)) is None


def test_disabled_meter_reports_zero_and_counts_nothing():
    meter = FlopMeter(enabled=False)
    with meter.measure("train", (1, 1, 1, 1)):
        torch.ones(4, 4) @ torch.ones(4, 4)
    assert meter.last == 0 and meter.counted == 0


@pytest.fixture(scope="module")
def shaped_models(tmp_path_factory):
    """Tiny Llamas of different depth, width and head layout."""
    shapes = {"deep": dict(layers=3, hidden=48, heads=6, kv_heads=2, intermediate=80),
              "wide": dict(layers=1, hidden=96, heads=4, kv_heads=4, intermediate=160)}
    return {name: make_tiny_model_dir(tmp_path_factory.mktemp(name), **shape) for name, shape in shapes.items()}


CASES = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "full": dict(method="full"),
    "loft": dict(method="lora", optimizer="loft"),
    "lorapre": dict(method="full", optimizer="lorapre"),
    "lora-ff": dict(method="lora", fast_forward="true", **{"ff.interval": 2}),
}


@pytest.mark.parametrize("case,shape", [(case, "deep") for case in CASES] +
                         [("lora", "wide"), ("loft", "wide"), ("lorapre", "wide")])
def test_predicted_flops_equal_flop_counter(tiny_cfg, monkeypatch, shaped_models, case, shape):
    audits = []

    def audited(enabled=True):
        meter = FlopMeter(enabled, exact=True)
        audits.append(meter)
        return meter

    monkeypatch.setattr(recipe, "FlopMeter", audited)
    steps = 10
    summary = recipe.train(tiny_cfg(model=str(shaped_models[shape]), steps=steps, batch_size=2, grad_accum=2,
                                    **CASES[case]), say=lambda *_: None)
    (meter,) = audits
    # every block was counted, and every prediction the meter would have made agreed with the count
    assert meter.mismatches == []
    assert meter.predictions >= steps  # most of the run would have been predicted, not counted
    records = read_metrics(f"{summary['checkpoint']}/../../metrics.jsonl")
    assert all(r["flops"] > 0 for r in records if r["kind"] == "train")


def test_a_run_counts_only_its_first_steps(tiny_cfg, monkeypatch):
    meters = []
    monkeypatch.setattr(recipe, "FlopMeter", lambda enabled=True: meters.append(FlopMeter(enabled)) or meters[-1])
    summary = recipe.train(tiny_cfg(steps=30, batch_size=2, eval_every=0), say=lambda *_: None)
    (meter,) = meters
    records = [r for r in read_metrics(f"{summary['checkpoint']}/../../metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 30 and all(r["flops"] > 0 for r in records)
    # 30 micro-batches and 30 updates: the fit needs 5 counted sizes, the update 3 repeats (+1 recheck at 50)
    assert meter.counted <= 5 + 3 + 2, meter.counted


def test_mfu_is_measured_flops_over_the_known_peak(tiny_cfg, monkeypatch):
    import rankwise.runtime as runtime

    monkeypatch.setattr(runtime, "peak_flops", lambda device: (2e9, "test chip"), raising=False)
    summary = recipe.train(tiny_cfg(steps=2, eval_every=0), say=lambda *_: None)
    records = [r for r in read_metrics(f"{summary['checkpoint']}/../../metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 2
    for r in records:
        assert r["mfu"] == pytest.approx(r["flops"] / r["seconds"] / 2e9)
    monkeypatch.setattr(runtime, "peak_flops", lambda device: None, raising=False)
    summary = recipe.train(tiny_cfg(steps=1, eval_every=0, overwrite=True), say=lambda *_: None)
    records = [r for r in read_metrics(f"{summary['checkpoint']}/../../metrics.jsonl") if r["kind"] == "train"]
    assert "mfu" not in records[0]  # no known peak (a CPU): no made-up utilisation

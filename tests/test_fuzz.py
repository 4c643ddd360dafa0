"""Bad input, fuzzed: any config override list or JSONL file gives a one-line error or a correct run.

Properties (hypothesis): `load_config` + `validate` either pass or raise ConfigError with one non-empty
line; the CLI answers the same overrides with exit 2 and one stderr line; a run on the tiny model ends
with a finite loss or a clear error; `load_splits` on any JSONL file returns splits or raises a
DataError naming `file:line`. Anything else (KeyError, TypeError, a torch RuntimeError...) is a bug.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rankwise.cli import main
from rankwise.config import Config, ConfigError, load_config
from rankwise.data import DataError, load_splits
from rankwise.fastforward.core import OPTION_NAMES
from rankwise.methods import METHODS
from rankwise.optim import OPTIMIZERS
from rankwise.validate import validate

# deterministic by default (no flaky suite); RANKWISE_FUZZ_SCALE=20 explores 20x more, fresh examples each time
SCALE = int(os.environ.get("RANKWISE_FUZZ_SCALE", "1"))


def fuzz(max_examples: int, fixtures: bool = False) -> settings:
    checks = [HealthCheck.too_slow] + ([HealthCheck.function_scoped_fixture] if fixtures else [])
    return settings(max_examples=max_examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=checks)


FIELDS = [f.name for f in dataclasses.fields(Config)]
SUB_KEYS = {
    "ff": list(OPTION_NAMES),
    "method_args": ["init_lora_weights", "use_rslora", "bias", "init", "delta", "blocks", "activation"],
    "optimizer_args": ["simple", "ridge", "eps", "max_grad_norm", "rank", "delta", "scale", "targets", "rest",
                       "init_std", "momentum", "nesterov", "ns_steps", "update_proj_gap", "proj_type"],
}
NAMES = sorted(METHODS) + sorted(OPTIMIZERS) + ["constant", "cosine", "bf16", "fp32", "fp16", "ddp", "fsdp",
                                                "auto", "cpu", "cuda", "cuda:7", "latest", "stdlib-docstrings",
                                                "default", "kaiming", "svd", "attn", "mlp", "adamw", "frozen",
                                                "fast_forward", "doubling", "linear", "interval", "lorq", "sgd"]
EDGE_VALUES = ["", " ", "0", "-1", "1", "2", "-0.0", "1e-9", "nan", "-nan", "inf", "-inf", "1e400", "1_000",
               str(2**63), str(10**40), "true", "false", "null", "~", "[]", "{}", "[1, 2]", "[0.9, 0.95]",
               "[a, b]", "{a: 1}", "{a: [}", "[", "{", "[1, [2]]", "0x10", "1.5", "3.0", "(0.9,0.99)",
               "q_proj,v_proj", "über-λ", "🦙", "x" * 300, "9" * 400, "/no/such/path", "/no/such/data.jsonl", "a=b"]
# no control characters: a value echoed into a message must not break it over lines
TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=12)
NO_EQUALS = TEXT.filter(lambda t: "=" not in t)


def _misspell(key: str, draw) -> str:
    i = draw(st.integers(0, max(0, len(key) - 1)))
    return draw(st.sampled_from([key[:i] + key[i + 1:], key[:i] + key[i:i + 1] * 2 + key[i + 1:],
                                 key.upper(), key + "_", " " + key, key.replace("_", "-")]))


@st.composite
def override_key(draw):
    kind = draw(st.sampled_from(["field", "field", "field", "sub", "sub", "misspelled", "junk"]))
    if kind == "field":
        return draw(st.sampled_from(FIELDS))
    if kind == "sub":
        head = draw(st.sampled_from(sorted(SUB_KEYS)))
        return f"{head}.{draw(st.sampled_from(SUB_KEYS[head] + ['nope', '', 'a.b']))}"
    if kind == "misspelled":
        return _misspell(draw(st.sampled_from(FIELDS)), draw)
    return draw(st.sampled_from(["lr.x", "ff", "a.b.c", "", "method_args.", ".rank"]) | NO_EQUALS)


HINTS = {f.name: f.type for f in dataclasses.fields(Config)}
SMALL = st.integers(0, 64).map(str)
HUGE = "9" * 400  # an int no float can hold (only where a number is wanted: as a path it is a too-long name)


def plausible(key: str):
    """Values of the right kind for `key`, so that examples reach the checks behind the type checks."""
    head, _, sub = key.partition(".")
    hint = str(HINTS.get(head, ""))
    if sub or hint == "dict":
        return st.sampled_from(["true", "false", "0", "1", "4", "0.5", "1e-6", "[attn]", "q_proj,v_proj", HUGE] + NAMES)
    if hint == "bool":
        return st.sampled_from(["true", "false"])
    if hint == "int":
        return SMALL | st.just(HUGE)
    if hint == "float":
        return st.floats(0, 1).map(repr) | st.just(HUGE)
    return st.sampled_from(NAMES + ["[]", "q_proj,v_proj"])


@st.composite
def override(draw, paths):
    key = draw(override_key())
    if draw(st.integers(0, 9)) < 4:  # 40% a value of the right kind, else anything
        return f"{key}={draw(plausible(key))}"
    value = draw(st.one_of(
        st.sampled_from(EDGE_VALUES), st.sampled_from(NAMES), st.sampled_from(paths),
        st.integers(-(2**70), 2**70).map(str), st.integers(-3, 70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr), TEXT,
    ))
    return f"{key}={value}"


@st.composite
def override_or_bare(draw, paths):
    if draw(st.integers(0, 12)) == 0:
        return draw(NO_EQUALS)  # "expected key=value"
    return draw(override(paths))


def overrides(paths, max_size=4):
    return st.lists(override_or_bare(paths), min_size=1, max_size=max_size)


def assert_one_line(error: Exception) -> None:
    message = str(error)
    assert message.strip(), f"empty message from {type(error).__name__}"
    assert "\n" not in message, f"multi-line message: {message!r}"


@pytest.fixture(scope="module")
def fuzz_paths(tiny_model_dir, tmp_path_factory):
    """Paths a fuzzed value may name: the tiny model, a run directory, files that are not what a key wants."""
    root = tmp_path_factory.mktemp("fuzz-paths")
    data = root / "ok.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(40)))
    (root / "notes.txt").write_text("not data\n")
    (root / "empty.jsonl").write_text("")
    (root / "dir").mkdir()
    return {"root": root, "model": str(tiny_model_dir), "data": str(data),
            "all": [str(tiny_model_dir), str(data), str(root / "notes.txt"), str(root / "empty.jsonl"),
                    str(root / "dir"), str(root / "missing"), str(tiny_model_dir / "config.json")]}


# ---- 1. configs: load_config + validate, and the CLI's dry run -------------------------------------
def _validates_or_fails_in_one_line(fuzz_paths, extra: list[str]) -> None:
    base = [f"model={fuzz_paths['model']}", f"out={fuzz_paths['root'] / 'out'}"]
    try:
        validate(load_config(None, base + extra))
        event("valid")
    except ConfigError as e:
        event(f"ConfigError: {str(e)[:25]}")
        assert_one_line(e)


@fuzz(250)
@given(data=st.data())
def test_any_overrides_validate_or_fail_in_one_line(fuzz_paths, data):
    _validates_or_fails_in_one_line(fuzz_paths, data.draw(overrides(fuzz_paths["all"]), label="overrides"))


@st.composite
def method_and_optimizer(draw, paths):
    """A method, an optimizer and their free-form arguments: what each `check()` has to judge."""
    chosen = [f"method={draw(st.sampled_from(sorted(METHODS)))}",
              f"optimizer={draw(st.sampled_from(sorted(OPTIMIZERS)))}"]
    for head in ("method_args", "optimizer_args", "ff"):
        for sub in draw(st.lists(st.sampled_from(SUB_KEYS[head]), max_size=3, unique=True)):
            key = f"{head}.{sub}"
            value = draw(plausible(key) | st.sampled_from(EDGE_VALUES) | st.floats(allow_nan=True).map(repr))
            chosen.append(f"{key}={value}")
    return chosen + draw(st.lists(override(paths), max_size=2))


@fuzz(150)
@given(data=st.data())
def test_method_and_optimizer_args_validate_or_fail_in_one_line(fuzz_paths, data):
    _validates_or_fails_in_one_line(fuzz_paths, data.draw(method_and_optimizer(fuzz_paths["all"]), label="overrides"))


YAML_SCALARS = ["1", "-1", "0.5", ".nan", ".inf", "null", "true", "''", "2020-01-01", "!!binary aGVsbG8=",
                "!!set {a}", "[]", "{}", "[a, [b]]", "{x: {y: 1}}", "lora", "fp8", "ünïcode",
                "!!python/name:os.system"]
YAML_KEYS = FIELDS + ["1", "null", "true", "[a]", "ff.interval", "rnak", "~"]


@st.composite
def yaml_text(draw):
    """A YAML config file: mostly `key: value` lines, sometimes not YAML at all or not a mapping."""
    kind = draw(st.sampled_from(["mapping"] * 6 + ["list", "scalar", "garbage", "empty"]))
    if kind == "mapping":
        keys = draw(st.lists(st.sampled_from(YAML_KEYS), max_size=5, unique=True))
        values = [draw(st.sampled_from(YAML_SCALARS) | plausible(k if k in HINTS else "lr")) for k in keys]
        return "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
    return {"list": "- a\n- b\n", "scalar": "42\n", "empty": "", "garbage": draw(st.sampled_from(
        ["a: [\n", "\t- x", "key: value: other", "{", "a: &x 1\nb: *y\n", "%YAML 9.9\n---\na: 1"]))}[kind]


@fuzz(150)
@given(text=yaml_text(), extra=st.lists(st.sampled_from(["rank=4", "ff.interval=3", "method_args.bias=all"]),
                                        max_size=2))
def test_any_yaml_config_file_loads_or_fails_in_one_line(fuzz_paths, tmp_path_factory, text, extra):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    try:
        validate(load_config(path, [f"model={fuzz_paths['model']}", f"out={fuzz_paths['root'] / 'out'}", *extra]))
        event("valid")
    except ConfigError as e:
        event(f"ConfigError: {str(e)[:25]}")
        assert_one_line(e)


@fuzz(30, fixtures=True)
@given(data=st.data())
def test_cli_dry_run_exits_0_or_2_with_one_line(fuzz_paths, capsys, data):
    # a leading argument without "=" is read as a YAML file; one starting with "-" would be an option
    extra = [x for x in data.draw(overrides(fuzz_paths["all"], max_size=3), label="overrides") if x[:1] != "-"]
    capsys.readouterr()
    code = main(["train", "--dry-run", *extra, f"model={fuzz_paths['model']}", f"out={fuzz_paths['root'] / 'out'}"])
    out, err = capsys.readouterr()
    if code == 0:
        assert out.rstrip().endswith("config ok") and not err
    else:
        assert code == 2 and err.startswith("rankwise: error: ") and err.count("\n") == 1, err


# ---- 2. configs that validate also run: a finite loss, or a clear error ---------------------------
RUN_METHODS = ["lora", "dora", "full", "lora-fa", "ffba"]
RUN_OPTIMIZERS = ["adamw", "loft", "lorapre", "lorapre-muon", "galore"]
OWN_ARGS = {  # each optimizer's and method's own arguments, good and bad values mixed
    "loft": {"simple": ["true", "1"], "ridge": ["1e-6", "-1", "inf"], "eps": ["1e-8", "nan", HUGE]},
    "lorapre": {"delta": ["1e-6", "0", "abc"], "targets": ["q_proj", "nothing", "[1]"], "rest": ["frozen", "x"],
                "init_std": ["0.02", "-1"], "scale": ["0.5", "[]", HUGE]},
    "lorapre-muon": {"momentum": ["0.9", "1.5"], "ns_steps": ["3", "0", "abc"], "nesterov": ["false", "2"]},
    "galore": {"update_proj_gap": ["1", "0"], "proj_type": ["std", "left", "diag"], "scale": ["0.25", "nan"]},
    "lora": {"use_rslora": ["true", "maybe"], "bias": ["none", "lora_only", "some"],
             "init_lora_weights": ["gaussian", "pissa_niter_2", "false", "loftq", "5"]},
    "lora-fa": {"init": ["svd", "kaiming", "zeros"], "delta": ["1e-8", "-1", HUGE]},
    "ffba": {"blocks": ["[attn]", "mlp", "[]", "[ffn]"], "activation": ["identity", "gelu", "swish?"]},
}


@st.composite
def run_overrides(draw):
    method, optimizer = draw(st.sampled_from(RUN_METHODS)), draw(st.sampled_from(RUN_OPTIMIZERS))
    if optimizer in ("lorapre", "lorapre-muon", "galore") and draw(st.booleans()):
        method = "full"  # valid combinations most of the time, invalid ones sometimes
    if optimizer == "loft" and draw(st.booleans()):
        method = "lora"
    chosen = [f"method={method}", f"optimizer={optimizer}"]
    for head, owner in (("method_args", "lora" if method == "dora" else method), ("optimizer_args", optimizer)):
        args = OWN_ARGS.get(owner, {})
        for key in draw(st.lists(st.sampled_from(sorted(args)), max_size=2, unique=True)) if args else []:
            chosen.append(f"{head}.{key}={draw(st.sampled_from(args[key]))}")
    chosen += [f"rank={draw(st.integers(1, 8))}", f"batch_size={draw(st.integers(1, 4))}",
               f"grad_accum={draw(st.integers(1, 3))}", f"steps={draw(st.integers(1, 2))}",
               f"max_length={draw(st.sampled_from([48, 64, 256]))}",
               f"precision={draw(st.sampled_from(['fp32', 'bf16']))}",
               f"lr={draw(st.sampled_from(['1e-3', '3e-2', '1e4']))}",  # 1e4 diverges: a clear error
               f"dropout={draw(st.sampled_from(['0', '0.3']))}", f"clip={draw(st.sampled_from(['0', '1.0']))}",
               f"schedule={draw(st.sampled_from(['constant', 'cosine']))}",
               f"warmup_steps={draw(st.integers(0, 2))}", f"seed={draw(st.integers(0, 2**31))}",
               f"count_flops={draw(st.sampled_from(['false', 'false', 'true']))}"]
    if draw(st.integers(0, 3)) == 0:
        chosen += ["fast_forward=true", "ff.burn_in=0", "ff.interval=1", f"ff.tiny_examples={draw(st.integers(1, 8))}"]
    return chosen


def quiet(*_args, **_kwargs):
    pass


def train_or_one_line_error(cfg, label) -> dict | None:
    """Train; a run that fails must fail with one of our one-line errors (then None, tallied by `label`)."""
    from rankwise.recipes.train import TrainingDiverged, train

    try:
        summary = train(cfg, say=quiet)
    except (ConfigError, DataError, TrainingDiverged) as e:
        event(label(e))
        assert_one_line(e)
        return None
    event("ran")
    return summary


@fuzz(8, fixtures=True)
@given(extra=run_overrides())
def test_valid_configs_run_to_a_finite_loss_or_fail_clearly(tiny_cfg, fuzz_paths, extra):
    base = dict(data=fuzz_paths["data"], out=fuzz_paths["root"] / "run", overwrite="true", eval_examples=4,
                eval_every=0)
    try:
        cfg = tiny_cfg(**{**base, **dict(x.split("=", 1) for x in extra)})
        validate(cfg)
    except ConfigError as e:
        event("rejected by validate")
        assert_one_line(e)
        return
    summary = train_or_one_line_error(cfg, lambda e: f"run: {type(e).__name__}")
    if summary is not None:
        assert math.isfinite(summary["eval_loss"]) and summary["step"] == cfg.steps


# ---- 3. JSONL data: accepted, or a DataError naming file:line ---------------------------------------
PROMPT_KEYS = ("prompt", "response", "messages")
ROLES = ["user", "assistant", "system", "tool", "", "🦙"]
LONG = st.sampled_from(["x" * 20_000, "word " * 3_000])


def json_scalar():
    return st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT


@st.composite
def jsonl_line(draw):
    """(kind, text): kind is 'record' (a usable example), 'blank' or 'bad' (must be refused at its line)."""
    kind = draw(st.sampled_from(["record"] * 6 + ["blank", "bad"]))
    content = TEXT | LONG if draw(st.integers(0, 20)) == 0 else TEXT
    if kind == "blank":
        return "blank", draw(st.sampled_from(["", " ", "\t", "  \t "]))
    if kind == "record":
        if draw(st.booleans()):
            row = {"prompt": draw(content), "response": draw(content)}
        else:
            first = {"role": draw(st.sampled_from(["user", "system", "tool"])), "content": draw(content)}
            middle = draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content}),
                                   max_size=2))
            row = {"messages": [first, *middle, {"role": "assistant", "content": draw(content)}]}
        if draw(st.booleans()):
            row["extra"] = draw(json_scalar())  # unknown keys are ignored
        return "record", json.dumps(row, ensure_ascii=draw(st.booleans()))
    bad = draw(st.sampled_from([
        "not json", "{", '{"prompt": "a", "response": ', "[1, 2]", '"text"', "42", "null", "{}",
        '{"prompt": "a"}', '{"response": "b"}', '{"prompt": 1, "response": "b"}', '{"prompt": "a", "response": null}',
        '{"messages": []}', '{"messages": "hi"}', '{"messages": [1]}', '{"messages": [{"role": "user"}]}',
        '{"messages": [{"role": "user", "content": "x"}]}', '{"messages": [{"role": 1, "content": "x"}]}',
        '{"messages": [{"role": "assistant", "content": "x"}]}', '{"messages": [{"role": "user", "content": ["x"]},'
        ' {"role": "assistant", "content": "y"}]}', "\ufeff{}", "{'prompt': 'a', 'response': 'b'}",
        '{"prompt": "\\udc80", "response": "b"}', '{"messages": [{"role": "user\\ud800", "content": "x"}, '
        '{"role": "assistant", "content": "y"}]}',
    ]))
    if draw(st.integers(0, 4)) == 0:  # any JSON value that is not a usable row
        value = draw(st.recursive(json_scalar(), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
            TEXT.filter(lambda k: k not in PROMPT_KEYS), inner, max_size=3), max_leaves=6))
        bad = json.dumps(value)
    return "bad", bad


@st.composite
def jsonl_file(draw):
    lines = draw(st.lists(jsonl_line(), max_size=50))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    data = newline.join(text for _, text in lines).encode()
    if draw(st.booleans()):
        data += newline.encode()
    if draw(st.integers(0, 4)) == 0:
        data = b"\xef\xbb\xbf" + data  # a BOM, as some editors write
    if lines and draw(st.integers(0, 6)) == 0:  # one line that is not UTF-8
        n = draw(st.integers(0, len(lines) - 1))
        lines[n] = ("bad", "")
        parts = data.split(newline.encode())
        parts[n] = b"\xff\xfe" + parts[n]
        data = newline.encode().join(parts)
    return [kind for kind, _ in lines], data


@fuzz(150)
@given(example=jsonl_file())
def test_any_jsonl_gives_splits_or_names_its_bad_line(tmp_path_factory, example):
    kinds, data = example
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(data)
    records = kinds.count("record")
    first_bad = kinds.index("bad") + 1 if "bad" in kinds else None
    try:
        splits = load_splits(str(path))
    except DataError as e:
        assert_one_line(e)
        if first_bad is not None:
            event("bad line")
            assert str(e).startswith(f"{path}:{first_bad}: "), (str(e)[:200], first_bad)
        elif records == 0:
            event("no examples")
            assert str(e) == f"{path}: no examples"
        else:
            event("too few")
            assert str(e).startswith(f"only {records} examples")
        return
    event("accepted")
    assert first_bad is None
    assert len(splits.train) + len(splits.tiny) + len(splits.test) + len(splits.validation) == records
    assert splits.train and splits.tiny and splits.test


@st.composite
def small_dataset(draw):
    n = draw(st.integers(1, 14))
    words = st.text(string.ascii_lowercase + " ", min_size=0, max_size=40)
    return [{"prompt": draw(words), "response": draw(words)} for _ in range(n)]


@fuzz(3, fixtures=True)
@given(rows=small_dataset())
def test_small_datasets_train_or_fail_clearly(tiny_cfg, fuzz_paths, rows):
    data = fuzz_paths["root"] / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(data=data, out=fuzz_paths["root"] / "small-run", overwrite="true", steps=1, eval_examples=4,
                   eval_every=0, max_length=256, count_flops="false")
    summary = train_or_one_line_error(cfg, lambda e: f"{type(e).__name__}: {str(e)[:20]}")
    if summary is not None:
        assert math.isfinite(summary["eval_loss"]) and summary["eval_loss"] > 0


# ---- found by fuzzing: each of these was a deep traceback before its fix ---------------------------------


def test_no_example_fits_max_length_is_a_clear_error(tiny_cfg, fuzz_paths, capsys):
    """recipe.build_run raises a plain ValueError, which cli.main re-raises as a traceback: it should be a
    DataError (or ConfigError)."""
    cfg = tiny_cfg(data=fuzz_paths["data"], max_length=4)
    with pytest.raises((ConfigError, DataError), match="max_length"):
        from rankwise.recipes.train import train

        train(cfg, say=quiet)


def test_divergence_is_one_line_from_the_cli(tiny_model_dir, fuzz_paths, capsys):
    """TrainingDiverged is a RuntimeError: cli.main must report it in one line, not as a traceback."""
    code = main(["train", f"model={tiny_model_dir}", f"data={fuzz_paths['data']}", f"out={fuzz_paths['root'] / 'nan'}",
                 "overwrite=true", "steps=2", "batch_size=2", "eval_examples=4", "sample=false", "lr=1e30",
                 "precision=fp32", "warmup_steps=0", "count_flops=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("rankwise: error: loss became")


def test_no_held_out_example_fits_is_a_clear_error(tiny_cfg, tmp_path):
    """When every test example is longer than max_length the recipe evaluates on nothing and reports
    eval_loss 0.0; build_run should refuse (as it does when no training example fits)."""
    from rankwise.data.sources import as_chat, split
    from rankwise.recipes.train import train

    for attempt in range(1000):  # rows whose held-out examples are all long, the training ones short
        rows = [{"prompt": f"q{i}-{attempt}" + (" long" * 200 if i % 2 else ""), "response": f"a{i}"}
                for i in range(40)]
        held = split([as_chat(r, "") for r in rows])
        if all(len(ex["messages"][0]["content"]) > 100 for ex in held.test + held.tiny):
            break
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises((ConfigError, DataError), match="max_length"):
        train(tiny_cfg(data=data, max_length=64, steps=1, count_flops="false"), say=quiet)


@pytest.mark.parametrize("override", [
    "seed=18446744073709551616",  # torch.manual_seed overflows deep in the run (and seed*100003 in the stream)
    "threads=100000000",  # torch.set_num_threads(10**8) crashes the process (SIGSEGV)
    "device=cuda:x",  # torch.device() raises RuntimeError in the run
    *[pytest.param(f"{key}={key[0] * 300}", id=f"{key}-name-too-long") for key in ("model", "out", "resume")],
])  # the last three: OSError (file name too long) from Path.is_dir / exists
def test_validate_refuses_what_the_run_cannot_use(tiny_model_dir, tmp_path, override):
    """validate() passes these (or raises OSError); each should be a ConfigError before anything loads."""
    base = [f"model={tiny_model_dir}", f"out={tmp_path / 'out'}"]
    with pytest.raises(ConfigError):
        validate(load_config(None, base + [override]))


def lora_cfg(model, data, out, *extra):
    """The 2-step rank-4 LoRA run of `lora_run`, and the same settings again for resuming it."""
    return load_config(None, [f"model={model}", f"data={data}", f"out={out}", "steps=2", "batch_size=2",
                              "eval_examples=4", "sample=false", "precision=fp32", "rank=4", "count_flops=false",
                              *extra])


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, fuzz_paths):
    """A finished 2-step LoRA run to resume from."""
    from rankwise.recipes.train import train

    out = fuzz_paths["root"] / "lora-run"
    train(lora_cfg(tiny_model_dir, fuzz_paths["data"], out), say=quiet)
    return out


@pytest.mark.parametrize("change", ["", "method=full", "rank=8"])
def test_resume_with_a_different_config_is_a_clear_error(tiny_model_dir, fuzz_paths, lora_run, tmp_path, change):
    """Resuming a checkpoint under a config that changes what is trained: method=full raised a plain ValueError
    from Full.load (a CLI traceback; so did a changed seed= or data=, from the example stream), and rank=8
    (or method=dora) silently resumed the saved rank-4 LoRA. Unchanged settings resume."""
    from rankwise.recipes.train import train

    cfg = lora_cfg(tiny_model_dir, fuzz_paths["data"], tmp_path / "resumed", f"resume={lora_run}", "steps=3",
                   *[change] if change else [])
    if not change:
        assert train(cfg, say=quiet)["step"] == 3
        return
    with pytest.raises(ConfigError, match=change.split("=")[0]):
        train(cfg, say=quiet)


@fuzz(100)
@given(data=st.data())
def test_resume_under_any_overrides_validates_or_fails_in_one_line(tiny_model_dir, fuzz_paths, lora_run, data):
    harmless = st.lists(st.sampled_from(["steps=4", "sample=true", "eval_every=1", "save_every=1", "threads=1",
                                         "count_flops=true", "overwrite=false", "nproc=1", "batch_size=3"]))
    extra = data.draw(harmless | overrides(fuzz_paths["all"] + [str(lora_run)], max_size=3), label="overrides")
    try:
        validate(lora_cfg(tiny_model_dir, fuzz_paths["data"], fuzz_paths["root"] / "resumed", f"resume={lora_run}",
                          *extra))
        event("valid")
    except ConfigError as e:
        event(f"ConfigError: {str(e)[:25]}")
        assert_one_line(e)


DAMAGE = {  # what a damaged checkpoint looks like, file by file
    "intact": lambda ckpt: None,
    "meta-truncated": lambda ckpt: (ckpt / "rankwise.json").write_text("{"),
    "meta-not-a-mapping": lambda ckpt: (ckpt / "rankwise.json").write_text("[]"),
    "state-garbage": lambda ckpt: (ckpt / "state.pt").write_bytes(b"not a torch file"),
    "adapter-emptied": lambda ckpt: [p.unlink() for p in (ckpt / "adapter").iterdir()],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(tiny_model_dir, fuzz_paths, lora_run, tmp_path, damage):
    """A damaged checkpoint (metadata truncated or not a mapping, state.pt or adapter unreadable) raises
    JSONDecodeError/AttributeError in validate's resume check, UnpicklingError from torch.load or a PEFT
    ValueError in build_run. Each should say, in one line, which checkpoint is damaged (a ConfigError, or a
    CheckpointError, which the CLI prints)."""
    import shutil

    from rankwise.recipes.train import CheckpointError, train

    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    DAMAGE[damage](out / "checkpoints" / "step-000002")
    cfg = lora_cfg(tiny_model_dir, fuzz_paths["data"], out, "resume=latest", "steps=3")
    if damage == "intact":
        assert train(cfg, say=quiet)["step"] == 3
        return
    with pytest.raises((ConfigError, CheckpointError)) as error:
        train(cfg, say=quiet)
    assert_one_line(error.value)

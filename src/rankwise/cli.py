"""Command line: parse, then call. Every subcommand is a thin shell over a library function."""
from __future__ import annotations

import argparse
import sys

from rankwise.config import ConfigError

EPILOG = "Config keys are the fields of rankwise.config.Config; `rankwise train --dry-run` prints them all."


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading argument without '=' is a YAML config file; the rest are key=value overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_train(ns) -> int:
    import yaml

    from rankwise.config import load_config
    from rankwise.validate import validate

    path, overrides = _split_config(ns.args)
    cfg = load_config(path, overrides)
    plan = validate(cfg)
    if ns.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print("config ok")
        return 0
    from rankwise.train import dist

    if cfg.nproc > 1 and not dist.under_torchrun():
        return dist.relaunch(["train", *ns.args], cfg.nproc)
    from rankwise.recipes.train import train

    summary = train(plan)
    return 130 if summary.get("stopped") else 0


def cmd_generate(ns) -> int:
    from rankwise.generate import generate, load_for_inference
    from rankwise.models import check_model

    if ns.model:
        check_model(ns.model)
    model, tok = load_for_inference(ns.model, ns.adapter)
    prompt = ns.prompt if ns.prompt != "-" else sys.stdin.read()
    print(generate(model, tok, [{"role": "user", "content": prompt}], max_new_tokens=ns.max_new_tokens))
    return 0


def cmd_merge(ns) -> int:
    from rankwise.generate import merge

    dest = merge(ns.adapter, ns.out, model=ns.model)
    print(f"merged model written to {dest}")
    return 0


def cmd_methods(ns) -> int:
    from rankwise.methods import METHODS
    from rankwise.optim import OPTIMIZERS
    from rankwise.hooks import HOOKS

    print("methods:   ", ", ".join(sorted(METHODS)))
    print("optimizers:", ", ".join(sorted(OPTIMIZERS)))
    print("hooks:     ", ", ".join(sorted(HOOKS)) or "-")
    return 0


def cmd_compare(ns) -> int:
    from rankwise.compare import compare, format_table

    rows = compare(ns.runs, ns.out, [ns.x] if ns.x else None)
    print(format_table(rows))
    print(f"plot written to {ns.out}")
    return 0


def cmd_bench(ns) -> int:
    from rankwise.bench import run_bench

    return run_bench(ns.name, ns.args)


def cmd_pretrain(ns) -> int:
    from rankwise.recipes.pretrain import main as pretrain_main  # LoRA-Pre issue: pre-training recipe

    return pretrain_main(ns.args[1:] if ns.args[:1] == ["--"] else ns.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description="Low-rank training of causal LMs.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model (default: SmolLM2-135M-Instruct, LoRA, stdlib docstrings)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value", help="config file and/or overrides")
    p.add_argument("--dry-run", action="store_true", help="validate and print the config, load nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate from a base model, optionally with a trained adapter")
    p.add_argument("prompt", help="the user message ('-' reads standard input)")
    p.add_argument("--adapter", help="run directory, checkpoint directory or PEFT adapter directory")
    p.add_argument("--model", help="base model: 'default' or a local directory (default: the adapter's base)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="fold a trained adapter into its base model and save the result")
    p.add_argument("adapter", help="run directory, checkpoint directory or PEFT adapter directory")
    p.add_argument("out", help="directory for the merged model")
    p.add_argument("--model", help="base model (default: the adapter's base)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("compare", help="several runs' losses in one plot, and a table of what each cost")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    p.add_argument("--out", default="compare.png", help="the PNG to write (default: compare.png)")
    p.add_argument("--x", metavar="steps|flops|seconds", help="one x axis only (default: all three)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("methods", help="list the registered methods, optimizers and hooks")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("pretrain", help="pre-train a small Llama from scratch on offline text", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("bench", help="benchmarks; `rankwise bench NAME --help` for each", add_help=False)
    p.add_argument("name", help="which benchmark, e.g. throughput")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain"]:  # its own parser owns every option, --help included
        argv = ["pretrain", "--"] + argv[1:]
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except ConfigError as e:
        print(f"rankwise: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:  # ours have one-line messages; anything else is a bug
        from rankwise.data import DataError
        from rankwise.recipes.train import CheckpointError, TrainingDiverged

        ours = (DataError, TrainingDiverged, CheckpointError, FileNotFoundError, PermissionError)
        if isinstance(e, ours) or type(e) is OSError:
            print(f"rankwise: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())

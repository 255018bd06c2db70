"""Command line: `megatron-spell {train,export,eval,report,demo}`.

`train --plan` validates the config and the parallel layout for the declared world size and prints
a per-rank memory estimate from the HF config.json alone, so cluster configs can be checked on a
laptop. `train --dry-run` adds every check of the target machine (checkpoint, corpus, tokenizer, run
directory, device rules) that the full `train` makes before anything heavy
(megatron_spell/preflight.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from megatron_spell.config import Config, format_config, load_config

log = logging.getLogger(__name__)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run SPELL training (or check it with --plan / --dry-run)")
    p.add_argument("--config", help="YAML preset (configs/, examples/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--plan",
        action="store_true",
        help="check config, layout and memory from the HF config.json only (any machine)",
    )
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="--plan plus every check of the target machine the run makes before its first step",
    )
    p.add_argument(
        "--replay", metavar="DIR", help="train from dumped rollouts in DIR, without vLLM"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_export(sub: argparse._SubParsersAction) -> None:
    from megatron_spell.convert.cli import add_export_arguments

    p = sub.add_parser(
        "export",
        help="write a Hugging Face directory (transformers, vLLM, `eval --model`) from a run's "
        "checkpoint, whatever TP/PP/EP layout saved it",
    )
    p.add_argument("run_dir", help="the run directory (or one of its checkpoints/step_XXXXXXXX)")
    p.add_argument("--out", required=True, help="the HF directory to write (new or empty)")
    add_export_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_export(args: argparse.Namespace) -> int:
    import warnings

    from megatron_spell.convert.cli import export, summary

    # Megatron/torch warn at import about missing TE/apex and deprecations: noise for a CLI user.
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", FutureWarning)
    print(summary(args.out, export(args, args.run_dir, args.out)))
    return 0


def check(config: Config, *, full: bool, replay_dir: str | None = None) -> int:
    """`train --plan` (full=False) or `train --dry-run` (full=True): print the plan, run no work."""
    from megatron_spell import preflight

    if full:
        checked = preflight.dry_run(config, replay_dir=replay_dir)
        print(checked.plan.summary())
        s = checked.corpus_stats
        print(f"corpus: {s.num_files} files, {s.num_rows} rows, {s.num_docs} documents")
        print("dry run OK")
    else:
        print(preflight.plan(config).summary())
        print("plan OK")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.plan or args.dry_run:
        print(format_config(config))
        return check(config, full=args.dry_run, replay_dir=args.replay)
    from megatron_spell.train import run  # heavy imports only past this point

    return run(config, replay_dir=args.replay)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO"),
        format=f"%(asctime)s [rank{os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s",
    )
    parser = argparse.ArgumentParser(prog="megatron-spell", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_export(sub)
    ev = sub.add_parser("eval", help="evaluate a model on long-document QA benchmarks")
    try:
        from megatron_spell.eval.cli import add_eval_arguments
    except ImportError:  # pragma: no cover - eval package not installed
        add_eval_arguments = None
    if add_eval_arguments is not None:
        add_eval_arguments(ev)
    rp = sub.add_parser("report", help="write a PNG of the main curves and a markdown summary")
    rp.add_argument("run_dir")
    dm = sub.add_parser(
        "demo", help="the CPU demo: SmolLM2-135M-Instruct on the bundled document sets"
    )
    dm.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model's HF directory only, then check the demo config as train --dry-run",
    )
    dm.add_argument(
        "--config",
        help="a SmolLM2 preset to run instead of configs/demo.yaml (configs/learn.yaml: the learning run)",
    )
    dm.add_argument("overrides", nargs="*", help="section.key=value overrides of the preset")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "export":
            return _run_export(args)
        if args.command == "eval":
            from megatron_spell.eval.cli import run_eval

            return run_eval(args)
        if args.command == "report":
            from megatron_spell.report import write_report

            print(write_report(args.run_dir))
            return 0
        if args.command == "demo":
            from megatron_spell.demo import run_demo

            kwargs = {"config_path": Path(args.config)} if args.config else {}
            return run_demo(args.overrides, dry_run=args.dry_run, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1

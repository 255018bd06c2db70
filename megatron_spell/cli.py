"""Command line: `megatron-spell {train,eval,report,demo}`.

`train --dry-run` validates the config, the parallel layout for the declared world size and prints a per-rank
memory estimate without importing Megatron or vLLM, so cluster configs can be checked on a laptop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_spell.config import Config, format_config, load_config
from megatron_spell.layout import ModelShape, estimate_memory_gib, validate_layout, validate_lengths

log = logging.getLogger(__name__)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run SPELL training (or validate it with --dry-run)")
    p.add_argument("--config", help="YAML preset (configs/, examples/)")
    p.add_argument(
        "--dry-run", action="store_true", help="validate config, layout and memory; no work"
    )
    p.add_argument(
        "--replay", metavar="DIR", help="train from dumped rollouts in DIR, without vLLM"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def dry_run(config: Config) -> int:
    """Validate without heavy imports; print the layout and the memory estimate."""
    shape = ModelShape.from_hf_dir(config.model.hf_dir)
    world = config.parallel.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_layout(config.parallel, shape, world)
    validate_lengths(config, shape)
    mem = estimate_memory_gib(config, shape, layout)
    print(f"model: {shape.architecture} ({shape.num_params() / 1e9:.2f}B parameters)")
    print(
        f"layout: world={layout.world_size} TP={layout.tp} PP={layout.pp} VPP={layout.vpp} "
        f"CP={layout.cp} DP={layout.dp} EP={layout.ep} ETP={layout.etp}"
    )
    print(
        "memory per rank (GiB, training phase): "
        + ", ".join(f"{k}={v:.2f}" for k, v in mem.items())
    )
    print("dry run OK")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(format_config(config))
        return dry_run(config)
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
        help="build the model's HF directory only, then validate the demo config as train --dry-run",
    )
    dm.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "eval":
            from megatron_spell.eval.cli import run_eval

            return run_eval(args)
        if args.command == "report":
            from megatron_spell.report import write_report

            print(write_report(args.run_dir))
            return 0
        if args.command == "demo":
            from megatron_spell.demo import run_demo

            return run_demo(args.overrides, dry_run=args.dry_run)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1

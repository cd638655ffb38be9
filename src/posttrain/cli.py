"""The ``posttrain`` command: one sub-command per stage, plus tools.

Bad input ends with one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import datasets
import transformers
from accelerate import PartialState

from posttrain import __version__
from posttrain import config as config_io
from posttrain.errors import UserCodeError, UserError
from posttrain.stages.dpo import DPOConfig, run_dpo
from posttrain.stages.grpo import GRPOConfig, RLOOConfig, run_grpo
from posttrain.stages.ppo import PPOConfig, run_ppo
from posttrain.stages.rm import RMConfig, run_rm
from posttrain.stages.sft import SFTConfig, run_sft
from posttrain.training.output import check_not_an_input

# name -> (config dataclass, run function, one-line description)
STAGES: dict[str, tuple[type, Callable, str]] = {
    "sft": (SFTConfig, run_sft, "supervised fine-tuning on demonstrations"),
    "dpo": (DPOConfig, run_dpo, "preference optimisation: DPO and its family (--loss)"),
    "rm": (RMConfig, run_rm, "reward model from pairwise preferences (Bradley–Terry; --ensemble K)"),
    "ppo": (PPOConfig, run_ppo, "RLHF with PPO against a reward, under a KL penalty to the reference"),
    "grpo": (GRPOConfig, run_grpo, "critic-free RL with group-normalised advantages (GRPO)"),
    "rloo": (RLOOConfig, run_grpo, "critic-free RL with the leave-one-out baseline (RLOO)"),
}

# Instruments: name -> (module, one-line description). Each module has ``add_arguments(parser)``
# and ``run(args)``; its heavy imports stay inside ``run``, so ``posttrain --help`` stays fast.
INSTRUMENTS: dict[str, tuple[str, str]] = {
    "bon": ("posttrain.instruments.bon", "best-of-n: proxy and gold reward against KL_bon, from one set of samples"),
    "eval": ("posttrain.instruments.evaluate", "accuracy, abstention, hallucination and calibration of models"),
    "report": ("posttrain.instruments.report", "one HTML page for one or several runs posttrain wrote"),
    "audit": (
        "posttrain.instruments.audit",
        "an audit of preference data: agreement, annotator reliability, bias probes, hygiene",
    ),
    "annotate": (
        "posttrain.annotate.cli",
        "pairwise labelling by people: sample pairs, serve them in a browser, export preferences",
    ),
}


def _run_stage(args: argparse.Namespace) -> None:
    config_cls, run_stage, _ = STAGES[args.command]
    config = config_io.resolve(config_cls, args)
    check_not_an_input(config.output, [("--config", args.config)] if args.config else [])
    output = run_stage(config)
    if PartialState().is_main_process:
        print(f"wrote {output}")


def _run_instrument(args: argparse.Namespace) -> None:
    importlib.import_module(INSTRUMENTS[args.command][0]).run(args)


def _import_gguf(args: argparse.Namespace) -> None:
    from posttrain.models.gguf import import_gguf

    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UserError(f"{output}: directory is not empty; pass --overwrite to replace it")
    import_gguf(args.gguf_file, output)
    print(f"wrote {output}")


def _demo(args: argparse.Namespace) -> None:
    from posttrain.demo import run_demo

    run_demo(Path(args.output), steps=args.max_steps)


def _lab(args: argparse.Namespace) -> None:
    from posttrain.lab.experiments import ExperimentConfig, parse_seeds, run_experiment
    from posttrain.lab.pipeline import LabConfig, run_lab

    if args.experiment:
        if args.seed is not None or args.annotators is not None:
            raise UserError("--experiment takes --seeds, not --seed or --annotators (each arm says its own pool)")
        seeds = parse_seeds(args.seeds or "0")
        only = tuple(args.arms.split(",")) if args.arms else ()
        config = ExperimentConfig(args.experiment, args.output, args.preset, seeds, args.reuse, only)
        output = run_experiment(config)
        print(f"wrote {output / 'report.html'} (numbers in {output / 'experiment.json'})")
        return
    if args.seeds or args.arms:
        raise UserError("--seeds and --arms go with --experiment; a single lab run takes --seed")
    config = LabConfig(args.output, args.preset, args.seed or 0, args.annotators or "biased", args.reuse)
    output = run_lab(config)
    print(f"wrote {output / 'report.html'} (numbers in {output / 'summary.json'})")


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit code 2 (argparse would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def unrecognized(command: str, unknown: list[str]) -> str:
    """The error for flags ``command`` does not take, naming the stages that do take the first one."""
    name = next((a for a in unknown if a.startswith("--")), "").split("=")[0]
    takers = [stage for stage, (cls, _, _) in STAGES.items()
              if stage != command and name in {config_io.flag(f.name) for f in dataclasses.fields(cls)}]  # fmt: skip
    hint = f" ({name} is an option of posttrain {' / '.join(takers)})" if takers else ""
    return f"unrecognized arguments: {' '.join(unknown)}{hint}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="posttrain", description="Post-training for language models.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    debug = OneLineParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    for name, (config_cls, _, description) in STAGES.items():
        sub = commands.add_parser(name, help=description, description=description, parents=[debug])
        config_io.add_arguments(sub, config_cls)
        sub.set_defaults(handler=_run_stage)
    for name, (module, description) in INSTRUMENTS.items():
        sub = commands.add_parser(name, help=description, description=description, parents=[debug])
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(handler=_run_instrument)
    gguf = commands.add_parser(
        "import-gguf", parents=[debug], help="convert a GGUF file into a trainable Hugging Face checkpoint"
    )
    gguf.add_argument("gguf_file", help="the .gguf file")
    gguf.add_argument("output_dir", help="directory to write the checkpoint to")
    gguf.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    gguf.set_defaults(handler=_import_gguf)
    demo = commands.add_parser("demo", parents=[debug], help="build a tiny model and data, then run SFT on them")
    demo.add_argument("--output", default="runs/demo", help="directory for the demo's files (default: runs/demo)")
    demo.add_argument("--max-steps", type=int, default=300, help="SFT steps (default: 300)")
    demo.set_defaults(handler=_demo)
    lab = commands.add_parser(
        "lab", parents=[debug], help="the lab: base -> SFT -> preferences -> reward model, measured"
    )
    lab.add_argument("--output", default="runs/lab", help="directory of the run (default: runs/lab)")
    lab.add_argument("--preset", default="quick", help="quick, full or smoke (default: quick)")
    lab.add_argument("--seed", type=int, default=None, help="seed of the world and every step (default: 0)")
    lab.add_argument("--annotators", default=None, help="annotator pool: biased, careful or mix (default: biased)")
    lab.add_argument("--experiment", default="", metavar="NAME",
                     help="run an experiment over seeds instead: kl-sweep, frontier, labels, mitigations or "
                     "calibration (docs/lab.md)")  # fmt: skip
    lab.add_argument("--seeds", default="", metavar="S,S,...", help="an experiment's seeds (default: 0)")
    lab.add_argument("--arms", default="", metavar="ARM,...", help="run only these arms of the experiment "
                     "(and the arms they read from; default: all)")  # fmt: skip
    lab.add_argument("--reuse", default="", metavar="DIR",
                     help="copy the steps that do not depend on the annotators (data, base, sft) from the lab run "
                     "in DIR (same preset and seed); with --experiment, the trunk's steps (up to the reward model) "
                     "from another experiment or a biased lab run")  # fmt: skip
    lab.set_defaults(handler=_lab)
    return parser


def quiet_libraries() -> None:
    """No progress bars from datasets and transformers (mapping, loading and saving): a user error
    is then the only line on stderr; posttrain's own training bar stays."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, f"posttrain {args.command}: error: {unrecognized(args.command, unknown)}\n")
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("posttrain").setLevel(logging.INFO)
    try:
        args.handler(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"posttrain {args.command}: error: {err}", file=sys.stderr)
        if isinstance(err, UserCodeError):  # the user's own code failed: show them where
            print(err.user_traceback(), end="", file=sys.stderr)
        return err.exit_code
    return 0

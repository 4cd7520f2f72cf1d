"""The ``advfunc`` command: ``train``, ``evaluate``, ``compare`` (:mod:`.classify`), ``decoder`` and ``methods``.

Exit status: 0 on success, 2 for a usage or input error (the message says which file, column,
label or setting and what to do), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

# Before transformers is imported anywhere: never reach the network for a model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers

from advfunc.app.classify import commands as classify
from advfunc.app.common.flags import COUNT, Parser
from advfunc.app.decoder import job as decoder
from advfunc.methods import registry

log = logging.getLogger("advfunc")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="advfunc",
        description="Functional adversarial fine-tuning of Hugging Face classifiers: train, attack, compare.",
    )
    parser.add_argument("--threads", type=COUNT, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    classify.add_commands(commands)
    commands.add_parser("methods", help="list the methods and their hyper-parameters").set_defaults(handler=run_methods)
    decoder.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``advfunc`` console script and ``python -m advfunc``."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # a usage error (one line already printed), or --help
        return exit.code if isinstance(exit.code, int) else 2
    args.command_line = list(argv) if argv is not None else sys.argv[1:]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s advfunc: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)  # torchrun: first reports
    log.propagate = False
    transformers.logging.set_verbosity_error()  # the load reports would bury advfunc's own lines
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args))
    except (ValueError, FloatingPointError) as error:  # bad input (all of advfunc's own errors), a diverged run
        print(f"advfunc: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advfunc: interrupted; no partial checkpoint or report was left behind", file=sys.stderr)
        return 130


def entry_point(argv: Sequence[str] | None = None) -> int:
    """The ``advfunc`` process: :func:`main`, then the process group a launcher made torn down.

    Left to interpreter shutdown, a gloo worker thread can free a finished collective after Python
    has begun to exit, and the process aborts ("terminate called without an active exception")
    after its work is saved. Not on an uncaught error: another rank may still wait in a collective.
    """
    code = main(argv)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


def run_methods(args: argparse.Namespace) -> int:
    """``advfunc methods``: what ``--method`` accepts."""
    for name in registry.available():
        options = ", ".join(f"{k}={h.default}" for k, h in registry.hyperparameters(name).items())
        print(f"{name:8s} {options or '(no hyper-parameters)'}")
    return 0

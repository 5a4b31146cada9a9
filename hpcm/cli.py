"""The front door: ``hpcm <command> [args]`` runs one stage's command line.

    hpcm train      one (variant, lambda) run                       (hpcm.train.loop)
    hpcm evaluate   real bitstreams and metrics of one checkpoint   (hpcm.evaluate.bitstreams)
    hpcm data       sample export, dataset preparation and checks   (hpcm.data.commands)
    hpcm rd         R-D points, BD tables                           (hpcm.analysis.rd)
    hpcm tables     every registered table                          (hpcm.analysis.tables)
    hpcm plots      R-D curves, training curves, gamma schedules    (hpcm.analysis.plots)
    hpcm anchors    published anchors                               (hpcm.analysis.anchors)

Everything after the command name goes to that stage's own parser (``hpcm tables --help``).
Without the console script (a checkout that was not ``pip install``-ed), ``python -m hpcm`` is the
same front door. The stage is imported only when its command runs, so ``hpcm --help`` does not
load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # the stage module whose ``main(argv)`` runs the command
    summary: str


COMMANDS = {
    "train": Command("hpcm.train.loop", "train one (variant, lambda) run from a run config"),
    "evaluate": Command(
        "hpcm.evaluate.bitstreams", "real bitstreams of one checkpoint: bpp, PSNR, MS-SSIM"
    ),
    "data": Command("hpcm.data.commands", "sample photos; prepare and verify Kodak, CLIC, Tecnick"),
    "rd": Command("hpcm.analysis.rd", "R-D points from evaluation CSVs; BD-rate / BD-PSNR"),
    "tables": Command("hpcm.analysis.tables", "every registered table as CSV, Markdown, LaTeX"),
    "plots": Command("hpcm.analysis.plots", "R-D curves, training curves, gamma schedules"),
    "anchors": Command("hpcm.analysis.anchors", "published anchors: list, BD, add"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcm",
        description="HPCM x Balanced R-D: the pipeline's commands.",
        epilog="Run `hpcm COMMAND --help` for a command's own options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        # add_help=False: --help goes through to the stage's own parser with the rest of argv
        sub.add_parser(name, help=command.summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_parser().parse_args(argv[:1]).command  # exits on --help or a bad name
    return importlib.import_module(COMMANDS[command].module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

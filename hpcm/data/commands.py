"""``hpcm data``: export the embedded sample photos; prepare and verify the registered datasets.

    hpcm data export-samples --output DIR [--splits train val test]
    hpcm data prepare KIND --output DIR [--source DIR_ARCHIVE_OR_URL] [--only a.png,b.png]
        [--manifest FILE]
    hpcm data verify KIND FOLDER [--only ...] [--manifest FILE]

KIND is a registered dataset kind (:data:`hpcm.data.datasets.DATASET_KINDS`); ``--only`` and
``--manifest`` apply to the kinds that declare them (see :mod:`hpcm.data.datasets`).
``python -m hpcm.data`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hpcm.data.datasets import DATASET_KINDS, DATASET_OPTIONS
from hpcm.data.images import SAMPLE_SPLITS, export_samples
from hpcm.util.cli import run_command

# How the command line spells each dataset option (every one of DATASET_OPTIONS has a flag).
OPTION_HELP = {
    "only": "comma-separated subset of file names, e.g. kodim01.png,kodim02.png",
    "manifest": "SHA256SUMS to verify against (tecnick default: hpcm/data/tecnick.sha256)",
}


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The dataset options given on the command line, checked against the kind's own."""
    given = {name: getattr(args, name) for name in DATASET_OPTIONS if getattr(args, name)}
    kind = DATASET_KINDS[args.kind]
    wrong = sorted(set(given) - set(kind.options))
    if wrong:
        takers = {o: [k.name for k in DATASET_KINDS.values() if o in k.options] for o in wrong}
        raise ValueError(
            "; ".join(
                f"--{o} applies to {', '.join(takers[o]) or 'no kind'}, not {args.kind}"
                for o in wrong
            )
        )
    if "only" in given:
        given["only"] = given["only"].split(",")
    return given


def _export(args: argparse.Namespace) -> None:
    written = export_samples(args.output, args.splits)
    print(f"wrote {len(written)} images under {args.output}", file=sys.stderr)


def _prepare(args: argparse.Namespace) -> None:
    paths = DATASET_KINDS[args.kind].prepare(args.source, args.output, **_options(args))
    print(f"{args.kind}: {len(paths)} verified image(s) in {args.output}")


def _verify(args: argparse.Namespace) -> None:
    paths = DATASET_KINDS[args.kind].verify(Path(args.folder), **_options(args))
    print(f"{args.kind}: {len(paths)} image(s) verified in {args.folder}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcm data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser(
        "export-samples", help="write the embedded sample set as PNG folders DIR/{train,val,test}"
    )
    export.add_argument("--output", required=True, help="destination folder")
    export.add_argument(
        "--splits", nargs="+", default=["train", "val", "test"], choices=list(SAMPLE_SPLITS)
    )
    export.set_defaults(func=_export)
    prepare = sub.add_parser("prepare", help="gather, verify and place a dataset")
    prepare.add_argument("kind", choices=list(DATASET_KINDS))
    prepare.add_argument("--source", help="folder, archive or URL (default: the pinned URLs)")
    prepare.add_argument("--output", required=True, help="folder to create")
    prepare.set_defaults(func=_prepare)
    verify = sub.add_parser("verify", help="re-check a prepared folder")
    verify.add_argument("kind", choices=list(DATASET_KINDS))
    verify.add_argument("folder")
    verify.set_defaults(func=_verify)
    for command in (prepare, verify):
        for name in DATASET_OPTIONS:
            command.add_argument(f"--{name}", help=OPTION_HELP[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

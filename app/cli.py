"""The `recon` command line: fit, demo, distill, eval, view, render, export, convert, process, eval-mesh.

The parser and `main`; each command lives in its module (`fit_command`, `eval_command`, `view_command`,
`render_command`, `export_command`, `scene_command`), which adds its subparsers; what they share is in
`cli_shared`.
"""

from __future__ import annotations

import argparse
import sys

from recon.app import eval_command, export_command, fit_command, render_command, scene_command, view_command
from recon.app.checkpoint import CheckpointError
from recon.app.distributed import RankFailed, join, leave, world
from recon.app.run import UserError
from recon.cuda import kernels_mode
from recon.data.scene import SceneError

DISTRIBUTED_COMMANDS = ("fit", "demo", "distill", "eval", "render")  # what torchrun's ranks share (app.distributed)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (its usage block runs to dozens for `fit`), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"recon: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="recon", description="Neural-field 3D reconstruction from posed images.")
    sub = parser.add_subparsers(dest="command", required=True)  # its subparsers are Parsers too
    for command in (fit_command, eval_command, view_command, render_command, export_command, scene_command):
        command.add_parsers(sub)  # in --help's order
    return parser


def check_kernels_mode() -> None:
    """A bad RECON_KERNELS is one line and exit 2 before any work."""
    try:
        kernels_mode()
    except ValueError as error:
        raise UserError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` runs again on each rank
    try:
        check_kernels_mode()
        ranks = join(getattr(args, "device", None) or "auto")
        if ranks.distributed and args.command not in DISTRIBUTED_COMMANDS:
            raise UserError(f"{args.command}: runs in one process (distributed: {', '.join(DISTRIBUTED_COMMANDS)})")
        args.func(args)
    except RankFailed as error:
        print(f"recon: error: {error}", file=sys.stderr)
        raise SystemExit(4) from None
    except (SceneError, UserError, CheckpointError) as error:
        if world().main:  # the ranks of a distributed run meet the same error: rank 0 says it
            print(f"recon: error: {error}", file=sys.stderr)
        leave()  # the same error on every rank (rank 0's refusals are agreed): they leave together, as on success
        raise SystemExit(getattr(error, "exit_code", 2))
    leave()


if __name__ == "__main__":
    main()

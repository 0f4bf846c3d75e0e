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
from recon.app.run import UserError
from recon.cuda import kernels_mode
from recon.data.scene import SceneError


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
    try:
        check_kernels_mode()
        args.func(args)
    except (SceneError, UserError, CheckpointError) as error:
        print(f"recon: error: {error}", file=sys.stderr)
        raise SystemExit(getattr(error, "exit_code", 2))


if __name__ == "__main__":
    main()

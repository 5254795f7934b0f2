"""The ``geoupsample`` command line: one typer app, one module per sub-command.

Each module in :mod:`geoupsample.commands` defines ``register(app)``; this file only wires them.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import typer

from geoupsample.core.allocator import tune_allocator

app = typer.Typer(
    name="geoupsample",
    help="Guided upsampling of coarse rasters (features, probabilities, bands) to full resolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain (click) help: each option's text wraps in the width left beside the option's name,
    # not in rich's narrow third column (about 250 lines for upsample at 80 columns)
    rich_markup_mode=None,
)

#: Sub-command modules, in the order ``--help`` lists them. A module that is missing is skipped.
COMMAND_MODULES = ("demo", "upsample", "features", "segment", "predict")

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"geoupsample.commands.{_name}")
    except ModuleNotFoundError as err:  # a command not written yet
        if err.name != f"geoupsample.commands.{_name}":
            raise
        continue
    _module.register(app)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """Warnings as ``warning: <message>`` lines on stderr, not Python's ``file:line: Category:``
    with the source line."""
    print(f"warning: {message}", file=file or sys.stderr)


def main() -> None:
    """Console-script entry point."""
    tune_allocator()  # before any thread allocates: see geoupsample.core.allocator
    warnings.showwarning = show_warning
    app()


if __name__ == "__main__":
    main()

"""The ``geoupsample`` command line: one typer app, one module per sub-command.

Each module in :mod:`geoupsample.commands` defines ``register(app)``; this file only wires them.
"""

from __future__ import annotations

import importlib

import typer

from geoupsample.core.allocator import tune_allocator

app = typer.Typer(
    name="geoupsample",
    help="Guided upsampling of coarse rasters (features, probabilities, bands) to full resolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def main() -> None:
    """Console-script entry point."""
    tune_allocator()  # before any thread allocates: see geoupsample.core.allocator
    app()


if __name__ == "__main__":
    main()

"""CLI sub-commands; each module exposes ``register(app: typer.Typer)``."""

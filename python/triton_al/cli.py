"""The `triton-al` command line.

Each area of the product owns its commands in its own module, exposing
``register(app)``; this file only gathers them so that the CLI stays one small place.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="triton-al",
    help="Active learning for models served by NVIDIA Triton Inference Server.",
    no_args_is_help=True,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """Active learning for models served by NVIDIA Triton Inference Server."""


# Modules that contribute commands (each defines `register(app: typer.Typer) -> None`).
COMMAND_MODULES = [
    "triton_al.serving.commands",
    "triton_al.uploader.commands",
    "triton_al.loop.commands",
    "triton_al.drift",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

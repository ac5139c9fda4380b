"""The one mgmflow command line. Each capability adds its commands here.

Errors the user can fix print one line and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import os
import sys

# Before torch loads anywhere: two OpenMP threads are intermittently 20x slower on small CPUs.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import click  # noqa: E402

from models.errors import MGMFlowError  # noqa: E402


class _Group(click.Group):
    """Turns our typed errors into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MGMFlowError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """mgmflow: reason with Mini-Gemini, generate and edit with diffusion, over durable workflows."""

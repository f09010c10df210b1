"""The `fastedit` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from fastedit import __version__
from fastedit.errors import FasteditError


class _Group(click.Group):
    """A group that turns fastedit's own errors into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FasteditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastedit")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Edit facts in language models with minimal precomputation (ROME, MEMIT, EMMET, AlphaEdit)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=min(level, logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastedit").setLevel(min(level, logging.INFO))
    if verbose < 2:
        for noisy in ("transformers", "huggingface_hub", "datasets", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


# ---- arch ----------------------------------------------------------------------------------------------


@cli.group()
def arch() -> None:
    """The layer-hook registry: where each model family keeps its modules."""


@arch.command("list")
def arch_list() -> None:
    """List the registered model families and their module templates."""
    from fastedit.arch.describe import describe_registry

    click.echo(describe_registry())


@arch.command("show")
@click.argument("model")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (hub models).")
def arch_show(model: str, trust_remote_code: bool) -> None:
    """Resolve MODEL's module paths and sizes from its config (weights are not loaded)."""
    from fastedit.arch.describe import describe_model

    click.echo(describe_model(model, trust_remote_code=trust_remote_code))


def main() -> None:
    cli(prog_name="fastedit")


if __name__ == "__main__":
    main()

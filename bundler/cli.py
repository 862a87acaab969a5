"""Command line: parse, call one core function, render the result, map errors to exit codes."""

from __future__ import annotations

import sys

import click

from bundler import __version__
from bundler.errors import EXIT_CODES, BundlerError

EXIT_TABLE = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


@click.group(epilog=f"Exit codes:\n\n{EXIT_TABLE}")
@click.version_option(__version__, prog_name="pyannote-bundle")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build and verify air-gapped bundles for pyannote.audio speaker diarization."""
    ctx.obj = {"debug": debug}


@cli.command("recipes")
def recipes_cmd() -> None:
    """List the recipes shipped with pyannote-bundle."""
    from bundler.spec import recipe_names

    for name in recipe_names():
        click.echo(name)


def main(argv: list[str] | None = None) -> None:
    """Entry point: BundlerError becomes one line and its exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="pyannote-bundle", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BundlerError as exc:
        if debug:
            raise
        click.echo(f"pyannote-bundle: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)

"""Command line: parse, call one core function, render the result, map errors to exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


@cli.command("build")
@click.option("--recipe", default="speaker-diarization-3.1", show_default=True,
              help="A shipped recipe (see `pyannote-bundle recipes`).")
@click.option("--spec", "spec_file", type=click.Path(path_type=Path),
              help="A spec file of the same form as a recipe (overrides --recipe).")
@click.option("--output", "-o", "output", type=click.Path(path_type=Path), required=True,
              help="Folder for the tarball and its .sha256 sidecar.")
@click.option("--lockfile", type=click.Path(path_type=Path), help="Use this lockfile.")
@click.option("--index-url", default="https://pypi.org/simple", show_default=True)
@click.option("--extra-index-url", multiple=True)
@click.option("--find-links", multiple=True)
@click.option("--compression", type=click.Choice(["none", "zstd", "gzip"]), default="none",
              show_default=True, help="Wheels are zip-compressed already: none is fastest.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              default=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
              / "pyannote-bundle", show_default="~/.cache/pyannote-bundle")
def build_cmd(recipe: str, spec_file: Path | None, output: Path, lockfile: Path | None,
              index_url: str, extra_index_url: tuple[str, ...], find_links: tuple[str, ...],
              compression: str, cache_dir: Path) -> None:
    """Build one checksummed, reproducible bundle.

    \b
    Example (HF_TOKEN must have access to the gated pyannote repos):
      HF_TOKEN=hf_... pyannote-bundle build --recipe speaker-diarization-3.1 --output out/

    HF_ENDPOINT selects another Hub; SOURCE_DATE_EPOCH sets the recorded time.
    """
    from bundler.build import BuildOptions, build
    from bundler.spec import IndexOptions, load_recipe, load_spec

    spec = load_spec(spec_file) if spec_file else load_recipe(recipe)
    opts = BuildOptions(output_dir=output, cache_dir=cache_dir, lockfile=lockfile,
                        index=IndexOptions(index_url, extra_index_url, find_links),
                        compression=compression, endpoint=os.environ.get("HF_ENDPOINT"),
                        token=os.environ.get("HF_TOKEN"))
    result = build(spec, opts)
    click.echo(f"{result.packed.path}\n{result.packed.sidecar}")


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--prefix", type=click.Path(path_type=Path),
              help="Install here (default: a temporary folder, removed afterwards).")
@click.option("--keep", is_flag=True, help="Keep the work folder and the install.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-smoke", is_flag=True, help="Check and install, but do not diarize.")
def verify_cmd(bundle: Path, prefix: Path | None, keep: bool, as_json: bool,
               no_smoke: bool) -> None:
    """Prove a bundle is intact, installs offline, and diarizes with the network disabled.

    \b
    Example:
      pyannote-bundle verify out/speaker-diarization-3.1-3.4.0-py311-linux-x86_64.tar --json
    """
    import json as _json

    from bundler.verify import VerifyOptions, verify

    try:
        report = verify(bundle, VerifyOptions(prefix=prefix, keep=keep, smoke=not no_smoke))
    except BundlerError as exc:
        if as_json:
            click.echo(_json.dumps(getattr(exc, "report", {"ok": False, "error": str(exc)})))
            sys.exit(exc.exit_code)
        raise
    if as_json:
        click.echo(_json.dumps(report))
        return
    integ = report["integrity"]
    click.echo(f"integrity: ok ({integ['files']} files, sidecar {integ['sidecar']})")
    click.echo(f"install:   ok ({report['install']['packages']} packages, "
               f"{report['install']['seconds']} s)")
    smoke = report["smoke"]
    if smoke.get("skipped"):
        click.echo("smoke:     skipped (--no-smoke)")
    else:
        click.echo(f"smoke:     ok ({len(smoke['segments'])} segments, {smoke['speakers']} "
                   f"speakers, {smoke['seconds']} s, network: {report['network_isolation']})")


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

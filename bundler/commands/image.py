"""``pyannote-bundle image``: a bundle made into an OCI image archive (then self-tested on
request), or an image's self-test alone; which one, from what BUNDLE is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.errors import InputError
from bundler.image import ImageOptions, ImageResult, build_image, render_result
from bundler.image import self_test as run_self_test
from bundler.oci.reader import is_image


@dataclass(frozen=True)
class ImageOutcome:
    """What ``image`` did: ``image`` is None when only an existing image was self-tested;
    ``self_test`` is None when no self-test ran."""

    image: ImageResult | None
    self_test: dict[str, Any] | None


def make_image(bundle: Path | None, *, output: Path | None, cache_dir: Path,
               base: str | None, tag: str | None, mirror: str,
               allowed_signers: Path | None, self_test: bool) -> ImageOutcome:
    """Refuse what cannot be an input, then build and/or self-test."""
    if bundle is None:
        raise InputError("image needs a BUNDLE (or an IMAGE.oci.tar with --self-test)")
    if bundle.is_dir() and not is_image(bundle):
        raise InputError(f"{bundle} is a folder: give a bundle tarball (or an image's OCI "
                         "layout folder with --self-test)")
    if is_image(bundle):
        if not self_test:
            raise InputError(f"{bundle.name} is an image already: use --self-test to run it, "
                             "or `pyannote-bundle inspect` to read it")
        return ImageOutcome(None, run_self_test(bundle))
    if output is None:
        raise InputError("image needs --output DIR")
    res = build_image(bundle, ImageOptions(output_dir=output, cache_dir=cache_dir, base=base,
                                           tag=tag, mirror=mirror,
                                           allowed_signers=allowed_signers))
    return ImageOutcome(res, run_self_test(res.path) if self_test else None)


def _self_test_line(tested: dict[str, Any]) -> str:
    return (f"self-test: ok - {tested['segments']} segments, {tested['speakers']} speakers, "
            f"engine {tested['engine']}, expected result: {tested['expected']}")


def render(outcome: ImageOutcome, as_json: bool) -> str:
    """The text (or with ``as_json`` the one JSON object) the command prints."""
    tested = outcome.self_test
    if outcome.image is None:
        assert tested is not None  # a self-test alone always ran
        return json.dumps({"self_test": tested}) if as_json else _self_test_line(tested)
    if as_json:
        return json.dumps({**outcome.image.as_dict(), "self_test": tested})
    text = render_result(outcome.image)
    return f"{text}\n{_self_test_line(tested)}" if tested else text

"""``pyannote-bundle lock``: the spec and the lockfile's paths from the arguments, then a
new lock, or (``--check``) whether the one there is still true to its ``.in``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundler.errors import LockError
from bundler.spec import IndexOptions, Target, load_recipe, load_spec


@dataclass(frozen=True)
class Locked:
    """The lockfile, the ``.in`` it answers, and how many pins were written (None: checked
    and found up to date, nothing written)."""

    lockfile: Path
    source: Path
    pins: int | None

    def render_text(self) -> str:
        """The line the command prints."""
        if self.pins is None:
            return f"{self.lockfile}: up to date with {self.source.name}"
        return f"{self.lockfile}: {self.pins} packages pinned with hashes"


def lock_recipe(*, recipe: str, spec_file: Path | None, source: Path | None,
                output: Path | None, target_slug: str | None, check: bool, upgrade: bool,
                index: IndexOptions) -> Locked:
    """Lock (or with ``check``, check offline) a recipe's or a spec's requirements;
    a stale lockfile raises ``LockError`` (exit 4)."""
    from bundler.lock import check as check_lock
    from bundler.lock import default_paths, lock

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
        return Locked(paths.lockfile, paths.source, None)
    pins = lock(paths, spec.target, spec.index(index), upgrade=upgrade)
    return Locked(paths.lockfile, paths.source, len(pins))

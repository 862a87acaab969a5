"""``pyannote-bundle verify``: the limits and options from the arguments, the verification,
and the report as the text a sysadmin reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bundler.integrity import Limits
from bundler.verify import VerifyOptions, verify


def verify_bundle(bundle: Path, *, prefix: Path | None, keep: bool, smoke: bool,
                  install: bool, max_bytes: int, max_members: int, hash_members: bool,
                  allowed_signers: Path | None, python: str | None,
                  use_pip: bool) -> dict[str, Any]:
    """Verify ``bundle``; the report is ``verify``'s (what ``--json`` prints)."""
    # One member may not be larger than the whole: a smaller --max-bytes lowers both.
    limits = Limits(max_bytes=max_bytes, max_members=max_members,
                    max_member_bytes=min(max_bytes, Limits.max_member_bytes))
    return verify(bundle, VerifyOptions(prefix=prefix, keep=keep, smoke=smoke,
                                        limits=limits, hash_members=hash_members,
                                        allowed_signers=allowed_signers,
                                        python=python, use_pip=use_pip,
                                        install=install))


def render_text(report: dict[str, Any], installed: bool) -> str:
    """One line per proof: signature, integrity, install, smoke, the voiceprints and the
    service where the bundle has them (``installed``: False with ``--no-install``)."""
    integ = report["integrity"]
    lines = []
    if "signature" in report:
        lines.append(f"signature: ok (signed by {report['signature']['signer']})")
    lines.append(f"integrity: ok ({integ['files']} files, sidecar {integ['sidecar']})")
    if not installed:
        slug = (report.get("target") or {}).get("slug")
        lines.append("install:   skipped (--no-install)"
                     + (f"; the bundle is for {slug}" if slug else ""))
        return "\n".join(lines)
    lines.append(f"install:   ok ({report['install']['packages']} packages, "
                 f"{report['install']['seconds']} s)")
    smoke = report["smoke"]
    if smoke.get("skipped"):
        lines.append("smoke:     skipped (--no-smoke)")
    else:
        formats = ", ".join(f"{fmt} {len(f['segments'])} segments"
                            for fmt, f in smoke.get("formats", {}).items())
        lines.append(f"smoke:     ok (bin/diarize: {formats}; {smoke['speakers']} speakers, "
                     f"{smoke['seconds']} s; network: {report['network_isolation']}, "
                     f"{smoke.get('network_attempts', 0)} connection attempts)")
        voiced = smoke.get("voiceprints")
        if voiced:  # a bundle with bin/enroll: a voice of the sample enrolled, then named
            lines.append(voiceprints_line(voiced))
        served = smoke.get("serve")
        if served:  # a bundle with bin/serve: the smoke test sent it the sample
            lines.append(f"serve:     ok (bin/serve answered POST {served['endpoint']} with "
                         f"{served['sample']} on 127.0.0.1:{served['port']}: "
                         f"{served['segments']} segments, {served['speakers']} speakers in "
                         f"{served['request_seconds']} s; ready in {served['ready_seconds']} s,"
                         f" stopped cleanly on SIGTERM)")
    return "\n".join(lines)


def voiceprints_line(voiced: dict[str, Any]) -> str:
    """The smoke test's voiceprint check (runtime/smoke_voiceprints.py) in one line: named,
    or not shown (the models hear several voices in the one-voice turn: random weights)."""
    if voiced.get("ok") is None:
        return f"voiceprints: not shown ({voiced.get('not_shown')})"
    sample = voiced.get("on_sample") or {}
    found = (f"named on all of {voiced['sample']} too, similarity {sample.get('similarity')}"
             if sample.get("named") else f"not named on all of {voiced['sample']} (best "
             f"similarity {sample.get('best_similarity')}, below the threshold)")
    return (f"voiceprints: ok (bin/enroll took '{voiced['name']}' from {voiced['enrolled']} "
            f"in {voiced['enroll_seconds']} s; bin/diarize --voiceprints named it in that "
            f"clip, similarity {voiced['similarity']}, in JSON and RTTM; {found}; "
            f"{voiced['seconds']} s in all)")

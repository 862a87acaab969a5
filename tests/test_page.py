"""bin/serve's page, fast: its files are served with the headers that keep it to this server,
ship in the bundle and the wheel, and name no other origin; the two endpoints it needs (a
job's recording for the player, the speakers' names) check owners and input like the rest of
the API. A real browser drives it in tests/test_e2e_page.py."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from test_serve import Server, _error, _finish_next, _post, _result, _wav

from bundler import layout, render
from bundler.runtime import page, service, transcript

PAGE_DIR = Path(page.__file__).parent / "page"


@pytest.fixture
def srv(tmp_path: Path) -> Server:
    return Server(tmp_path / "state", max_upload=200_000, queue=3)


def _done(srv: Server, key: str | None = None, result: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """A job of ``key``'s, finished by a stand-in worker with ``result``."""
    _finish_next(srv, result or _result())
    job = dict(_post(srv, key=key).json())
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    for _ in range(200):
        if srv.client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] \
                == "succeeded":
            return job
        time.sleep(0.02)
    raise AssertionError("the stand-in worker did not finish the job")


def test_the_page_and_its_files_carry_the_headers_that_keep_it_to_this_server(
        srv: Server) -> None:
    r = srv.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert '<script src="/page/app.js"' in r.text and "<script>" not in r.text  # no inline
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css"),
                        ("icon.svg", "image/svg+xml")):
        got = srv.client.get(f"/page/{name}")
        assert got.status_code == 200 and got.headers["content-type"].startswith(media)
        assert got.content == (PAGE_DIR / name).read_bytes()
        assert got.headers["content-security-policy"] == csp
    for name in ("index.html", "..%2fpage.py", "nope.js"):
        _error(srv.client.get(f"/page/{name}"), 404, "not_found")
    assert srv.client.head("/").status_code == 200


def test_the_page_names_no_other_origin_and_ships_in_the_bundle_and_the_wheel() -> None:
    for name in page.ASSETS:
        # SVG's namespace is a name, never fetched.
        text = (PAGE_DIR / name).read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        # No CDN, font or analytics: every URL is a path on this server.
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.I), name
        assert "@import" not in text and "url(" not in text, name
        assert layout.PROGRAMS[f"{layout.RUNTIME_DIR}/page/{name}"] == f"page/{name}"
        # What the build writes into the bundle is the file as committed.
        assert render.runtime_bytes(f"page/{name}") == (PAGE_DIR / name).read_bytes()
    assert {f"page/{p.name}" for p in PAGE_DIR.iterdir()} == set(layout.PAGE_FILES)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"bundler.runtime.page" = ["*.html", "*.js", "*.css", "*.svg"]' in pyproject


def test_speakers_are_renamed_in_every_result_and_refused_when_wrong(srv: Server) -> None:
    srv.store.add_key("alice", service.key_digest("pbk_alice"))
    srv.store.add_key("bob", service.key_digest("pbk_bob"))
    alice, bob = ({"Authorization": "Bearer pbk_alice"}, {"Authorization": "Bearer pbk_bob"})
    job = _done(srv, "pbk_alice")
    url = f"/v1/jobs/{job['id']}/speakers"
    _error(srv.client.patch(url, json={"SPEAKER_00": "Bob"}, headers=bob), 404, "not_found")
    _error(srv.client.patch(url, json={"SPEAKER_00": "X"}), 401, "missing_api_key")
    for body in ({}, [], "Alice", {"SPEAKER_07": "Alice"}, {"SPEAKER_00": ""},
                 {"SPEAKER_00": "A" * 65}, {"SPEAKER_00": "Al\nice"}, {"SPEAKER_00": 3},
                 {"SPEAKER_00": "SPEAKER_01"}, {"SPEAKER_00": "Al", "SPEAKER_01": "Al"}):
        err = _error(srv.client.patch(url, json=body, headers=alice), 400, "invalid_value")
        assert err["param"] == "speakers" and err["message"], body
    _error(srv.client.patch(url, content=b"{not json", headers=alice), 400, "invalid_value")
    assert srv.store.get(job["id"], None).speakers == {}  # type: ignore[union-attr]
    r = srv.client.patch(url, json={"SPEAKER_00": " Alice "}, headers=alice)
    assert r.status_code == 200 and r.json()["speakers"] == {"SPEAKER_00": "Alice"}
    srt = srv.client.get(f"/v1/jobs/{job['id']}/result?format=srt", headers=alice).text
    assert "[Alice] Hello there." in srt and "SPEAKER_00" not in srt
    doc = srv.client.get(f"/v1/jobs/{job['id']}/result", headers=alice).json()
    assert doc["speakers"] == ["Alice", "SPEAKER_01"]
    assert srv.client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["speakers"] == {
        "SPEAKER_00": "Alice"}
    # Another speaker's rename keeps Alice; renaming back to the label undoes a rename.
    srv.client.patch(url, json={"SPEAKER_01": "Bea"}, headers=alice)
    assert srv.client.patch(url, json={"SPEAKER_00": "SPEAKER_00"}, headers=alice).json()[
        "speakers"] == {"SPEAKER_01": "Bea"}
    assert srv.client.get(f"/v1/jobs/{job['id']}/result?format=srt", headers=alice).text \
        == transcript.to_srt(_result()["segments"]).replace("SPEAKER_01", "Bea")


def test_a_job_not_finished_has_no_speakers_to_rename(srv: Server) -> None:
    job = _post(srv).json()
    _error(srv.client.patch(f"/v1/jobs/{job['id']}/speakers", json={"SPEAKER_00": "A"}),
           409, "not_ready")


def test_the_recording_is_served_to_its_owner_whole_or_by_range(srv: Server) -> None:
    srv.store.add_key("alice", service.key_digest("pbk_alice"))
    srv.store.add_key("bob", service.key_digest("pbk_bob"))
    alice = {"Authorization": "Bearer pbk_alice"}
    job = _done(srv, "pbk_alice")
    url = f"/v1/jobs/{job['id']}/audio"
    wav = _wav(0.5)  # what _post uploaded
    r = srv.client.get(url, headers=alice)
    assert r.status_code == 200 and r.content == wav
    assert r.headers["content-type"] == "audio/x-wav"
    assert r.headers["accept-ranges"] == "bytes"
    part = srv.client.get(url, headers={**alice, "Range": "bytes=4-11"})
    assert part.status_code == 206 and part.content == wav[4:12]
    assert part.headers["content-range"] == f"bytes 4-11/{len(wav)}"
    _error(srv.client.get(url, headers={"Authorization": "Bearer pbk_bob"}), 404, "not_found")
    _error(srv.client.get(url), 401, "missing_api_key")
    srv.client.delete(f"/v1/jobs/{job['id']}", headers=alice)
    _error(srv.client.get(url, headers=alice), 404, "not_found")

"""bin/serve's page in a real headless Chromium (Debian's ``chromium``, driven by Selenium
through Debian's ``chromium-driver``), against the installed community-1 bundle's
``PREFIX/bin/serve`` with the real tiny.en: what someone without a shell does, click by click.

Sign in with a key ``bin/serve keys add`` made (a wrong one first), upload a text file, a
file over ``--max-upload`` and the espeak-ng dialogue (dropped), wait for it, read both
speakers and the words in the page, click a line and see the player go there, rename
``SPEAKER_00`` to Alice, download the SRT and find Alice in it, delete the job. Browser and
server share a network namespace with only loopback up, and the browser's own request log
must name no origin but the server's (an isolated network has no CDN: a page that reached
for one would hang there). Screenshots at 1280x800 and 390x844 are written to a folder the
test prints. Then known voices: enroll one on the page, check it (keyboard) among the
upload's options, upload, read its name in the transcript, delete it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import serve_helpers as sh
import speech
from e2e import Installed, real_segmentation_config

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver
SIZES = {"wide": (1280, 800), "phone": (390, 844)}
# Four turns of the dialogue, both voices (about 20 s): several lines, short enough for a
# busy 2-core host.
LINES = speech.DEFAULT_LINES[:4]
WORDS = ("report", "meeting", "sales", "units", "news")
LABELS = {"SPEAKER_00", "SPEAKER_01"}
MAX_UPLOAD_MB = 4  # the server's --max-upload here: the dialogue fits, long.wav does not


def browser(downloads: Path) -> Any:
    """Headless Chromium with the Network log on and downloads into ``downloads``. The
    driver's path is given: Selenium Manager never looks for (or downloads) one."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
        "apt-get install chromium chromium-driver (as .ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def wait(what: str, check: Callable[[], Any], timeout: float = 30, step: float = 0.2) -> Any:
    """``check()``'s first truthy value within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for, from the browser's DevTools Network events."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def use_the_page(driver: Any, base: str, key: str, dialogue: Path, text_file: Path,
                 big_file: Path, downloads: Path, shots: Path) -> dict[str, Any]:
    """Everything a person does on the page, checked as it goes; what was seen."""
    from selenium.webdriver.common.by import By

    def error_text() -> str:
        box = driver.find_element(By.ID, "error")
        return "" if box.get_attribute("hidden") is not None else str(box.text)

    driver.set_window_size(*SIZES["wide"])
    driver.get(base + "/")
    assert driver.title and driver.find_element(By.CSS_SELECTOR, "label[for=key]").text

    # A wrong key: told in words, nothing else shown.
    driver.find_element(By.ID, "key").send_keys("pbk_not-a-key")
    driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
    wrong_key = wait("the wrong key's error", error_text)
    assert "Wrong or missing key" in wrong_key and "Incorrect API key" in wrong_key, wrong_key
    assert not driver.find_element(By.ID, "upload").is_displayed()

    driver.find_element(By.ID, "key").clear()
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
    wait("the upload form", lambda: driver.find_element(By.ID, "upload").is_displayed())
    assert driver.execute_script("return sessionStorage.getItem('pyannote-serve-key')") == key
    assert key not in driver.current_url

    # A text file: refused in words (415), nothing queued.
    driver.find_element(By.ID, "files").send_keys(str(text_file))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    not_audio = wait("the text file's error", error_text)
    assert "Not an audio or video file" in not_audio and text_file.name in not_audio, not_audio
    # A recording over the server's --max-upload: refused in words (413) as it streams in.
    driver.find_element(By.ID, "files").send_keys(str(big_file))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    too_large = wait("the large file's error", lambda: big_file.name in error_text()
                     and error_text())
    assert "Too large" in too_large and "--max-upload" in too_large, too_large

    driver.find_element(By.ID, "language").send_keys("en")  # an option sent with the file
    # The dialogue is dropped on the drop zone (the picker only hands the file over: a
    # WebDriver cannot drag from the desktop).
    driver.find_element(By.ID, "files").send_keys(str(dialogue))
    driver.execute_script("""
        const input = document.getElementById('files'), data = new DataTransfer();
        for (const f of input.files) data.items.add(f);
        input.value = '';
        const drop = document.getElementById('drop');
        for (const type of ['dragover', 'drop'])
          drop.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true,
                                                  cancelable: true}));""")
    row = "#job-rows tr td.file"
    wait("the job in the list", lambda: [c for c in driver.find_elements(By.CSS_SELECTOR, row)
                                         if c.text == dialogue.name], timeout=60)
    open_button = f"button[aria-label='Open {dialogue.name}']"
    wait("the job to succeed", lambda: driver.find_elements(By.CSS_SELECTOR, open_button),
         timeout=600, step=1)
    job_row = driver.find_element(By.CSS_SELECTOR, "#job-rows tr")
    duration, rtf = (job_row.find_element(By.CSS_SELECTOR, f"td.{c}").text
                     for c in ("duration", "rtf"))
    assert duration.count(":") == 1 and float(rtf) > 0, (duration, rtf)
    driver.find_element(By.CSS_SELECTOR, open_button).click()
    lines = wait("the transcript", lambda: driver.find_elements(By.CSS_SELECTOR, "#lines .line"))
    text = " ".join(line.text for line in lines).lower()
    assert all(word in text for word in WORDS), text
    # Both speakers the diarization found are named on the page (each with its rename
    # field); every line is one of theirs. (The session's bundle has random-weight
    # diarization checkpoints: both speakers span the whole recording and the words go to
    # SPEAKER_00, so the lines alone cannot show both.)
    fields = driver.find_elements(By.CSS_SELECTOR, "#speakers input")
    assert {f.get_attribute("data-label") for f in fields} == LABELS
    assert {f.get_attribute("value") for f in fields} == LABELS
    said = {w.text.rstrip(":") for w in driver.find_elements(By.CSS_SELECTOR, "#lines .who")}
    assert "SPEAKER_00" in said and said <= LABELS, said
    wait("the recording in the player", lambda: driver.execute_script(
        "return document.getElementById('player').readyState >= 1"))

    # Click a later line: the player goes to its start, and that line is the one lit.
    target = lines[2]
    start = float(target.get_attribute("data-start"))
    assert start > 1.0
    target.click()
    at = wait("the player at the line", lambda: driver.execute_script(
        "const t = document.getElementById('player').currentTime;"
        f"return t >= {start} - 0.05 ? t : 0;"))
    wait("the line lit", lambda: "playing" in target.get_attribute("class"))
    driver.execute_script("document.getElementById('player').pause()")

    # Rename SPEAKER_00 everywhere, then download the SRT with the new name.
    field = driver.find_element(By.CSS_SELECTOR, "input[data-label='SPEAKER_00']")
    field.clear()
    field.send_keys("Alice")
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Rename SPEAKER_00']").click()
    wait("Alice in the transcript", lambda: "Alice:" in [
        w.text for w in driver.find_elements(By.CSS_SELECTOR, "#lines .who")])
    names = {w.text.rstrip(":") for w in driver.find_elements(By.CSS_SELECTOR, "#lines .who")}
    lit = driver.find_elements(By.CSS_SELECTOR, "#lines .line.playing")
    assert [b.get_attribute("data-index") for b in lit] == ["2"]  # still lit, re-rendered
    assert names == {"Alice" if n == "SPEAKER_00" else n for n in said}, names
    assert driver.find_element(By.CSS_SELECTOR, "input[data-label='SPEAKER_00']"
                               ).get_attribute("value") == "Alice"

    # What the page looks like, renamed speaker and all, wide and on a phone.
    shots.mkdir(parents=True, exist_ok=True)
    for name, size in SIZES.items():
        driver.set_window_size(*size)
        driver.execute_script("document.getElementById('transcript').scrollIntoView()")
        time.sleep(0.5)
        assert driver.save_screenshot(str(shots / f"page-{name}.png"))
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= size[0], f"{name}: the page is {width} px wide in a {size[0]} px window"
    driver.set_window_size(*SIZES["wide"])
    buttons = {b.text: b for b in driver.find_elements(By.CSS_SELECTOR, "#downloads button")}
    assert set(buttons) == {f"Download {f}" for f in ("JSON", "SRT", "WebVTT", "TXT", "RTTM")}
    buttons["Download SRT"].click()
    srt_path = downloads / f"{dialogue.stem}.srt"
    srt = wait("the SRT download", lambda: srt_path.is_file() and srt_path.read_text())
    assert "[Alice]" in srt and "SPEAKER_00" not in srt, srt[:500]

    # Deleting the job empties the list and closes its transcript.
    driver.find_element(By.CSS_SELECTOR, f"button[aria-label='Delete {dialogue.name}']").click()
    wait("the list emptied", lambda: not driver.find_elements(By.CSS_SELECTOR, "#job-rows tr"))
    assert not driver.find_element(By.ID, "transcript").is_displayed()
    console = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return {"wrong_key": wrong_key, "not_audio": not_audio, "too_large": too_large,
            "player_at": at, "start": start,
            "urls": requested_urls(driver), "console": console}


def use_known_voices(driver: Any, base: str, key: str, clip: Path, shots: Path
                     ) -> dict[str, Any]:
    """A voice enrolled on the page (name and clip, from the keyboard), checked among the
    upload's known speakers, a recording uploaded with it, its name read in the transcript,
    then the voiceprint deleted; what was seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.set_window_size(*SIZES["wide"])
    driver.get(base + "/")
    driver.find_element(By.ID, "key").send_keys(key + Keys.ENTER)
    wait("the voices form", lambda: driver.find_element(By.ID, "voices").is_displayed())
    known = driver.find_element(By.ID, "known-list")
    wait("no voices yet", lambda: "No voices enrolled yet" in known.text)
    driver.find_element(By.ID, "voice-clip").send_keys(str(clip))
    driver.find_element(By.ID, "voice-name").send_keys("alice" + Keys.ENTER)  # submits
    wait("the enrollment", lambda: driver.find_element(By.ID, "voice-status").text
         == "Enrolled alice.", timeout=300, step=1)
    box = wait("alice among the known speakers", lambda: driver.find_elements(
        By.CSS_SELECTOR, "#known-list input[type=checkbox][value='alice']"))[0]
    label = box.find_element(By.XPATH, "..")
    assert label.tag_name == "label" and label.text.strip() == "alice", label.text
    box.send_keys(Keys.SPACE)  # keyboard-usable: a checkbox takes the space bar
    assert box.is_selected()
    listed = driver.find_element(By.ID, "voice-list").text
    assert "alice" in listed and "clip(s)" in listed, listed

    driver.find_element(By.ID, "files").send_keys(str(clip))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    open_button = f"button[aria-label='Open {clip.name}']"
    wait("the job to succeed", lambda: driver.find_elements(By.CSS_SELECTOR, open_button),
         timeout=600, step=1)
    driver.find_element(By.CSS_SELECTOR, open_button).click()
    wait("the transcript", lambda: driver.find_elements(By.CSS_SELECTOR, "#lines .line"))
    said = {w.text.rstrip(":") for w in driver.find_elements(By.CSS_SELECTOR, "#lines .who")}
    shots.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shots / "page-known-voices.png"))

    driver.find_element(By.CSS_SELECTOR,
                        "button[aria-label='Delete the voiceprint of alice']").click()
    wait("the voiceprint deleted", lambda: "No voices enrolled yet" in known.text)
    console = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return {"said": sorted(said), "urls": requested_urls(driver), "console": console}


def main(argv: list[str]) -> int:
    """Run as a program (in the server's network namespace, where only loopback exists):
    ``test_e2e_page.py ARGS_JSON OUT_JSON`` drives the page and writes what it saw."""
    args = json.loads(argv[0])
    downloads, shots = Path(args["downloads"]), Path(args["shots"])
    driver = browser(downloads)
    try:
        if args.get("voices"):
            seen = use_known_voices(driver, args["base"], args["key"], Path(args["clip"]),
                                    shots)
        else:
            seen = use_the_page(driver, args["base"], args["key"], Path(args["dialogue"]),
                                Path(args["text_file"]), Path(args["big_file"]), downloads,
                                shots)
    except BaseException:
        shots.mkdir(parents=True, exist_ok=True)  # what the page showed when it failed
        driver.save_screenshot(str(shots / "failed.png"))
        (shots / "failed.html").write_text(driver.page_source)
        raise
    finally:
        driver.quit()
    Path(argv[1]).write_text(json.dumps(seen))
    return 0


@contextmanager
def isolated_server(inst: Installed, name: str, *args: str
                    ) -> Iterator[tuple[sh.Server, str, list[str]]]:
    """bin/serve on the installed bundle with one key (made by ``bin/serve keys add``), in a
    network namespace of its own with only loopback up (an isolated host); with the
    command prefix that enters it."""
    state = inst.base / name
    key = sh.keys_add(inst.prefix, state, "alice")
    wrap = ("unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")
    server = sh.start(inst.prefix, state, "--workers", "1", "--max-upload",
                      f"{MAX_UPLOAD_MB}M", *args, wrap=wrap)
    inside = ["nsenter", f"--net=/proc/{server.proc.pid}/ns/net"]

    def status(path: str) -> int:
        out = subprocess.run([*inside, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              server.url + path], capture_output=True, text=True).stdout
        return int(out or 0)

    try:
        sh.wait_ready(server, fetch=status)
        yield server, key, inside
    finally:
        sh.stop_process(server.proc)


@pytest.fixture(scope="module")
def page_server(community_installed: Installed) -> Iterator[tuple[sh.Server, str, list[str]]]:
    with isolated_server(community_installed, "serve-page") as served:
        yield served


def test_a_person_uploads_reads_renames_and_downloads_in_a_real_browser(
        page_server: tuple[sh.Server, str, list[str]], tmp_path: Path) -> None:
    server, key, inside = page_server
    dialogue, text_file = tmp_path / "dialogue.wav", tmp_path / "notes.wav"
    speech.dialogue(dialogue, LINES)
    text_file.write_text("This is a note, not a recording.\n")
    big_file = tmp_path / "long.wav"
    with open(big_file, "wb") as f:  # a WAV's first bytes, then more than the server takes
        f.write(dialogue.read_bytes()[:44])
        f.truncate((MAX_UPLOAD_MB + 1) << 20)
    downloads, shots, out = tmp_path / "downloads", tmp_path / "screenshots", tmp_path / "seen"
    downloads.mkdir()
    args = {"base": server.url, "key": key, "dialogue": str(dialogue),
            "text_file": str(text_file), "big_file": str(big_file), "downloads": str(downloads),
            "shots": str(shots)}
    # The browser runs in the server's namespace: no route anywhere but loopback.
    proc = subprocess.run([*inside, sys.executable, __file__, json.dumps(args), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stderr[-4000:], server.stderr[-2000:])
    seen = json.loads(out.read_text())
    print(f"screenshots: {shots}")
    assert {p.name for p in shots.iterdir()} == {"page-wide.png", "page-phone.png"}
    # The browser asked this server only: no CDN, font or analytics, whatever was clicked.
    others = [u for u in seen["urls"] if not u.startswith((server.url + "/", "blob:", "data:"))]
    assert seen["urls"] and not others, others
    assert f"{server.url}/page/app.js" in seen["urls"]
    assert any(u.endswith("/audio") for u in seen["urls"])
    # The only console errors are the refusals the test asked for (401, 415 and 413).
    unexpected = [m for m in seen["console"]
                  if not any(s in m for s in (" 401 ", " 415 ", " 413 "))]
    assert not unexpected, unexpected


def test_a_person_enrolls_a_voice_and_reads_its_name_in_a_real_browser(
        community_installed: Installed, tmp_path: Path) -> None:
    """The page's known voices: enroll, check, upload, read the name, delete. The server
    runs the real segmentation-3.0 (with the bundle's random segmentation weights every
    clip holds two voices and enrollment refuses it: tests/test_e2e_voiceprints.py), and
    the recording is the enrolled clip itself: with random embedding weights that is the
    only audio a voiceprint is sure to name (similarity 1), so this proves the page's path,
    not that voices are told apart."""
    config = real_segmentation_config(community_installed,
                                      community_installed.base / "serve-page-voices-release")
    clip = tmp_path / "alice.wav"
    speech.dialogue(clip, [("A", "My sister keeps a small garden behind her house near the "
                                 "river."),
                           ("A", "Every summer she grows tomatoes, beans and a few flowers.")])
    shots, out = tmp_path / "screenshots", tmp_path / "seen"
    with isolated_server(community_installed, "serve-page-voices", "--config", str(config),
                         "--engine", "pytorch", "--beam-size", "1") as (server, key, inside):
        args = {"voices": True, "base": server.url, "key": key, "clip": str(clip),
                "downloads": str(tmp_path), "shots": str(shots)}
        proc = subprocess.run([*inside, sys.executable, __file__, json.dumps(args), str(out)],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stderr[-4000:], server.stderr[-2000:])
        left = list((server.state / "voiceprints" / "alice").iterdir())
    seen = json.loads(out.read_text())
    print(f"screenshots: {shots}")
    assert seen["said"] == ["alice"], seen["said"]
    assert left == []  # deleted on the page: the file is gone
    others = [u for u in seen["urls"] if not u.startswith((server.url + "/", "blob:", "data:"))]
    assert seen["urls"] and not others, others
    assert f"{server.url}/v1/voiceprints" in seen["urls"]
    assert not seen["console"], seen["console"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

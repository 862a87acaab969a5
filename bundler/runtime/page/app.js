// bin/serve's page: plain JavaScript, no framework, no build step, nothing fetched from
// anywhere but this server. Every text from the server goes in through textContent (a file
// name or a transcript is data, never markup). The key lives in sessionStorage only and
// travels as an Authorization header, never in a URL.
"use strict";

const KEY = "pyannote-serve-key";
const POLL_MS = 2000;
const FORMATS = {  // download label -> [format, file extension]
  JSON: ["json", "json"], SRT: ["srt", "srt"], WebVTT: ["vtt", "vtt"], TXT: ["txt", "txt"],
  RTTM: ["rttm", "rttm"],
};
const DIARIZATION_FORMATS = ["JSON", "RTTM"];
const MAX_KNOWN = 4;  // known speakers per request, as the API (and OpenAI's) allows
// What each refusal means, before the server's own words.
const STATUS_WORDS = {
  401: "Wrong or missing key", 404: "Not found", 409: "Not ready yet",
  413: "Too large", 415: "Not an audio or video file", 422: "Cannot read this recording",
  429: "The queue is full", 503: "The server is busy",
};

const $ = (id) => document.getElementById(id);
const state = { key: null, jobs: new Map(), open: null, segments: [], audioUrl: null,
                poll: null };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

// One line for a refusal: what it means, then the server's error.message.
function explain(status, bodyText, own) {
  let message = "";
  try { message = JSON.parse(bodyText).error.message; } catch (e) { message = ""; }
  const words = (own && own[status]) || STATUS_WORDS[status] || ("Error " + status);
  return message ? words + ": " + message : words + ".";
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}),
                 cache: "no-store" };
  if (body) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error("The server cannot be reached: " + e.message);
  }
  if (!response.ok) {
    const err = new Error(explain(response.status, await response.text()));
    err.status = response.status;
    throw err;
  }
  return response;
}

// --- signing in ------------------------------------------------------------------------
async function signIn(key) {
  state.key = key;
  try {
    await api("GET", "/v1/jobs");
  } catch (e) {
    state.key = null;
    sessionStorage.removeItem(KEY);
    showError(e.message);
    $("key").select();  // typed again, not appended to
    return;
  }
  sessionStorage.setItem(KEY, key);
  showError("");
  $("key").value = "";
  $("who").textContent = key ? "Signed in with your key." : "Signed in (this server has no keys).";
  $("signout").hidden = false;
  $("upload").hidden = false;
  $("voices").hidden = false;
  $("jobs").hidden = false;
  refresh();
  loadVoices();
  if (!state.poll) state.poll = setInterval(refresh, POLL_MS);
}

function signOut() {
  sessionStorage.removeItem(KEY);
  state.key = null;
  clearInterval(state.poll);
  state.poll = null;
  closeTranscript();
  for (const id of ["upload", "voices", "jobs", "signout"]) $(id).hidden = true;
  $("job-rows").textContent = "";
  $("known-list").textContent = "";
  $("voice-list").textContent = "";
  $("who").textContent = "Signed out.";
}

// --- uploading -------------------------------------------------------------------------
function upload(file) {
  const row = document.createElement("li");
  const name = document.createElement("span");
  name.textContent = file.name + " ";
  const bar = document.createElement("progress");
  bar.max = 100;
  bar.value = 0;
  bar.setAttribute("aria-label", "Upload of " + file.name);
  const note = document.createElement("span");
  note.className = "note";
  row.append(name, bar, note);
  $("uploads").prepend(row);

  const form = new FormData();
  form.append("file", file, file.name);
  const language = $("language").value.trim();
  if (language) form.append("language", language);
  const speakers = $("num-speakers").value.trim();
  if (speakers) form.append("num_speakers", speakers);
  for (const name of knownChecked()) form.append("known_speaker_names[]", name);

  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/jobs");
  for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = 100 * e.loaded / e.total; };
  xhr.onload = () => {
    if (xhr.status === 202) {
      bar.value = 100;
      note.textContent = " uploaded";
      refresh();
    } else {
      const text = explain(xhr.status, xhr.responseText);
      row.classList.add("failed");
      note.textContent = " " + text;
      showError(file.name + ": " + text);
    }
  };
  xhr.onerror = () => {
    row.classList.add("failed");
    note.textContent = " the upload did not reach the server";
    showError(file.name + ": the upload did not reach the server.");
  };
  xhr.send(form);
}

function uploadAll(files) {
  if (!files || !files.length) { showError("Choose one or more recordings first."); return; }
  if (knownChecked().length > MAX_KNOWN) {
    showError("Check at most " + MAX_KNOWN + " known speakers.");
    return;
  }
  showError("");
  for (const file of files) upload(file);
}

// --- known voices (voiceprints) ------------------------------------------------------------
function knownChecked() {
  return Array.from(document.querySelectorAll("#known-list input:checked"), (c) => c.value);
}

async function loadVoices() {
  if (state.key === null) return;
  let data;
  try {
    data = await (await api("GET", "/v1/voiceprints")).json();
  } catch (e) {
    showError(e.message);
    return;
  }
  const checked = new Set(knownChecked());
  const known = $("known-list");
  const list = $("voice-list");
  known.textContent = "";
  list.textContent = "";
  for (const vp of data.data) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "known_speaker_names[]";
    box.value = vp.name;
    box.checked = checked.has(vp.name);
    label.append(box, " " + vp.name);
    known.append(label);

    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "voice";
    name.textContent = vp.name;
    const clips = vp.clips || [];
    const speech = clips.reduce((t, c) => t + (c.speech_seconds || 0), 0);
    const about = document.createElement("span");
    about.textContent = clips.length + " clip(s), " + speech.toFixed(1) + " s of speech, " +
      vp.created + " ";
    li.append(name, about,
              button("Delete", "Delete the voiceprint of " + vp.name, () => removeVoice(vp.name)));
    list.append(li);
  }
  if (!data.data.length) known.textContent = "No voices enrolled yet.";
}

async function enrollVoice() {
  const name = $("voice-name").value.trim();
  const clip = $("voice-clip").files[0];
  if (!name || !clip) { showError("Give a name and a clip of that voice."); return; }
  const form = new FormData();
  form.append("name", name);
  form.append("file", clip, clip.name);
  $("voice-status").textContent = "Enrolling " + name + "...";
  let response;
  try {
    response = await fetch("/v1/voiceprints", { method: "POST", headers: headers(),
                                                body: form, cache: "no-store" });
  } catch (e) {
    $("voice-status").textContent = "";
    showError("The server cannot be reached: " + e.message);
    return;
  }
  if (response.status !== 201) {
    $("voice-status").textContent = "";
    showError(name + ": " + explain(response.status, await response.text(),
                                    { 409: "Already enrolled", 422: "Cannot enroll this clip" }));
    return;
  }
  showError("");
  $("voice-status").textContent = "Enrolled " + name + ".";
  $("voice-name").value = "";
  $("voice-clip").value = "";
  loadVoices();
}

async function removeVoice(name) {
  try {
    await api("DELETE", "/v1/voiceprints/" + encodeURIComponent(name));
  } catch (e) {
    showError(e.message);
    return;
  }
  $("voice-status").textContent = "Deleted the voiceprint of " + name + ".";
  loadVoices();
}

// --- the jobs --------------------------------------------------------------------------
function seconds(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const two = (n) => String(n).padStart(2, "0");
  return (h ? h + ":" + two(m) : String(m)) + ":" + two(r);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

async function refresh() {
  if (state.key === null) return;  // signed out while a poll was on its way
  let data;
  try {
    data = await (await api("GET", "/v1/jobs")).json();
  } catch (e) {
    showError(e.message);
    return;
  }
  const rows = $("job-rows");
  rows.textContent = "";
  state.jobs.clear();
  for (const job of data.data) {
    state.jobs.set(job.id, job);
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    tr.append(cell(job.file, "file"));
    const status = job.error ? job.status + ": " + job.error.message : job.status;
    tr.append(cell(status, "status"));
    const pc = document.createElement("td");
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = job.status === "succeeded" ? 1 : job.progress;
    bar.setAttribute("aria-label", "Progress of " + job.file);
    pc.append(bar);
    tr.append(pc);
    tr.append(cell(seconds(job.audio_seconds), "duration"));
    const rtf = job.timings && job.timings.rtf;
    tr.append(cell(rtf === null || rtf === undefined ? "" : rtf.toFixed(2), "rtf"));
    const actions = document.createElement("td");
    actions.className = "actions";
    if (job.status === "succeeded") {
      actions.append(button("Open", "Open " + job.file, () => openTranscript(job.id)), " ");
    }
    actions.append(button("Delete", "Delete " + job.file, () => removeJob(job.id)));
    tr.append(actions);
    rows.append(tr);
  }
  $("no-jobs").hidden = data.data.length > 0;
  if (state.open && !state.jobs.has(state.open)) closeTranscript();
}

async function removeJob(id) {
  try {
    await api("DELETE", "/v1/jobs/" + encodeURIComponent(id));
  } catch (e) {
    showError(e.message);
    return;
  }
  if (state.open === id) closeTranscript();
  refresh();
}

// --- a transcript ----------------------------------------------------------------------
function closeTranscript() {
  state.open = null;
  state.segments = [];
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
  state.audioUrl = null;
  $("transcript").hidden = true;
}

async function openTranscript(id, keepAudio) {
  let job, doc;
  try {
    job = await (await api("GET", "/v1/jobs/" + encodeURIComponent(id))).json();
    doc = await (await api("GET", "/v1/jobs/" + encodeURIComponent(id) +
                           "/result?format=json")).json();
  } catch (e) {
    showError(e.message);
    return;
  }
  showError("");
  const same = state.open === id;
  state.open = id;
  $("transcript").hidden = false;
  $("transcript-h").textContent = "Transcript of " + job.file;
  renderTranscript(job, doc);
  if (!(same && keepAudio)) {
    // An <audio src> cannot send the key: fetch the recording with it, play it from memory.
    try {
      const blob = await (await api("GET", "/v1/jobs/" + encodeURIComponent(id) +
                                    "/audio")).blob();
      if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
      state.audioUrl = URL.createObjectURL(blob);
      $("player").src = state.audioUrl;
    } catch (e) {
      showError("The recording cannot be played: " + e.message);
    }
  }
  $("transcript").scrollIntoView({ block: "nearest" });
}

function renderTranscript(job, doc) {
  // The result names renamed speakers already; job.speakers maps label -> name.
  const labelOf = {};
  for (const [label, name] of Object.entries(job.speakers || {})) labelOf[name] = label;
  const segments = (doc.segments || []).filter((s) => typeof s.start === "number");
  const shown = [];
  for (const s of doc.speakers || []) if (!shown.includes(s)) shown.push(s);
  for (const s of segments) if (s.speaker && !shown.includes(s.speaker)) shown.push(s.speaker);
  const colour = (name) => "spk-" + (Math.max(0, shown.indexOf(name)) % 8);

  const speakers = $("speakers");
  speakers.textContent = "";
  shown.forEach((name, i) => {
    const label = labelOf[name] || name;
    const form = document.createElement("form");
    form.className = colour(name);
    const id = "rename-" + i;
    const lab = document.createElement("label");
    lab.htmlFor = id;
    lab.textContent = "Name for " + label;
    const input = document.createElement("input");
    input.id = id;
    input.value = name;
    input.maxLength = 64;
    input.dataset.label = label;
    const go = document.createElement("button");
    go.type = "submit";
    go.textContent = "Rename";
    go.setAttribute("aria-label", "Rename " + label);
    form.append(lab, input, go);
    form.addEventListener("submit", (e) => { e.preventDefault(); rename(label, input.value); });
    speakers.append(form);
  });

  const downloads = $("downloads");
  downloads.textContent = "";
  const base = (job.file || "transcript").replace(/\.[^.]*$/, "") || "transcript";
  for (const [label, [fmt, ext]] of Object.entries(FORMATS)) {
    if (job.kind === "diarization" && !DIARIZATION_FORMATS.includes(label)) continue;
    downloads.append(button("Download " + label, null,
                            () => download(job.id, fmt, base + "." + ext)));
  }

  const lines = $("lines");
  lines.textContent = "";
  state.segments = segments;
  segments.forEach((s, i) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "line " + colour(s.speaker);
    b.dataset.index = String(i);
    b.dataset.start = String(s.start);
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = seconds(s.start);
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = (s.speaker || "") + ":";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = (s.text || "").trim();
    b.append(when, who, text);
    b.setAttribute("aria-label", "Play from " + seconds(s.start) + ", " + (s.speaker || "") +
                   ": " + text.textContent);
    b.addEventListener("click", () => seek(s.start));
    li.append(b);
    lines.append(li);
  });
  highlight();  // a re-rendered transcript (a rename) keeps the line being played lit
}

function seek(start) {
  const player = $("player");
  player.currentTime = start;
  const played = player.play();
  if (played && played.catch) played.catch(() => {});  // paused is fine: it is positioned
  highlight();
}

function highlight() {
  const t = $("player").currentTime;
  let current = -1;
  state.segments.forEach((s, i) => { if (s.start <= t + 0.01) current = i; });
  if (current >= 0 && t > state.segments[current].end + 0.5) current = -1;
  for (const b of document.querySelectorAll("#lines .line")) {
    const on = Number(b.dataset.index) === current;
    b.classList.toggle("playing", on);
    if (on) b.setAttribute("aria-current", "true"); else b.removeAttribute("aria-current");
  }
}

async function rename(label, name) {
  const body = {};
  body[label] = name.trim();
  try {
    await api("PATCH", "/v1/jobs/" + encodeURIComponent(state.open) + "/speakers", body);
  } catch (e) {
    showError(e.message);
    return;
  }
  showError("");
  openTranscript(state.open, true);
}

async function download(id, fmt, filename) {
  let blob;
  try {
    blob = await (await api("GET", "/v1/jobs/" + encodeURIComponent(id) + "/result?format=" +
                            fmt)).blob();
  } catch (e) {
    showError(e.message);
    return;
  }
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  $("download-status").textContent = "Downloaded " + filename + " (" + blob.size + " bytes).";
}

// --- wiring ----------------------------------------------------------------------------
function init() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("key").value.trim());
  });
  $("signout").addEventListener("click", signOut);
  $("voice-form").addEventListener("submit", (e) => {
    e.preventDefault();
    enrollVoice();
  });
  $("upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    uploadAll($("files").files);
    $("files").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    uploadAll(e.dataTransfer.files);
  });
  const player = $("player");
  player.addEventListener("timeupdate", highlight);
  player.addEventListener("seeked", highlight);
  const saved = sessionStorage.getItem(KEY);
  if (saved !== null) signIn(saved);
}

document.addEventListener("DOMContentLoaded", init);

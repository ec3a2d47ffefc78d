// midistral studio: the page's behaviour. Plain JavaScript, no library, nothing from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const NEEDS_PROMPT = ["continue", "add", "replace"];
const BUTTON = { generate: "Generate", continue: "Continue", add: "Add the track", replace: "Replace the track" };
const state = { info: null, mode: "generate", programs: [], prompt: null, promptInfo: null, trackPicked: null };

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: reported below by its status */ }
  if (!response.ok) throw new Error(body && body.error ? body.error : `the studio answered ${response.status}`);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

const percent = (x) => `${Math.round(100 * x)}%`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const instrumentName = (program) => state.info.instruments.find((i) => i.program === program).name;

// ---------------------------------------------------------------------------------------------------
// Controls

function setupSlider(id, bound, value, name) {
  const input = $(id), out = $(`${id}-out`);
  input.min = bound.min; input.max = bound.max; input.value = value;
  if (name) input.name = name;
  const show = () => { out.textContent = input.value; };
  input.addEventListener("input", show);
  show();
}

function setupNumber(id, bound, value) {
  const input = $(id);
  input.min = bound.min; input.max = bound.max;
  if (value !== null && value !== undefined) input.value = value;
}

function fillInstrumentSelect(select, instruments) {
  select.replaceChildren();
  let group = null;
  for (const inst of instruments) {
    if (!group || group.label !== inst.family) {
      group = document.createElement("optgroup");
      group.label = inst.family;
      select.append(group);
    }
    const option = new Option(inst.program < 0 ? inst.name : `${inst.name} (${inst.program})`, inst.program);
    group.append(option);
  }
}

function renderChips() {
  const chips = $("chips");
  chips.replaceChildren();
  for (const program of state.programs) {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = instrumentName(program);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `remove ${instrumentName(program)}`);
    remove.addEventListener("click", () => {
      state.programs = state.programs.filter((p) => p !== program);
      renderChips();
    });
    chip.append(remove);
    chips.append(chip);
  }
}

function setMode(mode) {
  state.mode = mode;
  for (const b of $("mode-buttons").children) b.setAttribute("aria-checked", String(b.dataset.mode === mode));
  const track = mode === "add" || mode === "replace";
  $("prompt-box").hidden = !NEEDS_PROMPT.includes(mode);
  $("track-box").hidden = !track;
  $("instruments-box").hidden = track || !state.info.instruments_steer;
  $("length-row").hidden = track;
  $("style-box").hidden = track || !state.info.styles.length;
  $("generate").textContent = BUTTON[mode];
  $("track-legend").textContent = mode === "replace" ? "Track to replace" : "Instrument of the new track";
  // a track to replace is one the piece has
  const own = state.promptInfo ? state.promptInfo.tracks.map((t) => t.program) : [];
  const choices = mode === "replace" && own.length
    ? state.info.instruments.filter((i) => own.includes(i.program)) : state.info.instruments;
  // keep the instrument the user picked; else a new track is a bass line (the usual first wish), and a
  // replaced one the piece's first track (a freshly filled list would otherwise select its first entry, drums)
  const picked = state.trackPicked;
  fillInstrumentSelect($("track-program"), choices);
  if (picked !== null && choices.some((i) => String(i.program) === picked)) $("track-program").value = picked;
  else if (mode === "add") $("track-program").value = "33";
}

async function choosePrompt(file) {
  state.prompt = null;
  state.promptInfo = null;
  showError("");
  $("prompt-info").textContent = file ? `reading ${file.name}…` : "";
  if (!file) return;
  if (file.size > state.info.max_upload_mb * 2 ** 20) {
    $("prompt-info").textContent = "";
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; a prompt may have at most ${state.info.max_upload_mb} MB`);
    return;
  }
  const form = new FormData();
  form.append("prompt", file);
  try {
    const info = await api("/api/inspect", { method: "POST", body: form });
    state.prompt = file;
    state.promptInfo = info;
    const tracks = info.tracks.map((t) => t.name).join(", ") || "no notes";
    $("prompt-info").textContent = `${info.name}: ${info.bars} bars, ${info.notes} notes, ${info.seconds} s · ${tracks}`;
    setMode(state.mode);
  } catch (e) {
    $("prompt-info").textContent = "";
    showError(e.message);
  }
}

function setupDrop() {
  const drop = $("drop"), input = $("prompt-file");
  input.addEventListener("change", () => choosePrompt(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    input.files = e.dataTransfer.files;
    choosePrompt(input.files[0]);
  });
}

// ---------------------------------------------------------------------------------------------------
// Generate, wait, show

function formData() {
  const form = new FormData();
  form.append("mode", state.mode);
  if (NEEDS_PROMPT.includes(state.mode) && state.prompt) form.append("prompt", state.prompt);
  if (state.mode === "add" || state.mode === "replace") form.append("track_program", $("track-program").value);
  else form.append("programs", state.programs.join(","));
  if (!(state.mode === "add" || state.mode === "replace")) form.append("style", $("style").value);
  for (const id of ["length", "temperature", "variations", "top_k", "no_repeat_ngram", "seed", "key", "density",
                    "polyphony"]) {
    form.append($(id).name, $(id).value);
  }
  return form;
}

function showProgress(job, started) {
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  if (job.state === "queued") {
    $("status").textContent = job.queue > 0
      ? `Waiting: ${job.queue} generation(s) before yours · ${seconds} s` : `Starting · ${seconds} s`;
    $("progress").removeAttribute("value");
  } else if (job.mode === "add" || job.mode === "replace") {
    $("progress").value = job.total ? job.step / job.total : 0;
    $("status").textContent = `Writing the track: ${job.step} of ${job.total || "?"} variations done · ${seconds} s`;
  } else if (state.info.length_unit === "bars") {
    $("progress").removeAttribute("value");  // the tokens a bar takes are not known in advance
    $("status").textContent = `Writing music: ${job.step} tokens · ${seconds} s`;
  } else {
    $("progress").value = job.total ? job.step / job.total : 0;
    $("status").textContent = `Writing music: ${job.step} of up to ${job.total} tokens · ${seconds} s`;
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (NEEDS_PROMPT.includes(state.mode) && !state.prompt) {
    showError("Choose a MIDI file first (or pick Generate to start from nothing).");
    return;
  }
  const started = performance.now();
  $("generate").disabled = true;
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("status").textContent = "Sending…";
  try {
    let job = await api("/api/generate", { method: "POST", body: formData() });
    while (job.state === "queued" || job.state === "running") {
      showProgress(job, started);
      await sleep(150);
      job = await api(`/api/jobs/${job.id}`);
    }
    if (job.state === "failed") throw new Error(job.error);
    showResults(job);
    const ms = performance.now() - started;
    document.body.dataset.lastGenerateMs = String(Math.round(ms));
    $("progress").value = 1;
    $("status").textContent = `Done in ${(ms / 1000).toFixed(1)} s · seed ${job.seed} ` +
      "(the same seed and settings give the same music)";
  } catch (e) {
    $("progress-box").hidden = true;
    showError(e.message);
  } finally {
    $("generate").disabled = false;
  }
}

function tag(text, warn) {
  const span = document.createElement("span");
  span.className = warn ? "tag warn" : "tag";
  span.textContent = text;
  return span;
}

function qualityTags(v) {
  const warned = (word) => v.warnings.some((w) => w.startsWith(word));
  const tags = [
    tag(v.instruments.join(", ") || "no instruments", v.instruments.length === 0),
    tag(`${v.bars} bars · ${v.seconds} s · ${v.notes} notes`),
    tag(`loops ${percent(v.loops)}`, warned("loops")),
    tag(`out-of-key ${percent(v.out_of_key)}`, warned("out-of-key")),
  ];
  if (v.silent > 0) tags.push(tag(`silent instrument in ${percent(v.silent)} of bars`, warned("silent")));
  return tags;
}

function showResults(job) {
  const results = $("results");
  results.replaceChildren();
  results.dataset.job = job.id;
  job.variations.forEach((v, k) => {
    const card = $("variation-template").content.firstElementChild.cloneNode(true);
    card.querySelector("h2").textContent = `Variation ${k + 1}`;
    card.querySelector(".roll").src = v.roll;
    card.querySelector(".roll").alt = `piano roll of variation ${k + 1}`;
    card.querySelector(".download").href = v.midi;
    const audio = card.querySelector("audio"), note = card.querySelector(".audio-note");
    if (state.info.audio) {
      audio.src = v.audio;
      audio.addEventListener("error", async () => {
        let message = "the audio could not be rendered";
        try { await api(v.audio); } catch (e) { message = e.message; }
        note.textContent = `No audio: ${message}`;
        note.hidden = false;
      });
    } else {
      audio.hidden = true;
      note.textContent = `No audio on this machine: ${state.info.audio_problem}`;
      note.hidden = false;
    }
    const quality = card.querySelector(".quality");
    quality.title = v.line;
    quality.append(...qualityTags(v));
    // the sampler's own line: new notes per instrument and its warnings (e.g. a track it left silent)
    const report = card.querySelector(".report");
    report.textContent = v.report || "";
    report.hidden = !v.report;
    if (v.report && v.report.includes("[")) report.classList.add("warn");
    results.append(card);
  });
}

// ---------------------------------------------------------------------------------------------------

async function init() {
  let info;
  try {
    info = await api("/api/info");
  } catch (e) {
    $("model").textContent = "";
    showError(`The studio is not answering (${e.message}). Is it still running?`);
    return;
  }
  state.info = info;
  $("model").textContent = `model: ${info.model}` + (info.audio ? ` · sound: ${info.audio}` : " · no audio");
  for (const [mode, label] of Object.entries(info.modes)) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.mode = mode;
    b.setAttribute("role", "radio");
    b.textContent = label;
    b.addEventListener("click", () => setMode(mode));
    $("mode-buttons").append(b);
  }
  const b = info.bounds, unit = info.length_unit;
  $("length-label").textContent = b[unit].label;
  setupSlider("length", b[unit], b[unit].default, unit);
  setupSlider("temperature", b.temperature, info.defaults.temperature);
  setupSlider("variations", b.variations, b.variations.default);
  setupNumber("top_k", b.top_k, info.defaults.top_k);
  setupNumber("no_repeat_ngram", b.no_repeat_ngram, info.defaults.no_repeat_ngram);
  setupNumber("seed", b.seed, null);
  fillInstrumentSelect($("instrument-select"), info.instruments);
  $("instrument-select").value = "0";
  for (const style of info.styles) $("style").append(new Option(style, style));
  $("add-instrument").addEventListener("click", () => {
    const program = Number($("instrument-select").value);
    if (!state.programs.includes(program)) state.programs.push(program);
    renderChips();
  });
  setupDrop();
  $("controls").addEventListener("submit", generate);
  $("track-program").addEventListener("change", () => { state.trackPicked = $("track-program").value; });
  setMode("generate");
}

init();

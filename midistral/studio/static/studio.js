// midistral studio: the page's behaviour. Plain JavaScript, no library, nothing from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const NEEDS_PROMPT = ["continue", "add", "replace"];
const BUTTON = { generate: "Generate", continue: "Continue", add: "Add the track", replace: "Replace the track" };
const state = { info: null, mode: "generate", programs: [], prompt: null, promptInfo: null, trackPicked: null,
                busy: false, rolls: [] };

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
  } else if (job.mode === "infill") {
    $("progress").value = job.total ? job.step / job.total : 0;
    $("status").textContent = `Regenerating bars ${job.span[0]}-${job.span[1]}: ${job.step} of up to ` +
      `${job.total || "?"} tokens · ${seconds} s`;
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

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  for (const roll of state.rolls) roll.update();
}

// POST `body` to `url`, follow the job it queues and hand it, done, to `show`; `status`: a second place
// (a variation's card) that repeats the progress line
async function runJob(url, body, show, status) {
  showError("");
  const started = performance.now();
  setBusy(true);
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("status").textContent = "Sending…";
  const mirror = () => { if (status) status.textContent = $("status").textContent; };
  mirror();
  try {
    let job = await api(url, { method: "POST", body });
    while (job.state === "queued" || job.state === "running") {
      showProgress(job, started);
      mirror();
      await sleep(150);
      job = await api(`/api/jobs/${job.id}`);
    }
    if (job.state === "failed") throw new Error(job.error);
    show(job);
    const ms = performance.now() - started;
    document.body.dataset.lastGenerateMs = String(Math.round(ms));
    $("progress").value = 1;
    $("status").textContent = `Done in ${(ms / 1000).toFixed(1)} s · seed ${job.seed} ` +
      "(the same seed and settings give the same music)";
    if (status) status.textContent = "";
  } catch (e) {
    $("progress-box").hidden = true;
    if (status) status.textContent = "";
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (NEEDS_PROMPT.includes(state.mode) && !state.prompt) {
    showError("Choose a MIDI file first (or pick Generate to start from nothing).");
    return;
  }
  await runJob("/api/generate", formData(), (job) => showResults(job, null));
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

// `source`: the card whose bars were regenerated (null: a new Generate, which replaces every card)
function showResults(job, source) {
  const results = $("results");
  if (!source) {
    results.replaceChildren();
    state.rolls = [];
  }
  results.dataset.job = job.id;
  const group = document.createElement("section");
  group.className = "group";
  if (source) {
    const h = document.createElement("h3");
    h.textContent = `${source.title}, bars ${job.span[0]}-${job.span[1]} regenerated` +
      (job.tracks ? ` (${job.tracks.map(instrumentName).join(", ")})` : "");
    group.append(h);
  }
  job.variations.forEach((v, k) => {
    const card = $("variation-template").content.firstElementChild.cloneNode(true);
    const title = source ? `${source.title} · bars ${job.span[0]}-${job.span[1]} · ${k + 1}` : `Variation ${k + 1}`;
    card.querySelector("h2").textContent = title;
    card.querySelector(".download").href = v.midi;
    card.querySelector(".png").href = v.png;
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
    group.append(card);
    const roll = new Roll(card, v, title);
    state.rolls.push(roll);
    roll.load();
  });
  results.append(group);
  if (source) group.scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---------------------------------------------------------------------------------------------------
// The piano roll: drawn from the variation's notes (GET .../roll); bars are selected on it and regenerated

const RULER = 18;  // px: the strip of bar numbers above the notes
const COLOURS = ["#2f6f5e", "#c2410c", "#1d4ed8", "#a21caf", "#b45309", "#0f766e", "#be123c", "#4d7c0f"];

class Roll {
  constructor(card, variation, title) {
    this.card = card;
    this.v = variation;
    this.title = title;
    this.canvas = card.querySelector("canvas.roll");
    this.canvas.setAttribute("aria-label", `piano roll of ${title.toLowerCase()}`);
    this.data = null;
    this.selection = null;  // [first, last]: bars, 1-based
    this.anchor = null;     // the bar a drag started on
  }

  async load() {
    try {
      this.data = await api(this.v.roll);
    } catch (e) {
      this.canvas.hidden = true;
      return;
    }
    const regen = this.card.querySelector(".regen");
    regen.hidden = !state.info.infill;
    this.first = this.card.querySelector(".first");
    this.last = this.card.querySelector(".last");
    this.button = this.card.querySelector(".regenerate");
    for (const input of [this.first, this.last]) {
      input.max = this.bars();
      input.addEventListener("change", () => this.typed());
    }
    this.fillTracks();
    this.canvas.addEventListener("pointerdown", (e) => this.press(e));
    this.canvas.addEventListener("pointermove", (e) => this.drag(e));
    this.canvas.addEventListener("pointerup", () => { this.anchor = null; });
    this.button.addEventListener("click", () => this.regenerate());
    this.update();
    this.draw();
    this.canvas.dataset.drawn = "1";
  }

  bars() { return this.data.bars.length - 1; }

  fillTracks() {
    const box = this.card.querySelector(".tracks");
    const seen = new Map();
    for (const t of this.data.tracks) if (!seen.has(t.program)) seen.set(t.program, t.name);
    if (seen.size < 2) return;  // one instrument: nothing to choose
    for (const [program, name] of seen) {
      const label = document.createElement("label");
      label.className = "track";
      const box_ = document.createElement("input");
      box_.type = "checkbox";
      box_.checked = true;
      box_.value = program;
      box_.addEventListener("change", () => this.update());
      label.append(box_, ` ${name}`);
      box.append(label);
    }
  }

  chosenTracks() {
    const boxes = [...this.card.querySelectorAll(".tracks input")];
    const on = boxes.filter((b) => b.checked).map((b) => b.value);
    return { all: on.length === boxes.length, none: boxes.length > 0 && on.length === 0, programs: on };
  }

  // the bar (1-based) under a point of the canvas, within the piece
  barAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const bars = this.data.bars, end = bars[bars.length - 1];
    const beat = Math.max(0, Math.min(1, (event.clientX - rect.left) / rect.width)) * end;
    let i = 0;
    while (i < bars.length - 2 && bars[i + 1] <= beat) i++;
    return i + 1;
  }

  press(event) {
    if (!state.info.infill || event.button !== 0) return;
    const bar = this.barAt(event);
    this.anchor = event.shiftKey && this.selection ? this.selection[0] : bar;
    this.select(this.anchor, bar);
    this.canvas.setPointerCapture(event.pointerId);
  }

  drag(event) {
    if (this.anchor !== null) this.select(this.anchor, this.barAt(event));
  }

  select(a, b) {
    this.selection = [Math.min(a, b), Math.max(a, b)];
    this.first.value = this.selection[0];
    this.last.value = this.selection[1];
    this.update();
    this.draw();
  }

  typed() {
    const a = Number(this.first.value), b = Number(this.last.value || this.first.value);
    const n = this.bars();
    if (Number.isInteger(a) && Number.isInteger(b) && a >= 1 && b >= 1 && a <= n && b <= n) this.select(a, b);
  }

  update() {
    if (!this.button) return;
    const t = this.chosenTracks();
    this.button.disabled = state.busy || !this.selection || t.none;
    this.button.textContent = this.selection
      ? `Regenerate bars ${this.selection[0]}-${this.selection[1]}` : "Regenerate bars";
  }

  async regenerate() {
    const t = this.chosenTracks();
    const form = new FormData();
    form.append("first", this.selection[0]);
    form.append("last", this.selection[1]);
    form.append("tracks", t.all ? "" : t.programs.join(","));
    if (state.info.styles.length) form.append("style", $("style").value);
    for (const id of ["temperature", "variations", "top_k", "no_repeat_ngram", "seed", "key"]) {
      form.append($(id).name, $(id).value);
    }
    await runJob(this.v.infill, form, (job) => showResults(job, this), this.card.querySelector(".hint"));
    this.card.querySelector(".hint").textContent =
      "Drag across the roll, or click a bar number (Shift-click to extend), to select bars.";
  }

  draw() {
    const canvas = this.canvas, data = this.data;
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const bars = data.bars, end = bars[bars.length - 1];
    const x = (beat) => beat / end * w;
    const pitches = data.tracks.flatMap((t) => t.notes.map((n) => n[2]));
    let lo = pitches.length ? Math.min(...pitches) - 1 : 59, hi = pitches.length ? Math.max(...pitches) + 1 : 72;
    if (hi - lo < 12) { const mid = (lo + hi) / 2; lo = mid - 6; hi = mid + 6; }
    const rowH = (h - RULER) / (hi - lo + 1);
    const y = (pitch) => RULER + (hi - pitch) * rowH;
    const band = (first, last, fill) => {
      g.fillStyle = fill;
      g.fillRect(x(bars[first - 1]), 0, x(bars[last]) - x(bars[first - 1]), h);
    };
    if (data.span) band(data.span[0], data.span[1], "rgba(245, 158, 11, 0.16)");  // the bars regenerated
    if (this.selection) band(this.selection[0], this.selection[1], "rgba(29, 78, 216, 0.14)");
    // bar lines and numbers
    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "middle";
    let free = -Infinity;  // where the last number ends: a number that would overlap it is left out
    for (let i = 0; i < bars.length; i++) {
      const bx = Math.round(x(bars[i])) + 0.5;
      g.strokeStyle = "#dcd9d2";
      g.beginPath(); g.moveTo(bx, RULER); g.lineTo(bx, h); g.stroke();
      if (i < bars.length - 1 && bx + 3 >= free) {
        free = bx + 3 + g.measureText(String(i + 1)).width + 4;
        g.fillStyle = this.selection && i + 1 >= this.selection[0] && i + 1 <= this.selection[1] ? "#1d4ed8" : "#667085";
        g.fillText(String(i + 1), bx + 3, RULER / 2);
      }
    }
    data.tracks.forEach((t, k) => {
      const colour = COLOURS[k % COLOURS.length];
      for (const [start, duration, pitch, fresh] of t.notes) {
        g.globalAlpha = fresh ? 1 : 0.35;
        g.fillStyle = colour;
        g.fillRect(x(start), y(pitch), Math.max(1.5, x(start + duration) - x(start) - 0.5), Math.max(1.5, rowH - 0.5));
      }
    });
    g.globalAlpha = 1;
    const outline = (first, last, colour) => {
      g.strokeStyle = colour;
      g.lineWidth = 2;
      g.strokeRect(x(bars[first - 1]) + 1, 1, x(bars[last]) - x(bars[first - 1]) - 2, h - 2);
      g.lineWidth = 1;
    };
    if (data.span) outline(data.span[0], data.span[1], "#d97706");
    if (this.selection) outline(this.selection[0], this.selection[1], "#1d4ed8");
  }
}

window.addEventListener("resize", () => { for (const roll of state.rolls) if (roll.data) roll.draw(); });

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

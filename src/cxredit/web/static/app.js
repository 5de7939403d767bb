// cxredit editing page: talks to the JSON API of the same server (see /docs).
"use strict";

const $ = (sel) => document.querySelector(sel);
// gen counts the images loaded (encode results): a refinement started from an earlier image
// compares it to its own and drops its result, so the page never mixes two images.
const state = { id: null, gen: 0, health: null, busy: false, editing: false, again: false };

function setStatus(text, error = false) {
  const el = $("#status");
  el.textContent = text || "";
  el.classList.toggle("error", !!error);
}

async function api(path, options = {}) {
  const res = await fetch(path, options);
  let body = {};
  try { body = await res.json(); } catch (e) { /* non-JSON error page */ }
  if (!res.ok) {
    const d = body.detail;
    const msg = Array.isArray(d) ? d.map((x) => x.msg).join("; ") : (d || res.statusText);
    throw new Error(`${msg} (HTTP ${res.status})`);
  }
  return body;
}

const fmt = (c) => (c === null || c === undefined ? "n/a" : c.toFixed(3));
// A raw alpha for captions: at most 4 decimals, no trailing zeros (29.714858... -> 29.7149).
const fmtAlpha = (a) => String(Number(a.toFixed(4)));

function setDelta(before, after) {
  const el = $("#ctr-delta");
  el.classList.remove("up", "down");
  if (before === null || after === null || before === undefined || after === undefined) {
    el.textContent = "n/a";
    return;
  }
  const d = after - before;
  el.textContent = (d >= 0 ? "+" : "−") + Math.abs(d).toFixed(3);
  if (Math.abs(d) >= 0.0005) el.classList.add(d > 0 ? "up" : "down");
}

function enable(on) {
  for (const id of ["#refine", "#reset", "#alpha"]) $(id).disabled = !on;
}

async function init() {
  try {
    const h = (state.health = await api("/api/health"));
    $("#model-info").textContent =
      `cxredit ${h.version} · ${h.resolution} px · G ${h.generator_sha256.slice(0, 10)}` +
      (h.segmenter ? "" : " · no segmenter");
    for (const d of h.directions) $("#direction").add(new Option(`${d.name} (${d.method})`, d.name));
    for (const s of h.samples) $("#sample").add(new Option(`Phantom: ${s.name}`, s.name));
    setScale();
    $("#steps").max = h.max_project_steps;
    $("#res-note").textContent = `resized to ${h.resolution}×${h.resolution}`;
    if (!h.directions.length) setStatus("This bundle ships no directions: editing is off.", true);
  } catch (e) {
    setStatus(`Cannot reach the server: ${e.message}`, true);
  }
}

// Show a latent (an encode's or a refinement's result). fresh: a new image, which ends any
// refinement of the previous one (its poll loop sees the new generation and stops).
function showLatent(r, fresh = false) {
  if (fresh) {
    state.gen += 1;
    $("#progress").hidden = true;
    setNote("");
  }
  state.id = r.id;
  if (r.input) $("#img-input").src = r.input;
  $("#img-recon").src = r.reconstruction;
  $("#recon-note").textContent = r.steps
    ? `encoder + ${r.steps} projection ${r.steps === 1 ? "step" : "steps"}` : "encoder";
  $("#ctr-input").textContent = fmt(r.ctr_input);
  $("#ctr-recon").textContent = fmt(r.ctr_reconstruction);
  $("#source").textContent = `Source: ${r.source} · MSE ${r.mse.toFixed(4)}`;
  enable(true);
  requestEdit();
}

// While an image encodes, the ways to load another are off (a second load would race it).
function setBusy(on) {
  state.busy = on;
  $("#load-sample").disabled = on;
  $("#file").disabled = on;
  $("#drop").classList.toggle("busy", on);
  $("#drop").setAttribute("aria-disabled", String(on));
}

async function encode(form, label) {
  if (state.busy) return;
  setBusy(true);
  setStatus(`Encoding ${label}…`);
  try {
    showLatent(await api("/api/encode", { method: "POST", body: form }), true);
    setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    setBusy(false);
  }
}

function uploadFile(file) {
  if (!file) return;
  if (state.busy) {  // a drop while encoding (the input and button are disabled meanwhile)
    setStatus("Still encoding the previous image: drop this one again when it is done.", true);
    return;
  }
  const form = new FormData();
  form.append("file", file);
  encode(form, file.name);
}

// The slider counts in sigma of the direction (the std of training latents along it) when the
// bundle records it, so that one step means the same on every direction; else in raw alpha.
const SIGMA_SPAN = 6;

function unit() {
  const h = state.health;
  const d = h && h.directions.find((x) => x.name === $("#direction").value);
  return d && d.sigma ? d.sigma : null;
}

function setScale() {
  const h = state.health, sigma = unit(), slider = $("#alpha");
  const span = sigma ? Math.floor(10 * Math.min(SIGMA_SPAN, h.max_alpha / sigma)) / 10
                     : h.max_alpha;
  slider.min = -span; slider.max = span;
  slider.value = Math.max(-span, Math.min(span, parseFloat(slider.value) || 0));
  const u = sigma ? " σ" : "";
  $("#alpha-min").textContent = `−${span}${u}`; $("#alpha-max").textContent = `${span}${u}`;
  $("#alpha-unit").textContent = sigma ? `(σ = ${sigma.toPrecision(3)} along this direction)`
                                       : "(raw units: this direction records no σ)";
  showValue();
}

function showValue() {
  const s = parseFloat($("#alpha").value), sigma = unit();
  $("#alpha-value").textContent = sigma ? `${s} σ` : `${s}`;
}

// Raw alpha for slider value s (clamped to the server's limit against rounding).
function rawAlpha(s) {
  const sigma = unit(), m = state.health.max_alpha;
  const a = sigma ? Math.round(s * sigma * 1e4) / 1e4 : s;
  return Math.max(-m, Math.min(m, a));
}

// One edit request in flight at a time; moves of the slider meanwhile coalesce into one more.
async function requestEdit() {
  if (!state.id || !state.health || !state.health.directions.length) return;
  if (state.editing) { state.again = true; return; }
  state.editing = true;
  const s = parseFloat($("#alpha").value);
  const alpha = rawAlpha(s), sigma = unit();
  const direction = $("#direction").value, id = state.id;
  try {
    const r = await api("/api/edit", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id, direction, alpha }),
    });
    if (id !== state.id) return;  // another image came meanwhile; it asked for its own edit
    const img = $("#img-edit");
    img.src = r.image;
    img.dataset.alpha = String(s);  // slider units
    img.dataset.alphaRaw = String(r.alpha);
    $("#img-diff").src = r.diff;
    $("#edit-note").textContent = sigma ? `${direction}, ${s} σ (α = ${fmtAlpha(r.alpha)})`
                                        : `${direction}, α = ${fmtAlpha(r.alpha)}`;
    $("#ctr-edit").textContent = fmt(r.ctr);
    setDelta(r.ctr_reconstruction, r.ctr);
    const q = new URLSearchParams({ id, direction, alpha: String(r.alpha) });
    const dl = $("#download");
    dl.href = `/api/edit.png?${q}`;
    dl.classList.remove("disabled");
    dl.removeAttribute("aria-disabled");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.editing = false;
    if (state.again) { state.again = false; requestEdit(); }
  }
}

function setNote(text, error = false) {
  const el = $("#refine-status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

// The Steps box as an integer in [1, max], or null. Number(), not parseInt: "1e2" is 100 steps
// (not 1) and "2.5" is refused (not 2); an empty or unparsable box reads as "".
function readSteps() {
  const raw = $("#steps").value.trim(), n = Number(raw);
  const max = state.health ? state.health.max_project_steps : Infinity;
  return raw !== "" && Number.isInteger(n) && n >= 1 && n <= max ? n : null;
}

async function refine() {
  const steps = readSteps();
  if (steps === null) {
    const max = state.health ? state.health.max_project_steps : "the server's limit";
    setNote(`Enter a whole number of steps from 1 to ${max}.`, true);
    $("#steps").focus();
    return;
  }
  const gen = state.gen, bar = $("#progress");
  const stale = () => gen !== state.gen;  // another image was loaded since the start
  $("#refine").disabled = true;
  bar.hidden = false; bar.value = 0;
  setNote("queued…");
  try {
    const { job } = await api("/api/project", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: state.id, steps }),
    });
    for (;;) {
      await new Promise((ok) => setTimeout(ok, 250));
      if (stale()) return;  // stop polling: the result would belong to the previous image
      const j = await api(`/api/project/${job}`);
      if (stale()) return;
      bar.value = j.steps ? j.step / j.steps : 0;
      const loss = j.loss !== null ? ` · loss ${j.loss.toFixed(4)}` : "";
      if (j.status === "done") {
        showLatent(j.result);
        setNote(`Refined by ${j.steps} ${j.steps === 1 ? "step" : "steps"}${loss}`);
        break;
      }
      if (j.status === "error") throw new Error(j.error);
      setNote(j.status === "queued" ? "queued behind another refinement…"
                                    : `running: step ${j.step} of ${j.steps}${loss}`);
    }
  } catch (e) {
    if (stale()) return;
    bar.hidden = true;
    setNote("");
    setStatus(e.message, true);
  } finally {
    if (!stale()) $("#refine").disabled = !state.id;  // else the new image's own state stands
  }
}

document.addEventListener("DOMContentLoaded", () => {
  init();
  $("#file").addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    ev.target.value = "";  // so that choosing the same file again is a change, and uploads
    uploadFile(file);
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    uploadFile(ev.dataTransfer.files[0]);
  });
  $("#load-sample").addEventListener("click", () => {
    const form = new FormData();
    form.append("sample", $("#sample").value);
    encode(form, $("#sample").value);
  });
  $("#alpha").addEventListener("input", () => {
    showValue();
    requestEdit();
  });
  $("#direction").addEventListener("change", () => {
    setScale();
    requestEdit();
  });
  $("#reset").addEventListener("click", () => {
    $("#alpha").value = 0;
    showValue();
    requestEdit();
  });
  $("#refine").addEventListener("click", refine);
});

// ddim serve: the page. It uses only the HTTP API (docs/serve.md); no asset comes from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const CLIENT = (self.crypto && crypto.randomUUID) ? crypto.randomUUID() : String(Math.random()).slice(2);
const DEBOUNCE_MS = 120;

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// One channel per image on the page: a newer request aborts the older one here, and the server drops
// the older one from its queue (same X-Client header), so the image always shows the newest settings.
class Channel {
  constructor(name, img, status) {
    this.name = name; this.img = img; this.status = status; this.ctrl = null; this.seq = 0;
    img.dataset.loads = "0";
  }
  async load(url, body) {
    if (this.ctrl) this.ctrl.abort();
    const ctrl = this.ctrl = new AbortController();
    const seq = ++this.seq;
    const t0 = performance.now();
    try {
      const r = await fetch(url, {
        method: body ? "POST" : "GET", body, signal: ctrl.signal,
        headers: { "X-Client": `${CLIENT}:${this.name}` },
      });
      if (!r.ok) {
        if (r.status === 409) return;  // superseded by our own newer request
        throw new Error((await r.text()).trim());
      }
      const blob = await r.blob();
      if (seq !== this.seq) return;
      const old = this.img.src;
      this.img.src = URL.createObjectURL(blob);
      await this.img.decode();
      if (old.startsWith("blob:")) URL.revokeObjectURL(old);
      if (seq !== this.seq) return;
      const ms = performance.now() - t0;
      this.img.dataset.url = url;
      this.img.dataset.pageMs = ms.toFixed(1);
      this.img.dataset.loads = String(Number(this.img.dataset.loads) + 1);
      this.img.dataset.mse = r.headers.get("X-Mse") || "";
      if (this.status) {
        const h = (k) => r.headers.get(k);
        this.status.classList.remove("error");
        this.status.textContent =
          `${ms.toFixed(0)} ms at the page · server ${(1000 * h("X-Wall-Time")).toFixed(0)} ms · ` +
          `${h("X-NFE")} NFE · network calls ${h("X-Network-Calls")} · cache ${h("X-Cache")}` +
          (h("X-Mse") ? ` · MSE ${Number(h("X-Mse")).toFixed(5)}` : "");
      }
    } catch (e) {
      if (e.name === "AbortError" || seq !== this.seq) return;
      this.img.dataset.error = String(e.message || e);
      if (this.status) { this.status.classList.add("error"); this.status.textContent = this.img.dataset.error; }
    }
  }
}

const ch = {
  main: new Channel("main", $("main-img"), $("main-status")),
  a: new Channel("cmp-a", $("cmp-a"), null),
  b: new Channel("cmp-b", $("cmp-b"), $("cmp-status")),
  interp: new Channel("interp", $("interp-img"), $("interp-status")),
  recon: new Channel("recon", $("recon-img"), $("edit-status")),
  swap: new Channel("swap", $("swap-img"), null),
  sdedit: new Channel("sdedit", $("sdedit-img"), null),
  inpaint: new Channel("inpaint", $("inpaint-img"), null),
};
let info = null;

function fill(select, values, labels) {
  select.innerHTML = "";
  values.forEach((v, i) => {
    const o = document.createElement("option");
    o.value = v; o.textContent = labels ? labels[i] : v; select.appendChild(o);
  });
}

function settings() {
  const s = {
    seed: $("seed").value || "0", steps: $("steps").value, eta: $("eta").value, sampler: $("sampler").value,
    spacing: $("spacing").value, class: $("class").value, guidance: $("guidance").value,
  };
  if (s.sampler === "ddpm" && !["0", "1"].includes(s.eta)) s.eta = "1";  // ddpm's noise is fixed at η = 1
  return s;
}

const query = (o) => new URLSearchParams(o).toString();

function showOutputs() {
  for (const id of ["steps", "eta", "guidance", "steps-b", "edit-steps", "strength", "scrub"]) {
    $(`${id}-out`).textContent = $(id).value;
  }
}

function draft() {
  showOutputs();
  const s = settings();
  ch.main.load(`/api/sample?${query(s)}`);
  ch.a.load(`/api/sample?${query(s)}`);
  const b = { ...s, steps: $("steps-b").value, sampler: $("sampler-b").value };
  if (b.sampler === "ddpm" && !["0", "1"].includes(b.eta)) b.eta = "1";
  $("cmp-a-cap").textContent = `A: ${s.sampler}, ${s.steps} steps`;
  $("cmp-b-cap").textContent = `B: ${b.sampler}, ${b.steps} steps`;
  ch.b.load(`/api/sample?${query(b)}`);
}
const draftSoon = debounce(draft, DEBOUNCE_MS);

function onSettingChange() {
  if (!$("lock-seed").checked) $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  draftSoon();
  interpSoon();
  editsSoon();
}

function interp() {
  showOutputs();
  const frames = Math.max(2, Math.min(Number($("frames").value) || 9, info ? info.max_frames : 33));
  $("scrub").max = String(frames - 1);
  if (Number($("scrub").value) > frames - 1) $("scrub").value = String(frames - 1);
  $("scrub-out").textContent = $("scrub").value;
  const s = settings();
  let sampler = s.sampler;
  if (info && !info.deterministic_samplers.includes(sampler)) sampler = "ddim";
  const q = {
    seed_a: $("seed-a").value || "0", seed_b: $("seed-b").value || "1", frames, frame: $("scrub").value,
    steps: s.steps, sampler, spacing: s.spacing, class: s.class, guidance: s.guidance,
  };
  ch.interp.load(`/api/interpolate?${query(q)}`);
}
const interpSoon = debounce(interp, DEBOUNCE_MS);

// ------------------------------------------------------------------ upload, mask and edits
let upload = null;        // the uploaded File
let maskPainted = false;
const orig = $("orig"), mask = $("mask");
const mctx = mask.getContext("2d");

async function onUpload() {
  const f = $("upload").files[0];
  if (!f) return;
  upload = f;
  clearMask();
  try {
    const bmp = await createImageBitmap(f);
    const c = orig.getContext("2d");
    c.imageSmoothingEnabled = false;
    c.fillStyle = "#000"; c.fillRect(0, 0, orig.width, orig.height);
    c.drawImage(bmp, 0, 0, orig.width, orig.height);
  } catch (e) { /* the server says what is wrong with it */ }
  edits();
}

function clearMask() { mctx.clearRect(0, 0, mask.width, mask.height); maskPainted = false; }

async function maskBlob() {
  // white where painted, black elsewhere
  const src = mctx.getImageData(0, 0, mask.width, mask.height);
  const c = document.createElement("canvas");
  c.width = mask.width; c.height = mask.height;
  const ctx = c.getContext("2d");
  const out = ctx.createImageData(c.width, c.height);
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] > 0 ? 255 : 0;
    out.data[i] = out.data[i + 1] = out.data[i + 2] = v; out.data[i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
  return await new Promise((res) => c.toBlob(res, "image/png"));
}

function form(extra) {
  const fd = new FormData();
  fd.append("image", upload, upload.name || "upload.png");
  if (extra) for (const [k, v] of Object.entries(extra)) fd.append(k, v, `${k}.png`);
  return fd;
}

async function edits() {
  showOutputs();
  if (!upload) return;
  const s = settings();
  const steps = $("edit-steps").value;
  ch.recon.load(`/api/reconstruct?${query({ steps, spacing: s.spacing, class: $("source").value })}`, form());
  ch.swap.load(`/api/swap?${query({
    steps, spacing: s.spacing, source: $("source").value, target: $("target").value, guidance: s.guidance,
  })}`, form());
  const common = { seed: s.seed, steps, eta: s.eta, spacing: s.spacing, class: s.class, guidance: s.guidance };
  ch.sdedit.load(`/api/sdedit?${query({ ...common, strength: $("strength").value })}`, form());
  if (maskPainted) ch.inpaint.load(`/api/inpaint?${query(common)}`, form({ mask: await maskBlob() }));
}
const editsSoon = debounce(edits, DEBOUNCE_MS);

let painting = false, last = null;
function paintAt(ev) {
  // one opaque stroke on the mask canvas (shown half-transparent by CSS): where it is, regenerate
  const r = mask.getBoundingClientRect();
  const x = (ev.clientX - r.left) * mask.width / r.width, y = (ev.clientY - r.top) * mask.height / r.height;
  mctx.strokeStyle = "rgb(255, 40, 40)"; mctx.lineWidth = 36; mctx.lineCap = "round";
  mctx.beginPath(); mctx.moveTo(...(last || [x, y])); mctx.lineTo(x, y); mctx.stroke();
  last = [x, y];
  maskPainted = true;
}
mask.addEventListener("pointerdown", (e) => { painting = true; last = null; paintAt(e); });
mask.addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
window.addEventListener("pointerup", () => { if (painting) { painting = false; editsSoon(); } });
$("clear-mask").addEventListener("click", () => { clearMask(); });

// ------------------------------------------------------------------ start
async function start() {
  const r = await fetch("/api/info");
  info = await r.json();
  $("model-info").textContent =
    `model: ${info.model} · ${info.channels}×${info.image_size}×${info.image_size} · ` +
    `${info.num_classes ? info.num_classes + " classes" : "unconditional"} · at most ${info.max_steps} steps`;
  fill($("sampler"), info.samplers); $("sampler").value = "ddim";
  fill($("sampler-b"), info.samplers); $("sampler-b").value = "ddim";
  fill($("spacing"), info.spacings); $("spacing").value = info.default_spacing;
  const names = info.class_names || Array.from({ length: info.num_classes }, (_, i) => String(i));
  const ids = Array.from({ length: info.num_classes }, (_, i) => String(i));
  fill($("class"), ["none", ...ids], ["none (unconditional)", ...names]);
  $("class").value = info.num_classes > 3 ? "3" : "none";
  fill($("source"), ["none", ...ids], ["unknown", ...names]); fill($("target"), ids, names);
  $("target").value = info.num_classes > 8 ? "8" : "0";
  for (const id of ["steps", "steps-b", "edit-steps"]) $(id).max = String(Math.min(100, info.max_steps));
  $("guidance").value = String(info.default_guidance);
  $("frames").max = String(info.max_frames);

  for (const id of ["sampler", "steps", "eta", "spacing", "guidance", "class"]) {
    $(id).addEventListener("input", onSettingChange);
  }
  $("seed").addEventListener("input", () => { draftSoon(); editsSoon(); });
  $("new-seed").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2 ** 31)); draftSoon(); editsSoon();
  });
  for (const id of ["steps-b", "sampler-b"]) $(id).addEventListener("input", draftSoon);
  for (const id of ["seed-a", "seed-b", "frames"]) $(id).addEventListener("input", interpSoon);
  $("scrub").addEventListener("input", interp);  // frames are cached: no debounce needed
  for (const id of ["edit-steps", "source", "target", "strength"]) $(id).addEventListener("input", editsSoon);
  $("upload").addEventListener("change", onUpload);
  draft();
  interp();
}
start();

// The calcinosis page: drop images, follow their jobs, show calls, probabilities and
// deposit maps; browse slides in OpenSeadragon and predict regions on demand.
// Plain JavaScript, no build step. Every number shown comes from the server's JSON,
// which is predict's own record of the result (predictions.json).
"use strict";

const state = {
  model: null, // /api/model
  threshold: 0.6,
  colors: {}, // label value -> [r, g, b]
  names: {}, // label value -> display name
  slide: null, // the open slide's info
  viewer: null,
  layers: {}, // job id -> {item, job, labels}
  overlayEl: null,
  drawing: false,
};

const STAIN_NAMES = { he: "H&E", von_kossa: "von Kossa", alizarin_red: "Alizarin red" };
const STATUS_TEXT = {
  ok: "called",
  indeterminate: "indeterminate",
  no_tissue: "no tissue",
  out_of_focus: "out of focus",
  error: "unreadable",
};

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function pretty(name) {
  if (!name) return "";
  if (name === "indeterminate") return "Indeterminate";
  const s = name.replace(/_/g, " ");
  return s.charAt(0).toUpperCase() + s.slice(1);
}

function pct(p, digits = 1) {
  if (p === null || p === undefined || Number.isNaN(p)) return "–";
  return (100 * p).toFixed(digits) + "%";
}

function area(um2) {
  if (um2 === null || um2 === undefined) return "–";
  if (um2 >= 1e6) return (um2 / 1e6).toFixed(2) + " mm²";
  return Math.round(um2).toLocaleString("en") + " µm²";
}

async function fetchJSON(url, opts = {}) {
  const r = await fetch(url, opts);
  let body = null;
  try {
    body = await r.json();
  } catch (e) {
    body = null;
  }
  if (!r.ok) {
    const detail = body && body.detail ? body.detail : `HTTP ${r.status}`;
    const err = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    err.status = r.status;
    throw err;
  }
  return body;
}

// Follow a job by long polling until it finishes; onUpdate gets every snapshot.
async function follow(job, onUpdate) {
  let snap = job;
  onUpdate(snap);
  while (snap.state === "queued" || snap.state === "running") {
    try {
      snap = await fetchJSON(`/api/jobs/${snap.id}?since=${snap.version}&wait=10`);
    } catch (e) {
      await new Promise((res) => setTimeout(res, 1000));
      continue;
    }
    onUpdate(snap);
  }
  refreshBusy();
  return snap;
}

async function refreshBusy() {
  try {
    const jobs = await fetchJSON("/api/jobs");
    const running = jobs.filter((j) => j.state === "running").length;
    const queued = jobs.filter((j) => j.state === "queued").length;
    const busy = document.getElementById("busy");
    busy.textContent = running || queued ? `model: ${running} running, ${queued} waiting` : "model: idle";
  } catch (e) {
    /* the next poll will tell */
  }
}

function progressBlock(snap, onCancel) {
  const wrap = el("div", { class: "progress", "data-state": snap.state });
  let text;
  if (snap.state === "queued") {
    text = snap.position > 1 ? `queued: ${snap.position - 1} ahead of it` : "queued: next in line";
  } else {
    text = `${snap.message} (${pct(snap.progress, 0)})`;
  }
  const bar = el("div", { class: "bar" }, el("div", { class: "fill", style: `width:${(100 * snap.progress).toFixed(1)}%` }));
  wrap.append(el("span", { class: "ptext", text }), bar);
  if (onCancel) wrap.append(el("button", { type: "button", class: "cancel", onclick: onCancel, text: "Cancel" }));
  return wrap;
}

// ------------------------------------------------------------------ the model card

function renderCard(model) {
  const c = model.card;
  const body = document.getElementById("card-body");
  body.replaceChildren();
  const trained = c.trained_on || {};
  body.append(
    el("p", { class: "research", text: c.notice }),
    el("h3", { text: "Trained on" }),
    el("p", { class: trained.synthetic ? "synthetic" : trained.synthetic === false ? "" : "unknown", id: "trained-on", text: trained.text }),
  );
  const dl = el("dl");
  const row = (k, v) => {
    if (v === null || v === undefined || v === "") return;
    dl.append(el("dt", { text: k }), el("dd", {}, v));
  };
  row("Checkpoint", `${c.checkpoint}${c.checkpoint_sha256 ? ` (sha256 ${c.checkpoint_sha256}…)` : ""}`);
  row("Version", `${c.package_version ? "trained with calcinosis " + c.package_version : "training version not recorded"}; this server ${c.server_version}`);
  row("Network", c.backbone ? `${c.backbone}, backend ${c.backend}` : c.backend);
  row("Classes", c.classes.map(pretty).join(", "));
  row("Stains", c.stains.map((s) => STAIN_NAMES[s] || s).join(", "));
  const dep = el("span");
  for (const [k, name] of Object.entries(model.deposit_names)) {
    dep.append(el("span", { class: "swatch", style: `background:rgb(${model.deposit_colors[k].join(",")})` }), ` ${name} `);
  }
  row("Deposit map", dep);
  row("Resolution", `${c.mpp ?? "?"} µm/px, input ${c.input_size} × ${c.input_size} px`);
  // One temperature per test-time augmentation mode run here (patches, tiled regions and slides).
  const temps = c.temperatures || {};
  const tOf = (mode) => Number(temps[mode] ?? c.temperature).toFixed(3);
  const oneMode = c.tta === c.region_tta;
  let cal = oneMode
    ? `temperature ${tOf(c.tta)}`
    : `temperature ${tOf(c.tta)} for patches (TTA ${c.tta}), ${tOf(c.region_tta)} for tiled regions and slides (TTA ${c.region_tta})`;
  if (c.calibration) {
    cal += ` (${oneMode ? "" : "main temperature "}fitted with TTA ${c.calibration.tta}; ECE ${Number(c.calibration.ece_before).toFixed(3)} → ${Number(c.calibration.ece_after).toFixed(3)} on ${c.calibration.samples} validation patches)`;
  }
  row("Calibration", cal);
  const tta = oneMode ? c.tta : `${c.tta} for patches, ${c.region_tta} for tiled regions and slides`;
  row("Test-time augmentation", c.tta_warning ? el("span", { class: "warn-text", text: `${tta}: ${c.tta_warning}` }) : tta);
  row("Indeterminate", `below ${pct(c.indeterminate_threshold, 0)} calibrated top probability`);
  row("Lesions", `counted from ${pct(c.lesion_threshold, 0)} confidence and ${c.min_lesion_area_um2} µm²`);
  if (c.validation && c.validation.val_macro_f1 !== undefined && c.validation.val_macro_f1 !== null) {
    row("Validation", `macro-F1 ${Number(c.validation.val_macro_f1).toFixed(3)}, accuracy ${Number(c.validation.val_acc).toFixed(3)} on ${c.validation.val_samples} patches of its own validation split (epoch ${c.epoch})`);
  }
  row("Limits", `uploads up to ${(model.limits.max_upload_bytes / 1048576).toFixed(0)} MB and ${(model.limits.max_pixels / 1e6).toFixed(0)} megapixels`);
  body.append(dl);
}

// ------------------------------------------------------------------ images

function chosenMpp() {
  return document.getElementById("mpp").value.trim();
}

function uploadFiles(files) {
  for (const f of files) uploadOne(f);
}

async function uploadOne(file) {
  const card = el("article", { class: "result", "data-name": file.name });
  card.append(el("header", {}, el("h3", { text: file.name }), el("span", { class: "badge", text: "uploading" })));
  const results = document.getElementById("results");
  results.prepend(card);
  const form = new FormData();
  form.append("file", file, file.name);
  const mpp = chosenMpp();
  if (mpp) form.append("mpp", mpp);
  let job;
  try {
    job = await fetchJSON("/api/predict", { method: "POST", body: form });
  } catch (e) {
    showRefused(card, file.name, e);
    return;
  }
  refreshBusy();
  const holder = el("div", { class: "progress-holder" });
  card.append(holder);
  const final = await follow(job, (snap) => {
    card.querySelector(".badge").textContent = snap.state;
    holder.replaceChildren(progressBlock(snap, () => fetchJSON(`/api/jobs/${snap.id}/cancel`, { method: "POST" })));
  });
  holder.remove();
  if (final.state === "done") renderImageResult(card, final);
  else if (final.state === "cancelled") {
    card.classList.add("cancelled");
    card.querySelector(".badge").textContent = "cancelled";
    card.append(el("p", { class: "muted", text: final.message }));
  } else {
    showRefused(card, file.name, { message: final.error || final.message, status: null });
  }
}

function showRefused(card, name, err) {
  card.classList.add("refused");
  card.querySelector(".badge").textContent = err.status ? `refused (HTTP ${err.status})` : "failed";
  card.append(el("p", { class: "error", role: "alert", text: err.message }));
}

function probBars(probs, threshold, call) {
  const box = el("div", { class: "probs", role: "table", "aria-label": "Calibrated class probabilities" });
  const entries = Object.entries(probs || {});
  for (const [cls, p] of entries) {
    const bar = el("div", { class: "pbar" },
      el("div", { class: "pfill" + (cls === call ? " top" : ""), style: `width:${(100 * p).toFixed(2)}%` }),
      el("div", { class: "thr", style: `left:${(100 * threshold).toFixed(2)}%`, title: `indeterminate below ${pct(threshold, 0)}` }));
    box.append(el("div", { class: "prow", role: "row", "data-class": cls },
      el("span", { class: "pname", role: "cell", text: pretty(cls) }),
      bar,
      el("span", { class: "pval", role: "cell", text: pct(p) })));
  }
  box.append(el("div", { class: "thr-legend" },
    el("span", { class: "thr-key" }), ` indeterminate threshold: a call needs at least ${pct(threshold, 0)}`));
  return box;
}

function callLine(rec) {
  const status = rec.status;
  const call = el("div", { class: "call status-" + status });
  let text;
  if (status === "ok" || status === "indeterminate") text = pretty(rec.prediction);
  else text = STATUS_TEXT[status] || status;
  call.append(el("span", { class: "call-text", text }));
  const also = rec.region && rec.region.also_present && rec.region.also_present.length ? rec.region.also_present : null;
  if (also) call.append(el("span", { class: "also", text: ` also present: ${also.map(pretty).join(", ")}` }));
  return call;
}

function stainLine(rec) {
  if (!rec.stain) return null;
  return el("p", { class: "stain" }, "Stain: ", el("strong", { text: STAIN_NAMES[rec.stain] || rec.stain }), ` (${pct(rec.stain_probability)})`);
}

function labelToggles(present, onChange) {
  const box = el("div", { class: "toggles" });
  for (const v of present) {
    const id = `t${Math.random().toString(36).slice(2)}`;
    const cb = el("input", { type: "checkbox", id, checked: true, "data-label": v, onchange: onChange });
    box.append(el("label", { for: id, class: "toggle" }, cb,
      el("span", { class: "swatch", style: `background:rgb(${(state.colors[v] || [128, 128, 128]).join(",")})` }),
      ` ${state.names[v] || v}`));
  }
  return box;
}

function checkedLabels(box) {
  return [...box.querySelectorAll("input[type=checkbox]")].filter((c) => c.checked).map((c) => c.dataset.label);
}

function downloads(job, files) {
  const names = { csv: "CSV", json: "JSON", geojson: "QuPath GeoJSON", overlay: "Overlay PNG", lesions: "Lesions CSV", tiles: "Tiles CSV" };
  const box = el("div", { class: "downloads" }, "Download: ");
  for (const key of ["csv", "json", "geojson", "overlay", "lesions", "tiles"]) {
    if (!files[key]) continue;
    box.append(el("a", { href: `/api/jobs/${job.id}/files/${key}`, download: "", "data-key": key, class: "dl", text: names[key] }));
  }
  return box;
}

function lesionTable(lesions, onPick) {
  if (!lesions || !lesions.length) return el("p", { class: "muted", text: "No deposits found." });
  const t = el("table", { class: "lesions" });
  t.append(el("thead", {}, el("tr", {},
    el("th", { text: "#" }), el("th", { text: "Deposit" }), el("th", { text: "Area" }),
    el("th", { text: "Confidence" }), el("th", { text: "Most likely" }), el("th", { text: "Counts", title: "whether the deposit counts toward the call (confidence at least the lesion threshold)" }))));
  const tb = el("tbody");
  for (const les of lesions) {
    const probs = Object.entries(les.probabilities || {}).sort((a, b) => b[1] - a[1]);
    const top = probs.length ? `${pretty(probs[0][0])} ${pct(probs[0][1])}` : "–";
    const all = probs.map(([c, p]) => `${pretty(c)} ${pct(p)}`).join("\n");
    const tr = el("tr", { tabindex: "0", "data-id": les.id, title: all },
      el("td", { text: les.id }),
      el("td", {}, el("span", { class: "swatch", style: `background:rgb(${(state.colors[les.label_value] || [128, 128, 128]).join(",")})` }), ` ${state.names[les.label_value] || les.label}`),
      el("td", { text: area(les.area_um2) }),
      el("td", { text: pct(les.confidence) }),
      el("td", { text: top }),
      el("td", { text: les.passed ? "yes" : "no" }));
    const pick = () => {
      for (const r of tb.querySelectorAll("tr.picked")) r.classList.remove("picked");
      tr.classList.add("picked");
      onPick(les);
    };
    tr.addEventListener("click", pick);
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(); });
    tb.append(tr);
  }
  t.append(tb);
  return el("div", { class: "table-wrap" }, t);
}

function renderImageResult(card, job) {
  const res = job.result;
  const rec = res.record;
  card.dataset.job = job.id;
  card.classList.add("status-" + rec.status);
  card.querySelector(".badge").textContent = STATUS_TEXT[rec.status] || rec.status;
  const info = el("div", { class: "info" });
  info.append(callLine(rec));
  if (rec.reason) info.append(el("p", { class: "reason", text: rec.reason }));
  if (rec.probabilities && Object.keys(rec.probabilities).length) {
    info.append(probBars(rec.probabilities, state.threshold, rec.prediction));
  }
  const st = stainLine(rec);
  if (st) info.append(st);
  const size = `${rec.width} × ${rec.height} px at ${rec.mpp ?? "?"} µm/px${rec.mpp_assumed ? " (the model's, assumed)" : ""}; ${rec.mode}` +
    (rec.region ? ` of ${rec.region.tissue_tiles} tissue tiles` : "") + `; tissue ${pct(rec.tissue_fraction, 0)}`;
  info.append(el("p", { class: "muted", text: size }));
  info.append(downloads(job, res.files));

  const pic = el("div", { class: "picture" });
  const d = res.display;
  const stack = el("div", { class: "stack" });
  const base = el("img", { src: `/api/jobs/${job.id}/image`, alt: `${rec.name}`, width: d.width, height: d.height, class: "base" });
  const labels = d.labels_present;
  const layer = el("img", { class: "layer", alt: "deposit map", width: d.width, height: d.height });
  const box = el("div", { class: "pick-box", hidden: true });
  stack.append(base, layer, box);
  const toggles = labelToggles(labels, () => { layer.src = `/api/jobs/${job.id}/deposits?labels=${checkedLabels(toggles).join(",")}`; });
  layer.src = `/api/jobs/${job.id}/deposits?labels=${labels.join(",")}`;
  const opacity = el("input", { type: "range", min: 0, max: 100, value: 55, class: "opacity", "aria-label": "Deposit map opacity",
    oninput: () => { layer.style.opacity = opacity.value / 100; } });
  layer.style.opacity = 0.55;
  pic.append(stack, el("div", { class: "controls" }, el("label", {}, "Deposit map opacity ", opacity), toggles));
  const lesions = lesionTable(rec.lesions, (les) => {
    const [x, y, w, h] = les.bbox;
    const s = d.scale;
    // The picture is drawn at CSS size; place the box in fractions of it.
    box.style.left = `${(100 * x * s) / d.width}%`;
    box.style.top = `${(100 * y * s) / d.height}%`;
    box.style.width = `${Math.max(0.5, (100 * w * s) / d.width)}%`;
    box.style.height = `${Math.max(0.5, (100 * h * s) / d.height)}%`;
    box.hidden = false;
  });
  const body = el("div", { class: "body" }, info, pic);
  card.append(body, el("h4", { text: `Deposits (${(rec.lesions || []).length})` }), lesions);
}

// ------------------------------------------------------------------ slides

async function loadSlides() {
  const list = document.getElementById("slide-list");
  let data;
  try {
    data = await fetchJSON("/api/slides");
  } catch (e) {
    list.replaceChildren(el("li", { class: "error", text: e.message }));
    return;
  }
  list.replaceChildren();
  if (!data.enabled) {
    list.append(el("li", { class: "muted", text: "No slides folder: start the server with calcinosis serve --slides DIR." }));
    return;
  }
  if (!data.slides.length) list.append(el("li", { class: "muted", text: "The slides folder has no whole-slide files." }));
  for (const s of data.slides) {
    list.append(el("li", {}, el("button", { type: "button", class: "slide-link", "data-path": s.path, onclick: () => openSlide(s.path), text: s.path })));
  }
}

function slideError(msg) {
  const e = document.getElementById("slide-error");
  e.textContent = msg || "";
  e.hidden = !msg;
}

async function openSlide(path) {
  slideError("");
  const msg = document.getElementById("slide-message");
  let info;
  try {
    info = await fetchJSON(`/api/slides/info?path=${encodeURIComponent(path)}`);
  } catch (e) {
    msg.textContent = e.message;
    msg.className = "error";
    document.getElementById("slide-ui").hidden = true;
    return;
  }
  if (window.OSD_MISSING || typeof OpenSeadragon === "undefined") {
    msg.textContent = "The slide viewer's library (OpenSeadragon, from npm) is not installed on this server: run `make venv`.";
    msg.className = "error";
    return;
  }
  msg.textContent = "";
  state.slide = info;
  state.layers = {};
  document.getElementById("slide-ui").hidden = false;
  document.getElementById("slide-name").textContent = info.name;
  document.getElementById("slide-meta").textContent =
    ` ${info.width.toLocaleString("en")} × ${info.height.toLocaleString("en")} px, ${info.levels.length} level(s), ${info.mpp ? info.mpp.toFixed(3) + " µm/px" : "resolution not recorded"} (${info.reader})`;
  document.getElementById("slide-results").replaceChildren();
  document.getElementById("slide-jobs").replaceChildren();
  document.getElementById("slide-toggles").replaceChildren();
  if (state.viewer) state.viewer.destroy();
  const v = encodeURIComponent(info.version);
  const q = encodeURIComponent(path);
  state.viewer = OpenSeadragon({
    element: document.getElementById("viewer"),
    prefixUrl: "/vendor/openseadragon/images/",
    showNavigator: true,
    maxZoomPixelRatio: 4,
    tileSources: {
      width: info.width,
      height: info.height,
      tileSize: info.tile_size,
      tileOverlap: 0,
      minLevel: Math.max(0, info.max_level - 12),
      maxLevel: info.max_level,
      getTileUrl: (level, x, y) => `/api/slides/tile?path=${q}&level=${level}&col=${x}&row=${y}&v=${v}`,
    },
  });
  for (const b of document.querySelectorAll(".slide-link")) b.classList.toggle("open", b.dataset.path === path);
  setupDrawing(state.viewer);
  state.viewer.addOnceHandler("open", () => {
    state.base = state.viewer.world.getItemAt(0);
    for (const job of info.jobs) addSlideResult(job);
    document.getElementById("viewer").dataset.open = "1";
  });
}

function setupDrawing(viewer) {
  let start = null;
  let rectEl = null;
  const drawBtn = document.getElementById("draw");
  state.drawing = false;
  drawBtn.classList.remove("on");
  drawBtn.onclick = () => {
    state.drawing = !state.drawing;
    drawBtn.classList.toggle("on", state.drawing);
    drawBtn.textContent = state.drawing ? "Drawing: drag on the slide" : "Draw a region";
    viewer.setMouseNavEnabled(!state.drawing);
  };
  new OpenSeadragon.MouseTracker({
    element: viewer.element,
    pressHandler: (e) => {
      if (!state.drawing) return;
      start = state.base.viewerElementToImageCoordinates(e.position);
      if (rectEl) viewer.removeOverlay(rectEl);
      rectEl = el("div", { class: "draw-rect" });
      viewer.addOverlay(rectEl, state.base.imageToViewportRectangle(start.x, start.y, 1, 1));
    },
    dragHandler: (e) => {
      if (!state.drawing || !start) return;
      const p = state.base.viewerElementToImageCoordinates(e.position);
      const r = normRect(start, p);
      viewer.updateOverlay(rectEl, state.base.imageToViewportRectangle(r.x, r.y, r.w, r.h));
      document.getElementById("region").value = `${r.x},${r.y},${r.w},${r.h}`;
    },
    releaseHandler: () => {
      if (!state.drawing || !start) return;
      start = null;
      drawBtn.click(); // back to panning
    },
  });
}

function normRect(a, b) {
  const info = state.slide;
  const x0 = Math.max(0, Math.min(a.x, b.x)), y0 = Math.max(0, Math.min(a.y, b.y));
  const x1 = Math.min(info.width, Math.max(a.x, b.x)), y1 = Math.min(info.height, Math.max(a.y, b.y));
  return { x: Math.round(x0), y: Math.round(y0), w: Math.max(1, Math.round(x1 - x0)), h: Math.max(1, Math.round(y1 - y0)) };
}

async function predictSlide(region) {
  slideError("");
  const info = state.slide;
  let job;
  try {
    job = await fetchJSON("/api/slides/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ path: info.path, region }),
    });
  } catch (e) {
    slideError(e.message);
    return;
  }
  refreshBusy();
  const holder = el("div", { class: "slide-job", "data-job": job.id }, el("div", { text: job.name }));
  document.getElementById("slide-jobs").append(holder);
  const final = await follow(job, (snap) => {
    holder.replaceChildren(el("div", { text: snap.name }),
      progressBlock(snap, () => fetchJSON(`/api/jobs/${snap.id}/cancel`, { method: "POST" })));
  });
  if (final.state === "done") {
    holder.remove();
    if (state.slide && state.slide.path === final.slide) addSlideResult(final);
  } else {
    holder.replaceChildren(el("div", { class: final.state === "error" ? "error" : "muted", text: `${final.name}: ${final.error || final.message}` }));
  }
}

function layerUrl(job, labels) {
  return `/api/jobs/${job.id}/deposits?labels=${labels.join(",")}`;
}

function addSlideResult(job) {
  const res = job.result;
  const rec = res.record;
  const viewer = state.viewer;
  const info = state.slide;
  const present = res.display.labels_present;
  const entry = { job, labels: present.slice(), item: null, visible: true };
  state.layers[job.id] = entry;
  const place = () => {
    if (!res.layer || !entry.visible) return;
    const L = res.layer;
    viewer.addTiledImage({
      tileSource: { type: "image", url: layerUrl(job, entry.labels), buildPyramid: false },
      x: L.x / info.width,
      y: L.y / info.width,
      width: L.width / info.width,
      opacity: document.getElementById("slide-opacity").value / 100,
      success: (ev) => {
        if (entry.item) viewer.world.removeItem(entry.item);
        entry.item = ev.item;
      },
    });
  };
  entry.place = place;
  rebuildSlideToggles();
  const on = checkedLabels(document.getElementById("slide-toggles")).map(Number);
  entry.labels = present.filter((v) => on.includes(v));
  place();
  const card = el("article", { class: "result slide-result status-" + rec.status, "data-job": job.id });
  const [x, y, w, h] = job.region;
  // The outline of the region that was predicted, so what was not looked at is plain to see.
  const outline = el("div", { class: "region-rect", "data-job": job.id }, el("span", { text: `${rec.prediction ? pretty(rec.prediction) : STATUS_TEXT[rec.status]}` }));
  viewer.addOverlay(outline, state.base.imageToViewportRectangle(x, y, w, h));
  const show = el("input", { type: "checkbox", checked: true, onchange: () => {
    entry.visible = show.checked;
    outline.hidden = !show.checked;
    if (!show.checked && entry.item) { viewer.world.removeItem(entry.item); entry.item = null; }
    if (show.checked) place();
  } });
  card.append(el("header", {}, el("h3", { text: `Region ${x},${y},${w},${h}` }),
    el("span", { class: "badge", text: STATUS_TEXT[rec.status] || rec.status }),
    el("label", { class: "show" }, show, " show")));
  card.append(callLine(rec));
  if (rec.reason) card.append(el("p", { class: "reason", text: rec.reason }));
  if (rec.probabilities && Object.keys(rec.probabilities).length) card.append(probBars(rec.probabilities, state.threshold, rec.prediction));
  const st = stainLine(rec);
  if (st) card.append(st);
  const sl = rec.slide || {};
  card.append(el("p", { class: "muted", text: `read at level ${sl.level} (downsample ${sl.level_downsample}), ${rec.region ? rec.region.tissue_tiles + " tissue tiles" : rec.mode}` }));
  card.append(downloads(job, res.files));
  card.append(el("h4", { text: `Deposits (${(rec.lesions || []).length})` }));
  card.append(lesionTable(rec.lesions, (les) => {
    const [bx, by, bw, bh] = les.bbox;
    const pad = Math.max(bw, bh) * 1.5 + 32;
    const view = state.base.imageToViewportRectangle(bx - pad, by - pad, bw + 2 * pad, bh + 2 * pad);
    viewer.viewport.fitBounds(view);
    if (state.overlayEl) viewer.removeOverlay(state.overlayEl);
    state.overlayEl = el("div", { class: "pick-rect", "data-lesion": les.id });
    viewer.addOverlay(state.overlayEl, state.base.imageToViewportRectangle(bx, by, bw, bh));
  }));
  document.getElementById("slide-results").prepend(card);
}

function rebuildSlideToggles() {
  // One toggle per deposit label found in any region of this slide; a label seen
  // for the first time starts switched on, the others keep their setting.
  const all = new Set();
  for (const e of Object.values(state.layers)) for (const v of e.job.result.display.labels_present) all.add(v);
  const box = document.getElementById("slide-toggles");
  const known = new Set([...box.querySelectorAll("input")].map((c) => Number(c.dataset.label)));
  const on = new Set(checkedLabels(box).map(Number));
  const t = labelToggles([...all].sort((a, b) => a - b), applySlideLabels);
  for (const cb of t.querySelectorAll("input")) {
    const v = Number(cb.dataset.label);
    cb.checked = !known.has(v) || on.has(v);
  }
  box.replaceChildren(t);
}

function applySlideLabels() {
  const labels = checkedLabels(document.getElementById("slide-toggles")).map(Number);
  for (const e of Object.values(state.layers)) {
    e.labels = labels.filter((v) => e.job.result.display.labels_present.includes(v));
    e.place();
  }
}

// ------------------------------------------------------------------ start

function setupTabs() {
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll(".tabs button")) {
        o.setAttribute("aria-selected", String(o === b));
        document.getElementById(o.dataset.panel).hidden = o !== b;
      }
      if (b.id === "tab-slides") loadSlides();
    });
  }
}

function setupDrop() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file-input");
  document.getElementById("choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => { uploadFiles([...input.files]); input.value = ""; });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const files = [...(e.dataTransfer ? e.dataTransfer.files : [])];
    if (files.length) uploadFiles(files);
  });
  // A file dropped outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

function setupSlideControls() {
  document.getElementById("predict-region").addEventListener("click", () => {
    const text = document.getElementById("region").value.trim();
    if (!text) { slideError("Type a region as x,y,w,h (level-0 pixels) or draw one first."); return; }
    predictSlide(text);
  });
  document.getElementById("predict-all").addEventListener("click", () => predictSlide(null));
  document.getElementById("slide-opacity").addEventListener("input", (e) => {
    for (const entry of Object.values(state.layers)) if (entry.item) entry.item.setOpacity(e.target.value / 100);
  });
}

async function start() {
  setupTabs();
  setupDrop();
  setupSlideControls();
  try {
    const model = await fetchJSON("/api/model");
    state.model = model;
    state.threshold = model.card.indeterminate_threshold;
    state.colors = model.deposit_colors;
    state.names = model.deposit_names;
    renderCard(model);
    if (!model.slides_enabled) document.getElementById("tab-slides").title = "start the server with --slides DIR";
    document.body.dataset.ready = "1";
  } catch (e) {
    document.getElementById("card-body").textContent = `The model card could not be loaded: ${e.message}`;
  }
  refreshBusy();
}

start();

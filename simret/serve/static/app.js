// simret search page: plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, id: null, box: null, info: null, seq: 0 };

async function api(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function numberOf(id, low, fallback) {
  const value = parseInt($(id).value, 10);
  return Number.isFinite(value) && value >= low ? value : fallback;
}

function params() {
  const query = new URLSearchParams({ k: numberOf("k", 1, 12), qe: numberOf("qe", 0, 0) });
  if (state.file && state.box) query.set("bbox", state.box.map((v) => Math.round(v)).join(","));
  return query;
}

// ------------------------------------------------------------------ showing the query

function showQuery(src, name) {
  $("query-view").hidden = false;
  $("query-img").src = src;
  $("query-name").textContent = name;
  $("query-name").dataset.query = name;
  $("box-hint").hidden = !state.file;
  $("overlay").hidden = true;
  $("query-class").hidden = true;
  drawBox();
}

function useFile(file) {
  if (!file) return;
  state.file = file; state.id = null; state.box = null;
  showQuery(URL.createObjectURL(file), file.name);
  search();
  classify(file);
}

function useId(id) {
  state.file = null; state.id = id; state.box = null;
  showQuery(`/images/${encodePath(id)}`, id);
  search();
}

function encodePath(id) { return id.split("/").map(encodeURIComponent).join("/"); }

// ------------------------------------------------------------------ searching

async function search() {
  const seq = ++state.seq;
  status("searching…");
  try {
    let response;
    const query = params();
    if (state.file) {
      const form = new FormData();
      form.append("image", state.file, state.file.name);
      response = await api(`/search?${query}`, { method: "POST", body: form });
    } else {
      query.set("id", state.id);
      response = await api(`/search?${query}`);
    }
    const result = await response.json();
    if (seq !== state.seq) return; // a newer search has started
    render(result);
    $("query-name").dataset.bbox = query.get("bbox") || "";
    status(`${result.ids.length} results for ${result.query}${state.box ? " (region)" : ""}`);
    if ($("attention").checked) attention();
  } catch (err) {
    if (seq === state.seq) status(err.message, true);
  }
}

function render(result) {
  const list = $("results");
  list.replaceChildren();
  result.ids.forEach((id, i) => {
    const item = document.createElement("li");
    item.dataset.id = id;
    const button = document.createElement("button");
    button.type = "button";
    button.title = `search with ${id}`;
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = id;
    img.src = `/thumbnails/${encodePath(id)}?size=256`;
    const caption = document.createElement("div");
    caption.className = "name";
    const rank = document.createElement("span"); rank.className = "rank"; rank.textContent = `${i + 1}.`;
    const score = document.createElement("span"); score.className = "score"; score.textContent = result.scores[i].toFixed(4);
    const label = document.createElement("div"); label.textContent = id;
    caption.append(rank, score, label);
    button.append(img, caption);
    button.addEventListener("click", () => useId(id));
    item.append(button);
    list.append(item);
  });
}

// ------------------------------------------------------------------ the class of an uploaded query (--support)

async function classify(file) {
  if (!state.info || !state.info.classify) return;
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const result = await (await api("/classify", { method: "POST", body: form })).json();
    if (state.file !== file) return; // another query since
    const others = result.top.slice(1).map((t) => `${t.class} ${t.score.toFixed(4)}`).join(", ");
    $("query-class").textContent = `class: ${result.class} (${result.score.toFixed(4)}, ${result.method})`
      + (others ? ` · next: ${others}` : "");
    $("query-class").hidden = false;
  } catch (err) {
    if (state.file === file) status(`classify: ${err.message}`, true);
  }
}

// ------------------------------------------------------------------ attention overlay

async function attention() {
  const overlay = $("overlay");
  if (!$("attention").checked) { overlay.hidden = true; return; }
  if (state.info && !state.info.attention) { status("this index's encoder has no SimPool attention", true); return; }
  const seq = state.seq;
  try {
    let response;
    if (state.file) {
      const form = new FormData();
      form.append("image", state.file, state.file.name);
      response = await api("/attention", { method: "POST", body: form });
    } else if (state.id) {
      response = await api(`/attention?id=${encodeURIComponent(state.id)}`);
    } else return;
    const blob = await response.blob();
    if (seq !== state.seq) return;
    overlay.src = URL.createObjectURL(blob);
    overlay.hidden = false;
  } catch (err) {
    status(err.message, true);
  }
}

// ------------------------------------------------------------------ drawing a box on an uploaded query

function drawBox() {
  const box = $("box"), img = $("query-img");
  $("clear-box").disabled = !state.box;
  if (!state.box || !img.naturalWidth) { box.hidden = true; return; }
  const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
  const [x1, y1, x2, y2] = state.box;
  Object.assign(box.style, { left: `${x1 * sx}px`, top: `${y1 * sy}px`, width: `${(x2 - x1) * sx}px`,
                             height: `${(y2 - y1) * sy}px` });
  box.hidden = false;
}

function pointIn(event) {
  const img = $("query-img"), rect = img.getBoundingClientRect();
  const x = Math.min(Math.max(event.clientX - rect.left, 0), rect.width);
  const y = Math.min(Math.max(event.clientY - rect.top, 0), rect.height);
  return [x * img.naturalWidth / rect.width, y * img.naturalHeight / rect.height];
}

function setUpBox() {
  const frame = $("query-frame");
  let start = null;
  frame.addEventListener("pointerdown", (event) => {
    if (!state.file) return;
    start = pointIn(event);
    frame.setPointerCapture(event.pointerId);
  });
  frame.addEventListener("pointermove", (event) => {
    if (!start) return;
    const [x, y] = pointIn(event);
    state.box = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    drawBox();
  });
  frame.addEventListener("pointerup", () => {
    if (!start) return;
    start = null;
    const b = state.box;
    if (b && (b[2] - b[0] < 8 || b[3] - b[1] < 8)) state.box = null; // a click, not a box
    drawBox();
    search();
  });
  $("query-img").addEventListener("load", drawBox);
  window.addEventListener("resize", drawBox);
  $("clear-box").addEventListener("click", () => { state.box = null; drawBox(); search(); });
}

// ------------------------------------------------------------------ start

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = ""; // choosing the same file again is a new search
    useFile(file);
  });
  ["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
    event.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => { event.preventDefault(); useFile(event.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
  $("attention").addEventListener("change", attention);
  ["k", "qe"].forEach((id) => $(id).addEventListener("change", () => { if (state.file || state.id) search(); }));
  setUpBox();
  api("/health").then((r) => r.json()).then((info) => {
    state.info = info;
    $("index-info").textContent = `${info.count} images · generation ${info.generation.slice(0, 8)}`;
    $("attention").disabled = !info.attention;
  }).catch((err) => status(err.message, true));
}

setUp();

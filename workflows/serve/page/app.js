// The search page: plain DOM + fetch against this service's own JSON API (no external scripts).
"use strict";

const $ = (id) => document.getElementById(id);

// A service started with --auth-token-file wants `Authorization: Bearer TOKEN` on its API. The page is opened
// as /#token=TOKEN once: the fragment never reaches a server (or its logs); the token is kept for this tab.
const TOKEN = (() => {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem("vidsift-token", given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("vidsift-token");
})();

function api(path) {
  return fetch(path, TOKEN ? { headers: { Authorization: `Bearer ${TOKEN}` } } : {});
}

function fmt(seconds) {
  return seconds === null || seconds === undefined ? "?" : Number(seconds).toFixed(1);
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function loadVersion() {
  try {
    const response = await api("/version");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error);
    $("version").textContent = `index version ${info.version} · ${info.videos} videos · ${info.model_name}`;
    const columns = Object.keys(info.filter_columns || {});
    $("columns").replaceChildren(...columns.map((c) => Object.assign(document.createElement("option"),
      { value: `${c}:` })));
    $("columns-help").textContent = columns.length ? `columns: ${columns.join(", ")}` : "";
    if (!info.previews) setStatus("This service cannot reach the videos: hits have no previews.");
    if (info.previews_note) setStatus(`Some or all hits have no preview: ${info.previews_note}`);
  } catch (err) {
    $("version").textContent = `service not reachable: ${err.message}`;
  }
}

function card(hit) {
  const node = $("hit-card").content.firstElementChild.cloneNode(true);
  const preview = node.querySelector(".preview");
  if (hit.preview_url) {
    const img = Object.assign(document.createElement("img"),
      { alt: `${hit.video_id} ${fmt(hit.start_s)}–${fmt(hit.end_s)} s`, loading: "lazy" });
    const failed = () => preview.replaceChildren(Object.assign(document.createElement("span"),
      { className: "none", textContent: "preview failed to load" }));
    img.addEventListener("error", failed);
    if (TOKEN) {  // an <img> cannot send the token: fetch the WebP with it and show the bytes
      api(hit.preview_url).then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.status))))
        .then((blob) => { img.src = URL.createObjectURL(blob); }, failed);
    } else {
      img.src = hit.preview_url;
    }
    preview.replaceChildren(img);
  } else {
    preview.replaceChildren(Object.assign(document.createElement("span"),
      { className: "none", textContent: "no preview: the service cannot reach this video" }));
  }
  const link = node.querySelector(".video-id");
  link.textContent = hit.video_id;
  link.href = `/videos/${encodeURIComponent(hit.video_id)}`;
  node.querySelector(".score").textContent = `score ${hit.score.toFixed(3)}`;
  node.querySelector(".window").textContent = `${fmt(hit.start_s)}–${fmt(hit.end_s)} s`;
  if (hit.generated_caption) {  // what the captioner wrote (serve --captions); the index caption below
    const generated = node.querySelector(".generated");
    generated.querySelector(".text").textContent = hit.generated_caption;
    generated.hidden = false;
  }
  node.querySelector(".caption").textContent = hit.caption || "";
  return node;
}

async function search(event) {
  event.preventDefault();
  const params = new URLSearchParams({ q: $("q").value, k: $("k").value });
  for (const name of ["min_duration", "max_duration"]) {
    if ($(name).value) params.set(name, $(name).value);
  }
  for (const cond of $("where").value.split(",").map((s) => s.trim()).filter(Boolean)) {
    params.append("where", cond);
  }
  setStatus("searching…");
  const started = performance.now();
  let body;
  try {
    const response = await api(`/search?${params}`);
    body = await response.json();
    if (!response.ok) {
      const hint = response.status === 401 ? ": open this page as /#token=TOKEN" : "";
      setStatus((body.error || `error ${response.status}`) + hint, true);
      return;
    }
  } catch (err) {
    setStatus(`search failed: ${err}`, true);
    return;
  }
  $("results").replaceChildren(...body.hits.map(card));
  const ms = (performance.now() - started).toFixed(0);
  setStatus(`${body.hits.length} videos for “${body.query}” · index version ${body.version} · ${ms} ms`);
  history.replaceState(null, "", `?${params}`);
}

$("search-form").addEventListener("submit", search);
loadVersion().then(() => {
  const initial = new URLSearchParams(location.search).get("q");
  if (initial) {
    $("q").value = initial;
    $("search-form").requestSubmit();
  }
});

// The search page: plain DOM + fetch against this service's own JSON API (no external scripts).
"use strict";

const $ = (id) => document.getElementById(id);

function fmt(seconds) {
  return seconds === null || seconds === undefined ? "?" : Number(seconds).toFixed(1);
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function loadVersion() {
  try {
    const info = await (await fetch("/version")).json();
    $("version").textContent = `index version ${info.version} · ${info.videos} videos · ${info.model_name}`;
    const columns = Object.keys(info.filter_columns || {});
    $("columns").replaceChildren(...columns.map((c) => Object.assign(document.createElement("option"),
      { value: `${c}:` })));
    $("columns-help").textContent = columns.length ? `columns: ${columns.join(", ")}` : "";
    if (!info.previews) setStatus("This service cannot reach the videos: hits have no previews.");
  } catch (err) {
    $("version").textContent = "service not reachable";
  }
}

function card(hit) {
  const node = $("hit-card").content.firstElementChild.cloneNode(true);
  const preview = node.querySelector(".preview");
  if (hit.preview_url) {
    const img = Object.assign(document.createElement("img"),
      { src: hit.preview_url, alt: `${hit.video_id} ${fmt(hit.start_s)}–${fmt(hit.end_s)} s`, loading: "lazy" });
    img.addEventListener("error", () => {
      preview.replaceChildren(Object.assign(document.createElement("span"),
        { className: "none", textContent: "preview failed to load" }));
    });
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
    const response = await fetch(`/search?${params}`);
    body = await response.json();
    if (!response.ok) {
      setStatus(body.error || `error ${response.status}`, true);
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

"""The preview page's HTML (one plain page, no external scripts or styles), filled in by ``webui``."""

# One LoRA menu of the page and its strength; several stack.
LORA_SLOT = """<div class="row">
      <div><label for="{{ID}}">LoRA</label>
        <select id="{{ID}}" name="lora"><option value="">none (base model)</option>{{OPTIONS}}</select></div>
      <div><label for="{{ID}}-strength">Strength</label>
        <input id="{{ID}}-strength" name="lora_strength" type="number" value="1.0" step="0.05"></div>
    </div>"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>longcat preview</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #1d1d22; }
  header { background: #1d1d22; color: #fff; padding: 10px 20px; font-weight: 600; }
  main { display: flex; flex-wrap: wrap; gap: 20px; padding: 20px; }
  section { background: #fff; border-radius: 8px; padding: 16px; box-shadow: 0 1px 3px #0002; }
  #form { flex: 0 1 380px; }
  #results { flex: 1 1 480px; }
  label { display: block; margin: 10px 0 3px; font-weight: 600; font-size: 13px; }
  input, select, textarea, button { font: inherit; box-sizing: border-box; width: 100%; }
  textarea { height: 90px; }
  .row { display: flex; gap: 10px; }
  .row > div { flex: 1; }
  button { margin-top: 14px; padding: 8px; background: #3457d5; color: #fff; border: 0; border-radius: 6px; }
  button:disabled { background: #999; }
  #preview { max-width: 100%; max-height: 200px; margin-top: 8px; display: none; border-radius: 4px; }
  .hint { color: #666; font-size: 12px; }
  #message { margin-top: 12px; padding: 8px; border-radius: 6px; display: none; }
  #message.error { display: block; background: #fde8e8; color: #a01919; }
  #message.note { display: block; background: #eef3fd; color: #22408f; }
  progress { width: 100%; }
  .job { border-top: 1px solid #ddd; padding: 10px 0; }
  .job video { max-width: 100%; max-height: 480px; display: block; background: #000; }
  .job .meta { color: #555; font-size: 13px; margin: 4px 0; }
</style>
</head>
<body>
<header>longcat &middot; image-to-video preview</header>
<main>
<section id="form">
  <form id="generate">
    <label for="image">Start frame</label>
    <input id="image" name="image" type="file" accept="image/png,image/jpeg,image/webp">
    <div class="hint">PNG, JPEG or WebP, up to {{MAX_MB}} MB; resized and cropped to the closest-shaped bucket of about {{AREA}} pixels.</div>
    <img id="preview" alt="start frame preview">
    <label for="video">or a video to continue</label>
    <input id="video" name="video" type="file" accept="video/*">
    <div class="hint">Its last {{COND_FRAMES}} frames lead the new video; leave the start frame empty then.</div>
    <label for="prompt">Prompt</label>
    <textarea id="prompt" name="prompt" placeholder="What happens in the video"></textarea>
    {{LORA_SLOTS}}
    <div class="row">
      <div><label for="steps">Steps</label><input id="steps" name="steps" type="number" value="{{STEPS}}" min="1"></div>
      <div><label for="seed">Seed</label><input id="seed" name="seed" type="number" value="0" min="0"></div>
    </div>
    <div class="row">
      <div><label for="frames">Frames</label><input id="frames" name="frames" type="number" value="{{FRAMES}}" min="5"></div>
      <div><label for="guidance">Guidance</label>
        <input id="guidance" name="guidance" type="number" value="{{GUIDANCE}}" step="0.5" min="0"></div>
    </div>
    <label for="segments">Segments</label>
    <input id="segments" name="segments" type="number" value="1" min="1">
    <div class="hint">More than one: each continues the last {{COND_FRAMES}} frames of the one before, into one long video.</div>
    <button id="submit" type="submit">Generate</button>
    <div id="message" role="alert"></div>
  </form>
</section>
<section id="results">
  <div id="empty" class="hint">Videos appear here, newest first. One is made at a time; others wait in the queue.</div>
  <div id="jobs"></div>
</section>
</main>
<script>
const form = document.getElementById("generate");
const LORA_STRENGTHS = {{LORA_STRENGTHS}};

// Choosing a LoRA in a menu suggests its strength (the one given to --lora), still editable.
for (const menu of document.querySelectorAll("select[name=lora]")) {
  menu.addEventListener("change", () => {
    const strength = menu.parentElement.parentElement.querySelector("input[name=lora_strength]");
    if (menu.value in LORA_STRENGTHS) strength.value = LORA_STRENGTHS[menu.value];
  });
}
const message = document.getElementById("message");
const imageInput = document.getElementById("image");
const preview = document.getElementById("preview");

function show(text, kind) {
  message.textContent = text;
  message.className = text ? kind : "";
}

// A file the browser cannot show (a video, a bomb) hides the preview; the server says why on submit.
preview.addEventListener("error", () => { preview.style.display = "none"; });

imageInput.addEventListener("change", () => {
  const file = imageInput.files[0];
  if (file && file.type.startsWith("image/")) {
    preview.src = URL.createObjectURL(file);
    preview.style.display = "block";
  } else {
    preview.style.display = "none";
  }
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  show("", "");
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    const response = await fetch("/api/jobs", { method: "POST", body: new FormData(form) });
    const job = await response.json().catch(() => ({ error: "the server answered " + response.status }));
    if (!response.ok) { show(job.error || ("error " + response.status), "error"); return; }
    if (job.note) show(job.note, "note");
    addJob(job);
  } catch (err) {
    show("could not reach the server: " + err, "error");
  } finally {
    button.disabled = false;
  }
});

function addJob(job) {
  document.getElementById("empty").style.display = "none";
  const card = document.createElement("div");
  card.className = "job";
  card.id = "job-" + job.id;
  const title = document.createElement("div");
  title.className = "meta";
  title.textContent = "#" + job.id + ": " + job.prompt;
  const bar = document.createElement("progress");
  bar.max = job.steps;
  bar.value = 0;
  const state = document.createElement("div");
  state.className = "meta state";
  card.append(title, bar, state);
  document.getElementById("jobs").prepend(card);
  poll(job.id, card, bar, state);
}

async function poll(id, card, bar, state) {
  let job;
  try {
    job = await (await fetch("/api/jobs/" + id)).json();
  } catch (err) {
    state.textContent = "lost contact with the server, retrying";
    setTimeout(() => poll(id, card, bar, state), 2000);
    return;
  }
  bar.max = job.steps;
  bar.value = job.step;
  if (job.state === "queued") {
    state.textContent = "waiting: " + job.position + " ahead in the queue";
  } else if (job.state === "running") {
    state.textContent = "step " + job.step + " of " + job.steps;
  } else if (job.state === "error") {
    bar.remove();
    state.textContent = "failed: " + job.error;
    state.style.color = "#a01919";
    return;
  } else if (job.state === "done") {
    bar.remove();
    const video = document.createElement("video");
    video.src = job.video;
    video.controls = true;
    video.loop = true;
    video.autoplay = true;
    video.muted = true;
    const link = document.createElement("a");
    link.href = job.video;
    link.download = "longcat_" + id + ".mp4";
    link.textContent = "download MP4";
    state.textContent = "done in " + job.seconds.toFixed(1) + " s \u00b7 ";
    state.append(link);
    card.insertBefore(video, state);
    return;
  }
  setTimeout(() => poll(id, card, bar, state), 500);
}
</script>
</body>
</html>
"""

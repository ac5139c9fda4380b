// The mgmflow playground: pick a workflow, fill its input (the form is built from the workflow's input schema),
// start a run (on a new thread, or on the same one to continue a conversation), follow its event stream, show
// images as they arrive, then the storyboard, the answer or the conversation, and a link to the run's files.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { threadId: null, runId: null, schema: null, shown: new Set(), previewSeq: 0 };

$("api-key").value = localStorage.getItem("mgmflow-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("mgmflow-api-key", $("api-key").value));

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function api(path, { method = "GET", json, body } = {}) {
  const init = { method, headers: headers(json ? { "Content-Type": "application/json" } : {}) };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (body !== undefined) init.body = body;
  const response = await fetch(path, init);
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(data?.detail || `${response.status} ${response.statusText}`);
  return data;
}

function log(text, cls) {
  const item = document.createElement("li");
  item.textContent = text;
  if (cls) item.className = cls;
  $("events").append(item);
  $("events").scrollTop = $("events").scrollHeight;
}

async function loadWorkflows() {
  const assistants = await api("/assistants/search", { method: "POST", json: { limit: 100 } });
  for (const assistant of assistants) {
    const option = new Option(assistant.name, assistant.assistant_id);
    option.title = assistant.description || "";
    $("workflow").append(option);
  }
  if (assistants.some((a) => a.assistant_id === "story")) $("workflow").value = "story";
  await loadSchema();
}

async function loadSchema() {
  const id = $("workflow").value;
  const schemas = await api(`/assistants/${encodeURIComponent(id)}/schemas`);
  state.schema = schemas.input_schema || { properties: {} };
  $("workflow-description").textContent = $("workflow").selectedOptions[0]?.title || "";
  renderFields(state.schema);
}

function isImageField(name, spec) {
  return /image/i.test(name) && (spec.type === "string" || spec.type === "array" || spec.anyOf);
}

// An optional field (`int | None`) is `anyOf: [{type: "integer", ...}, {type: "null"}]`: its non-null part.
function unwrapOptional(spec) {
  const options = (spec.anyOf || []).filter((option) => option.type !== "null");
  return options.length === 1 ? { ...options[0], ...spec, anyOf: undefined, type: options[0].type } : spec;
}

function renderFields(schema) {
  const fields = $("fields");
  fields.replaceChildren();
  const required = new Set(schema.required || []);
  for (const [name, property] of Object.entries(schema.properties || {})) {
    const spec = unwrapOptional(property);
    const label = document.createElement("label");
    label.textContent = `${spec.title || name} `;
    let input;
    if (isImageField(name, spec)) {
      input = document.createElement("input");
      input.type = "file";
      input.accept = "image/*";
      input.multiple = spec.type === "array";
    } else if (spec.type === "integer" || spec.type === "number") {
      input = document.createElement("input");
      input.type = "number";
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
      input.step = spec.multipleOf || (spec.type === "integer" ? "1" : "any");
    } else if (spec.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(spec.default);
    } else if (spec.type === "string") {
      input = document.createElement(spec.maxLength && spec.maxLength <= 200 ? "input" : "textarea");
      if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
    } else {
      continue; // structured fields are for the API, not this page
    }
    input.name = name;
    input.id = `field-${name}`;
    input.required = required.has(name) && input.type !== "checkbox";
    label.append(input);
    fields.append(label);
  }
}

async function collectInput() {
  const input = {};
  for (const element of $("fields").querySelectorAll("input, textarea")) {
    const spec = state.schema.properties[element.name];
    if (element.type === "file") {
      const ids = [];
      for (const file of element.files) {
        const form = new FormData();
        form.append("file", file);
        ids.push((await api("/artifacts", { method: "POST", body: form })).id);
      }
      if (ids.length) input[element.name] = spec.type === "array" ? ids : ids[0];
    } else if (element.type === "checkbox") {
      input[element.name] = element.checked;
    } else if (element.value !== "") {
      input[element.name] = element.type === "number" ? Number(element.value) : element.value;
    }
  }
  return input;
}

async function showImage(container, artifactId, caption) {
  const key = `${container.id}:${artifactId}`;
  if (state.shown.has(key)) return;
  state.shown.add(key);
  const response = await fetch(`/artifacts/${encodeURIComponent(artifactId)}/content`, { headers: headers() });
  if (!response.ok) return log(`cannot load image ${artifactId}: ${response.status}`, "error");
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = URL.createObjectURL(await response.blob());
  img.alt = caption || artifactId;
  img.dataset.artifact = artifactId;
  const text = document.createElement("figcaption");
  text.textContent = caption || "";
  figure.append(img, text);
  container.append(figure);
}

// The latest diffusion preview of the run (`task.step` events carry one when the run asked for previews).
async function showPreview(artifactId, step, total) {
  const seq = ++state.previewSeq; // previews load concurrently: never let an older one replace a newer one
  const response = await fetch(`/artifacts/${encodeURIComponent(artifactId)}/content`, { headers: headers() });
  if (!response.ok || seq !== state.previewSeq) return;
  const url = URL.createObjectURL(await response.blob());
  if (seq !== state.previewSeq) return URL.revokeObjectURL(url);
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = url;
  img.dataset.artifact = artifactId;
  $("preview-caption").textContent = `preview, step ${step}/${total}`;
  $("preview-panel").hidden = false;
}

function setProgress(done, total) {
  if (total) { $("progress").max = total; $("progress").value = done; }
}

// Event types: the driver's `run` and `node`, the workflow's `progress`, `artifact` and `item` (a page finished, with
// its chosen image: shown in the storyboard as it arrives), the workers' `task.*`.
function onEvent(event, data) {
  switch (event) {
    case "metadata":
      return log(`run ${data.run_id}`);
    case "queued":
      $("status").textContent = "queued";
      $("position").textContent = `position ${data.position}`;
      return log(`queued, position ${data.position}`);
    case "run":
      $("status").textContent = data.status;
      if (data.status !== "pending") $("position").textContent = "";
      return log(`run ${data.status}${data.error ? `: ${data.error.message}` : ""}`, data.error ? "error" : "");
    case "node":
      if (data.phase === "start") { $("status").textContent = `running: ${data.name}`; $("position").textContent = ""; }
      return log(`${data.phase === "start" ? "▶" : data.phase === "error" ? "✗" : "✓"} ${data.name}`);
    case "progress":
      setProgress(data.done, data.total);
      $("position").textContent = `${data.stage || ""} ${data.done}/${data.total}`;
      return log(`progress ${data.stage || ""} ${data.done}/${data.total}`);
    case "task.step":
      if (data.preview) showPreview(data.preview, data.step, data.total).catch(() => {});
      return setProgress(data.step, data.total);
    case "task.started":
      return log(`task ${data.kind}`);
    case "artifact":
      if ((data.media_type || "image/png").startsWith("image/") && (data.kind || "image") === "image") {
        showImage($("images"), data.id, [data.item, data.prompt].filter(Boolean).join(": "));
      }
      return log(`artifact ${data.id}`);
    case "item":
      if (data.artifact) showImage($("storyboard"), data.artifact, `${data.key}: score ${data.score}`).catch(() => {});
      return log(`${data.key} ${data.status}: score ${data.score}`);
    case "error":
      $("status").textContent = "error";
      return log(`error: ${data.message || data.error}`, "error");
    case "end":
      $("status").textContent = data.status || "done";
      $("position").textContent = "";
      return log(`end: ${data.status}`);
    default:
      return undefined;
  }
}

// Reads the run's event stream with fetch (EventSource cannot send an API key), resuming with Last-Event-ID.
async function follow(threadId, runId) {
  let lastId = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    const extra = lastId ? { "Last-Event-ID": lastId } : {};
    let ended = false;
    try {
      const response = await fetch(`/threads/${threadId}/runs/${runId}/stream`, { headers: headers(extra) });
      if (!response.ok) throw new Error(`${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let fields = { event: "message", data: "" };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let newline;
        while ((newline = buffer.search(/\r\n|\n|\r/)) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
          if (line === "") {
            if (fields.data) {
              const data = JSON.parse(fields.data);
              onEvent(fields.event, data);
              if (fields.event === "end") ended = true;
            }
            fields = { event: "message", data: "" };
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const name = line.slice(0, colon);
            const val = line.slice(colon + 1).replace(/^ /, "");
            if (name === "id") lastId = val;
            else if (name === "event") fields.event = val;
            else if (name === "data") fields.data += (fields.data ? "\n" : "") + val;
          }
        }
      }
    } catch (error) {
      log(`stream interrupted (${error.message}), reconnecting`);
    }
    if (ended) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// Plain-HTTP progress while the run waits: its place in the queue (never shown once it has started).
async function pollPosition(runId) {
  for (;;) {
    const run = await api(`/runs/${runId}`);
    if (run.status !== "pending" || state.runId !== runId) return;
    $("position").textContent = `queued, position ${run.position}`;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function showConversation(messages) {
  const items = messages.map((message) => {
    const item = document.createElement("li");
    item.className = message.role;
    item.textContent = `${message.role}: ${message.text}`;
    return item;
  });
  $("conversation").replaceChildren(...items);
  $("conversation-panel").hidden = items.length === 0;
  for (const message of messages) {
    for (const artifactId of message.images || []) showImage($("images"), artifactId, `${message.role}`);
  }
}

async function showResult(threadId, runId) {
  const run = await api(`/runs/${runId}`);
  $("position").textContent = "";
  $("output-link").hidden = !run.output_url;
  if (run.output_url) $("output-link").dataset.url = run.output_url;
  const threadState = await api(`/threads/${threadId}/state`);
  const values = threadState.values || {};
  const refs = Object.fromEntries((values.artifacts || []).map((ref) => [ref.id, ref]));
  const chosen = Object.entries(values.chosen || {}).sort(([a], [b]) => a.localeCompare(b, undefined, { numeric: true }));
  for (const [item, artifactId] of chosen) {
    const ref = refs[artifactId] || {};
    const score = ref.scores ? Object.values(ref.scores)[0] : undefined;
    await showImage($("storyboard"), artifactId, `${item}: ${ref.prompt || ""}${score !== undefined ? ` (score ${score})` : ""}`);
  }
  if (values.answer) {
    $("answer").textContent = typeof values.answer === "string" ? values.answer : JSON.stringify(values.answer, null, 2);
    $("answer-panel").hidden = false;
  }
  showConversation(values.messages || []);
}

// The run's files (a story's storyboard folder, …) as a zip; fetched with the API key, then saved.
$("output-link").addEventListener("click", async () => {
  const response = await fetch($("output-link").dataset.url, { headers: headers() });
  if (!response.ok) return log(`cannot download the run's files: ${response.status}`, "error");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${$("workflow").value}-${state.runId}.zip`;
  link.click();
  URL.revokeObjectURL(link.href);
});

function newThread() {
  state.threadId = null;
  $("thread").textContent = "new thread";
  $("conversation").replaceChildren();
  $("conversation-panel").hidden = true;
}

$("workflow").addEventListener("change", () => {
  newThread(); // a thread belongs to one workflow
  $("same-thread").checked = $("workflow").value === "chat";
  loadSchema().catch((error) => log(error.message, "error"));
});
$("new-thread").addEventListener("click", newThread);

$("run-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("start").disabled = true;
  $("events").replaceChildren(); $("images").replaceChildren(); $("storyboard").replaceChildren();
  $("answer-panel").hidden = true; $("output-link").hidden = true; $("position").textContent = "";
  state.shown.clear();
  state.previewSeq++;
  $("preview-panel").hidden = true;
  $("progress").value = 0;
  try {
    const input = await collectInput();
    // A conversation goes on on its thread; anything else (or "New thread") starts a new one.
    if (!$("same-thread").checked || !state.threadId) {
      state.threadId = (await api("/threads", { method: "POST", json: {} })).thread_id;
    }
    const threadId = state.threadId;
    $("thread").textContent = `thread ${threadId}`;
    const previews = Number($("previews").value) || 0;
    const run = await api(`/threads/${threadId}/runs`, {
      method: "POST", json: { assistant_id: $("workflow").value, input, stream_resumable: true, previews },
    });
    state.runId = run.run_id;
    $("cancel").disabled = false;
    $("status").textContent = run.status;
    pollPosition(run.run_id).catch(() => {});
    await follow(threadId, run.run_id);
    await showResult(threadId, run.run_id);
  } catch (error) {
    $("status").textContent = "error";
    log(error.message, "error");
  } finally {
    $("start").disabled = false;
    $("cancel").disabled = true;
  }
});

$("cancel").addEventListener("click", () =>
  api(`/threads/${state.threadId}/runs/${state.runId}/cancel`, { method: "POST" }).catch((error) => log(error.message, "error")));

loadWorkflows().catch((error) => log(error.message, "error"));

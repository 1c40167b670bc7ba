// The page of `turbokit serve`: a live session over /ws (docs/serve.md has the protocol).
// Every change to a setting is sent at once (the server makes the newest request and skips the
// rest); img2img frames come from an upload or the webcam, drawn at the chosen size; "Download PNG"
// asks /api/txt2img or /api/img2img for the shown image as a PNG that carries its parameters.
"use strict";

const DEBOUNCE_MS = 50;
const WEBCAM_FPS = 5;
const HISTORY_MAX = 32;
const HISTORY_SETTLE_MS = 1000; // an image shown this long joins the history (not every keystroke's)
const KEY_STORAGE = "turbokit-api-key";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"),
  status: $("status"),
  error: $("error"),
  auth: $("auth"),
  authReason: $("auth-reason"),
  apiKey: $("api-key"),
  controls: $("controls"),
  prompt: $("prompt"),
  steps: $("steps"),
  seed: $("seed"),
  randomSeed: $("random-seed"),
  width: $("width"),
  height: $("height"),
  strength: $("strength"),
  upload: $("upload"),
  webcam: $("webcam"),
  camera: $("camera"),
  sourceImage: $("source-image"),
  sourceHint: $("source-hint"),
  output: $("output"),
  elapsed: $("elapsed"),
  download: $("download"),
  history: $("history"),
};

const state = {
  key: null,
  model: null,
  ws: null,
  retries: 0,
  source: null, // what frames are drawn from: an ImageBitmap, an <img>, or the webcam <video>
  stream: null,
  frameTimer: 0,
  lastFrame: null, // the data URL of the last frame sent
  shown: null, // the displayed image: {params, seed, image, frame}
  history: [],
  settleTimer: 0,
  paramsTimer: 0,
  errorUntilNextImage: false,
};

// ------------------------------------------------------------------ messages to the user

/** Shows an error until the user changes something (or, if `untilNextImage`, until an image arrives). */
function showError(message, untilNextImage = false) {
  els.error.textContent = message;
  els.error.hidden = false;
  state.errorUntilNextImage = untilNextImage;
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

function setStatus(text) {
  els.status.textContent = text;
}

// ------------------------------------------------------------------ the API key and HTTP

function storage(action, value) {
  try {
    if (action === "get") return sessionStorage.getItem(KEY_STORAGE);
    if (action === "set") sessionStorage.setItem(KEY_STORAGE, value);
  } catch {
    // storage disabled: the key lasts as long as the page
  }
  return null;
}

function readKey() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("api_key");
  if (fromUrl !== null) {
    storage("set", fromUrl);
    url.searchParams.delete("api_key");
    window.history.replaceState(null, "", url); // keep the key out of the address bar
    return fromUrl;
  }
  return storage("get");
}

function errorText(data, response) {
  const detail = data && data.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => `${(e.loc || []).filter((part) => part !== "body").join(".")}: ${e.msg}`)
      .join("; ");
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

async function api(path, body) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const init = { method: "GET", headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch {
    data = { detail: text || null }; // a plain-text answer, such as a refused Host header
  }
  if (!response.ok) {
    const error = new Error(errorText(data, response));
    error.status = response.status;
    throw error;
  }
  return data;
}

function askForKey() {
  els.authReason.textContent = state.key
    ? "The server refused this API key: enter the key it was started with (--api-key)."
    : "This server needs its API key (the one it was started with, --api-key).";
  els.auth.hidden = false;
  els.apiKey.focus();
  setStatus("waiting for the API key");
}

els.auth.addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = els.apiKey.value;
  storage("set", state.key);
  els.auth.hidden = true;
  start();
});

// ------------------------------------------------------------------ the model and the live session

async function start() {
  setStatus("connecting…");
  try {
    state.model = await api("api/model");
  } catch (err) {
    if (err.status === 401) {
      askForKey();
      return;
    }
    setStatus(`cannot reach the server (${err.message}); retrying…`);
    setTimeout(start, retryDelay());
    return;
  }
  const m = state.model;
  els.model.textContent = `${m.name} · ${m.family} · ${m.native_size}px · ${m.dtype} on ${m.device}`;
  for (const input of [els.width, els.height]) {
    input.max = m.limits.max_side;
    if (input.value === "") input.value = m.native_size;
  }
  els.steps.max = m.limits.max_steps;
  connect();
}

function retryDelay() {
  return Math.min(500 * 2 ** state.retries++, 5000);
}

function connect() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (state.key) url.searchParams.set("api_key", state.key);
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.addEventListener("open", () => {
    state.retries = 0;
    setStatus("connected");
    if (state.lastFrame) send({ type: "frame", image: state.lastFrame });
    sendParams();
  });
  ws.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      showError("the server sent something that is not JSON");
      return;
    }
    if (message.type === "image") showImage(message);
    // Refused settings stay refused (the session goes on with the previous ones) until they are
    // changed; the other errors (a busy queue, a time-out, a frame that did not decode) pass.
    else if (message.type === "error") showError(message.message, !message.message.startsWith("bad params"));
  });
  ws.addEventListener("close", (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    const delay = retryDelay();
    setStatus(`disconnected${event.reason ? ` (${event.reason})` : ""}; reconnecting…`);
    setTimeout(start, delay); // start() asks /api/model first: it notices a wrong key or a new model
  });
}

function send(message) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(message));
  return true;
}

function number(input) {
  const text = input.value.trim();
  return text === "" ? null : Number(text);
}

function mode() {
  return els.controls.elements.mode.value;
}

function currentParams() {
  return {
    mode: mode(),
    prompt: els.prompt.value,
    steps: number(els.steps) ?? 1,
    seed: number(els.seed),
    width: number(els.width),
    height: number(els.height),
    strength: number(els.strength) ?? 0.5,
  };
}

function sendParams() {
  clearTimeout(state.paramsTimer);
  send({ type: "params", ...currentParams() });
}

function paramsChanged() {
  clearError();
  clearTimeout(state.paramsTimer);
  state.paramsTimer = setTimeout(sendParams, DEBOUNCE_MS);
}

function showImage(message) {
  const frame = message.params.mode === "img2img" ? state.lastFrame : null;
  state.shown = { params: message.params, seed: message.seed, image: message.image, frame };
  els.output.src = message.image;
  els.output.alt = message.params.prompt || "image for an empty prompt";
  els.output.dataset.id = message.id;
  els.output.dataset.params = JSON.stringify({ ...message.params, seed: message.seed });
  els.elapsed.textContent = `${message.elapsed_ms} ms · seed ${message.seed}`;
  els.download.disabled = false;
  if (state.errorUntilNextImage) clearError();
  const entry = state.shown;
  clearTimeout(state.settleTimer);
  state.settleTimer = setTimeout(() => remember(entry), HISTORY_SETTLE_MS);
}

// ------------------------------------------------------------------ controls

els.controls.addEventListener("submit", (event) => event.preventDefault());
els.controls.addEventListener("input", (event) => {
  if (event.target === els.upload || event.target.name === "mode") return; // handled below
  if ((event.target === els.width || event.target === els.height) && state.source && !state.stream) {
    sendFrame(); // an upload is redrawn at the new size
  }
  paramsChanged();
});

for (const radio of els.controls.elements.mode) {
  radio.addEventListener("change", () => setMode(radio.value));
}

function setMode(value) {
  els.controls.elements.mode.value = value;
  if (value === "txt2img") {
    stopWebcam();
  } else {
    // a pair that runs no step is refused: start from one that runs one
    const strength = number(els.strength) ?? 0.5;
    if (strength > 0 && Math.floor((number(els.steps) ?? 1) * strength) < 1) {
      els.steps.value = Math.ceil(1 / strength);
    }
  }
  showSourceHint();
  paramsChanged();
}

function showSourceHint() {
  els.sourceHint.hidden = mode() !== "img2img" || state.source !== null;
}

els.randomSeed.addEventListener("click", () => {
  els.seed.value = Math.floor(Math.random() * 2 ** 32);
  paramsChanged();
});

// ------------------------------------------------------------------ img2img sources

const canvas = document.createElement("canvas");

function frameSize() {
  const native = state.model ? state.model.native_size : 512;
  const side = (input) => {
    const value = number(input);
    return Number.isInteger(value) && value >= 8 && value <= 2048 ? value : native;
  };
  return [side(els.width), side(els.height)];
}

/** The source drawn at the chosen size, cropped to fill it, as a JPEG data URL. */
function drawFrame(source) {
  const [width, height] = frameSize();
  const sourceWidth = source.videoWidth || source.naturalWidth || source.width;
  const sourceHeight = source.videoHeight || source.naturalHeight || source.height;
  const scale = Math.max(width / sourceWidth, height / sourceHeight);
  const cropWidth = width / scale;
  const cropHeight = height / scale;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(
    source,
    (sourceWidth - cropWidth) / 2,
    (sourceHeight - cropHeight) / 2,
    cropWidth,
    cropHeight,
    0,
    0,
    width,
    height,
  );
  return canvas.toDataURL("image/jpeg", 0.9);
}

function sendFrame() {
  if (!state.source) return;
  state.lastFrame = drawFrame(state.source);
  if (!state.stream) {
    els.sourceImage.src = state.lastFrame;
    els.sourceImage.hidden = false;
  }
  send({ type: "frame", image: state.lastFrame });
}

els.upload.addEventListener("change", async () => {
  const file = els.upload.files[0];
  if (!file) return;
  clearError();
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showError(`cannot read ${file.name} as an image`);
    return;
  }
  stopWebcam();
  state.source = bitmap;
  sendFrame();
  setMode("img2img");
  sendParams();
});

async function startWebcam() {
  clearError();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("no camera access here: browsers allow it only on https:// or http://localhost pages");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    showError(`the webcam is not available: ${err.message || err.name}`);
    return;
  }
  state.stream = stream;
  els.camera.srcObject = stream;
  els.camera.hidden = false;
  els.sourceImage.hidden = true;
  try {
    await els.camera.play();
  } catch (err) {
    stopWebcam();
    showError(`the webcam does not play: ${err.message || err.name}`);
    return;
  }
  state.source = els.camera;
  els.webcam.textContent = "Stop webcam";
  els.webcam.setAttribute("aria-pressed", "true");
  setMode("img2img");
  sendParams();
  state.frameTimer = setInterval(() => {
    // the server keeps only the newest frame; skip one while the last is still being sent
    if (els.camera.readyState >= 2 && state.ws && state.ws.bufferedAmount === 0) sendFrame();
  }, 1000 / WEBCAM_FPS);
}

function stopWebcam() {
  if (!state.stream) return;
  clearInterval(state.frameTimer);
  for (const track of state.stream.getTracks()) track.stop();
  state.stream = null;
  els.camera.srcObject = null;
  els.camera.hidden = true;
  if (state.source === els.camera) state.source = null;
  els.webcam.textContent = "Start webcam";
  els.webcam.setAttribute("aria-pressed", "false");
  showSourceHint();
}

els.webcam.addEventListener("click", () => {
  if (state.stream) {
    stopWebcam();
    clearError();
  } else {
    startWebcam();
  }
});

// ------------------------------------------------------------------ history

function sameImage(a, b) {
  const key = (entry) => JSON.stringify({ ...entry.params, seed: entry.seed });
  return a.frame === b.frame && key(a) === key(b);
}

/** Adds an image to the strip, newest first, unless it is there already. */
function remember(entry) {
  if (state.history.some((old) => sameImage(old, entry))) return;
  state.history.unshift(entry);
  state.history.length = Math.min(state.history.length, HISTORY_MAX);
  renderHistory();
}

function renderHistory() {
  els.history.replaceChildren(
    ...state.history.map((entry) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      const label = `${entry.params.prompt || "(empty prompt)"} · seed ${entry.seed} · ${entry.params.mode}`;
      button.title = label;
      button.setAttribute("aria-label", `restore: ${label}`);
      const thumb = document.createElement("img");
      thumb.src = entry.image;
      thumb.alt = "";
      button.append(thumb);
      button.addEventListener("click", () => restore(entry));
      item.append(button);
      return item;
    }),
  );
}

async function restore(entry) {
  const p = entry.params;
  els.prompt.value = p.prompt;
  els.steps.value = p.steps;
  els.seed.value = entry.seed;
  els.width.value = p.width ?? "";
  els.height.value = p.height ?? "";
  els.strength.value = p.strength;
  els.controls.elements.mode.value = p.mode;
  clearError();
  state.shown = entry;
  els.output.src = entry.image;
  els.output.alt = p.prompt || "image for an empty prompt";
  els.output.dataset.params = JSON.stringify({ ...p, seed: entry.seed });
  if (p.mode === "img2img" && entry.frame) {
    stopWebcam();
    const image = new Image();
    image.src = entry.frame;
    try {
      await image.decode();
      state.source = image;
    } catch {
      // the frame is sent as it was all the same
    }
    state.lastFrame = entry.frame;
    els.sourceImage.src = entry.frame;
    els.sourceImage.hidden = false;
    send({ type: "frame", image: entry.frame });
  } else if (p.mode === "txt2img") {
    stopWebcam();
  }
  showSourceHint();
  sendParams();
}

// ------------------------------------------------------------------ download

function slug(text) {
  return (
    text
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-+|-+$/g, "")
      .slice(0, 48) || "image"
  );
}

els.download.addEventListener("click", async () => {
  // The shown image's settings and seed, so that the PNG is the image on the screen.
  const shown = state.shown || { params: currentParams(), seed: number(els.seed), frame: state.lastFrame };
  const { mode: shownMode, strength, ...fields } = shown.params;
  const body = { ...fields, seed: shown.seed };
  let path = "api/txt2img";
  if (shownMode === "img2img") {
    if (!shown.frame) {
      showError("image to image needs a picture: upload one or start the webcam");
      return;
    }
    path = "api/img2img";
    Object.assign(body, { image: shown.frame, strength });
  }
  els.download.disabled = true;
  els.download.setAttribute("aria-busy", "true");
  try {
    const data = await api(path, body);
    const bytes = Uint8Array.from(atob(data.images[0]), (c) => c.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    const link = document.createElement("a");
    link.href = url;
    link.download = `turbokit-${data.seeds[0]}-${slug(body.prompt || "")}.png`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    showError(`download failed: ${err.message}`);
  } finally {
    els.download.disabled = false;
    els.download.removeAttribute("aria-busy");
  }
});

// ------------------------------------------------------------------ start

els.seed.value = Math.floor(Math.random() * 2 ** 32); // fixed from here on: the prompt makes the changes
state.key = readKey();
start();

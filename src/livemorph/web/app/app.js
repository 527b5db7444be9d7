// The demo: the camera restyled live, with everything the SDK offers on one page.
import { createClient } from "/sdk/livemorph.js";
import { demoToken, showError, showState } from "/app/shared.js";

const EXAMPLES = [
  "anime",
  "Studio Ghibli animation style",
  "cyberpunk neon city",
  "watercolor painting",
  "pencil sketch",
  "oil painting, thick brush strokes",
  "pop art comic",
  "stained glass",
];

const $ = (id) => document.getElementById(id);
const ui = {
  camera: $("camera"),
  output: $("output"),
  outputSize: $("output-size"),
  model: $("model"),
  start: $("start"),
  share: $("share"),
  shareLink: $("share-link"),
  form: $("prompt-form"),
  prompt: $("prompt"),
  enhance: $("enhance"),
  examples: $("examples"),
  enhanced: $("enhanced"),
  image: $("image"),
  preview: $("image-preview"),
  clearImage: $("clear-image"),
  usage: $("usage"),
};

let catalog = new Map(); // name -> the server's entry, which the SDK takes as a model
let camera = null;
let session = null;
let image = null; // the reference image File, kept for restarts
let run = 0; // bumps on every start and stop, so a slow start cannot outlive a stop

function model() {
  return catalog.get(ui.model.value);
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`cannot list models: HTTP ${response.status}`);
  const usable = (await response.json()).filter((m) => m.available && m.name !== "live_avatar");
  catalog = new Map(usable.map((m) => [m.name, m]));
  ui.model.replaceChildren(
    ...usable.map((m) => new Option(`${m.name} · ${m.width}×${m.height} @ ${m.fps} fps`, m.name)),
  );
  const wanted = new URLSearchParams(location.search).get("model");
  ui.model.value = [wanted, "mirage"].find((name) => catalog.has(name)) ?? usable[0]?.name ?? "";
  if (!catalog.size) throw new Error("this server serves no camera model");
}

/** The camera, asked for the model's own size and frame rate (ideal values, as the seeds do). */
async function openCamera(spec) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("This browser cannot open a camera here (it needs https or localhost).");
  }
  return navigator.mediaDevices.getUserMedia({
    audio: false,
    video: { frameRate: spec.fps, width: spec.width, height: spec.height },
  });
}

function stopCamera() {
  if (camera) for (const track of camera.getTracks()) track.stop();
  camera = null;
  ui.camera.srcObject = null;
}

function setRunning(running) {
  ui.start.textContent = running ? "Stop" : "Start";
  ui.share.disabled = !running;
  if (!running) {
    ui.shareLink.parentElement.hidden = true;
    ui.output.srcObject = null;
    ui.outputSize.textContent = "";
  }
}

async function start() {
  stop();
  const current = run;
  showError(null);
  const spec = model();
  if (!spec) return;
  setRunning(true);
  showState("connecting");
  ui.usage.textContent = "0";
  try {
    const stream = await openCamera(spec);
    if (current !== run) {
      for (const track of stream.getTracks()) track.stop(); // stopped while it opened
      return;
    }
    camera = stream;
    ui.camera.srcObject = camera;
    const client = createClient({ apiKey: await demoToken() });
    const prompt = ui.prompt.value.trim();
    const rt = await client.realtime.connect(camera, {
      model: spec,
      onRemoteStream: (stream) => {
        ui.output.srcObject = stream;
      },
      initialState: {
        prompt: prompt ? { text: prompt, enhance: ui.enhance.checked } : undefined,
        image: image ?? undefined,
      },
    });
    if (current !== run) {
      rt.disconnect();
      return;
    }
    session = rt;
    rt.on("connectionChange", (state) => {
      showState(state);
      if (state === "disconnected" && session === rt) {
        session = null;
        stopCamera();
        setRunning(false);
      }
    });
    rt.on("generationTick", ({ seconds }) => {
      ui.usage.textContent = String(seconds);
    });
    rt.on("error", showError);
    showState(rt.getConnectionState());
    showEnhanced(rt);
  } catch (error) {
    if (current !== run) return;
    stop();
    showError(error);
  }
}

function stop() {
  run += 1;
  const rt = session;
  session = null;
  if (rt) rt.disconnect();
  stopCamera();
  setRunning(false);
  showState("disconnected");
}

function showEnhanced(rt) {
  ui.enhanced.textContent = rt.enhancedPrompt ? `The engine renders: ${rt.enhancedPrompt}` : "";
}

async function applyPrompt(text) {
  const prompt = text.trim();
  if (!prompt) return;
  ui.prompt.value = prompt;
  if (!session) return; // used when the session starts
  showError(null);
  try {
    await session.setPrompt(prompt, { enhance: ui.enhance.checked });
    showEnhanced(session);
  } catch (error) {
    showError(error);
  }
}

async function applyImage(file) {
  showError(null);
  try {
    if (session) await session.setImage(file);
    image = file;
    if (session) showEnhanced(session);
  } catch (error) {
    showError(error);
    return;
  }
  ui.clearImage.disabled = !image;
  if (ui.preview.src) URL.revokeObjectURL(ui.preview.src);
  ui.preview.hidden = !image;
  ui.preview.src = image ? URL.createObjectURL(image) : "";
}

function share() {
  const token = session?.subscribeToken;
  if (!token) {
    showError(new Error("Nothing to share yet: the session is still starting."));
    return;
  }
  const url = new URL(`/watch?token=${encodeURIComponent(token)}`, location.href).href;
  ui.shareLink.href = url;
  ui.shareLink.textContent = url;
  ui.shareLink.parentElement.hidden = false;
  window.open(url, "_blank", "noopener");
}

function wire() {
  for (const text of EXAMPLES) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.textContent = text;
    chip.addEventListener("click", () => applyPrompt(text));
    ui.examples.append(chip);
  }
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    applyPrompt(ui.prompt.value);
  });
  ui.start.addEventListener("click", () => (session || camera ? stop() : start()));
  ui.model.addEventListener("change", () => start());
  ui.share.addEventListener("click", share);
  ui.image.addEventListener("change", () => {
    const [file] = ui.image.files;
    ui.image.value = "";
    if (file) applyImage(file);
  });
  ui.clearImage.addEventListener("click", () => applyImage(null));
  ui.output.addEventListener("resize", () => {
    ui.outputSize.textContent = `${ui.output.videoWidth}×${ui.output.videoHeight}`;
  });
  window.addEventListener("pagehide", () => stop());
}

// For tests and the curious: the live session, as the SDK returns it.
window.livemorphDemo = {
  get session() {
    return session;
  },
};

wire();
loadModels().then(start).catch(showError);

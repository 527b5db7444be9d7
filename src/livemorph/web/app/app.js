// The demo: the camera restyled live, with everything the SDK offers on one page; with
// live_avatar, a portrait that speaks a microphone's voice or an audio file's.
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
/** Behaviour prompts for live_avatar. */
const BEHAVIOURS = [
  "Smile warmly and nod occasionally",
  "Look excited",
  "Calm and attentive",
  "Serious news anchor",
];
const AVATAR = "live_avatar";

const $ = (id) => document.getElementById(id);
const ui = {
  camera: $("camera"),
  output: $("output"),
  outputSize: $("output-size"),
  model: $("model"),
  start: $("start"),
  share: $("share"),
  shareLink: $("share-link"),
  record: $("record"),
  recordingLink: $("recording-link"),
  form: $("prompt-form"),
  prompt: $("prompt"),
  enhance: $("enhance"),
  examples: $("examples"),
  enhanced: $("enhanced"),
  image: $("image"),
  preview: $("image-preview"),
  clearImage: $("clear-image"),
  imageRow: $("image-row"),
  usage: $("usage"),
  inputCaption: $("input-caption"),
  outputCaption: $("output-caption"),
  portraitView: $("portrait-view"),
  avatar: $("avatar-controls"),
  portraits: [...document.querySelectorAll("button.portrait")],
  portraitFile: $("portrait-file"),
  speak: $("speak"),
  audioFile: $("audio-file"),
  audioState: $("audio-state"),
  unmute: $("unmute"),
};

let catalog = new Map(); // name -> the server's entry, which the SDK takes as a model
let camera = null; // the local stream: the camera, or in avatar mode the microphone
let session = null;
let image = null; // the reference image File, kept for restarts
let run = 0; // bumps on every start and stop, so a slow start cannot outlive a stop
let mode = null; // "restyle" or "avatar": what the page shows
const prompts = { restyle: null, avatar: BEHAVIOURS[0] }; // each mode's prompt, kept apart
/** A bundled portrait's absolute URL (setImage takes http(s) URLs, not paths). */
const bundled = (button) => new URL(button.dataset.portrait, location.href).href;
let portrait = bundled(ui.portraits[0]); // a bundled portrait's URL, or a File
let portraitUrl = null; // the object URL that shows an uploaded portrait
let speaking = false; // avatar mode: the microphone (true) or audio files (false)
let recorder = null; // the browser's MediaRecorder on the output, while Record runs
let recording = null; // the last recording, a Blob, and the bytes recorded so far
let recorded = 0;

function model() {
  return catalog.get(ui.model.value);
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`cannot list models: HTTP ${response.status}`);
  const usable = (await response.json()).filter((m) => m.available);
  catalog = new Map(usable.map((m) => [m.name, m]));
  const label = (m) =>
    m.name === AVATAR
      ? `${m.name} · portrait + voice`
      : `${m.name} · ${m.width}×${m.height} @ ${m.fps} fps`;
  ui.model.replaceChildren(...usable.map((m) => new Option(label(m), m.name)));
  const wanted = new URLSearchParams(location.search).get("model");
  ui.model.value = [wanted, "mirage"].find((name) => catalog.has(name)) ?? usable[0]?.name ?? "";
  if (!catalog.size) throw new Error("this server serves no model");
}

/** Show the controls of the chosen model's mode; each mode keeps its own prompt. */
function showMode(spec) {
  const next = spec?.name === AVATAR ? "avatar" : "restyle";
  if (next === mode) return;
  if (mode) prompts[mode] = ui.prompt.value;
  mode = next;
  const avatar = mode === "avatar";
  ui.prompt.value = prompts[mode] ?? ui.prompt.value;
  ui.prompt.placeholder = avatar
    ? "How the avatar behaves: smile warmly, nod, look excited..."
    : "Describe a look: anime, watercolor, neon city...";
  ui.examples.replaceChildren(...(avatar ? BEHAVIOURS : EXAMPLES).map(exampleChip));
  ui.camera.hidden = avatar;
  ui.portraitView.hidden = !avatar;
  ui.inputCaption.textContent = avatar ? "Portrait" : "Camera";
  ui.outputCaption.textContent = avatar ? "Avatar" : "Transformed";
  ui.avatar.hidden = !avatar;
  ui.imageRow.hidden = avatar;
  ui.output.muted = !avatar; // the avatar's voice plays with its video
  ui.unmute.hidden = true;
  if (avatar) showPortrait();
}

function exampleChip(text) {
  const chip = document.createElement("button");
  chip.type = "button";
  chip.textContent = text;
  chip.addEventListener("click", () => applyPrompt(text));
  return chip;
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
  ui.audioState.textContent = "";
}

/** Play the output with its sound; where the browser wants a click first, play it muted. */
function playWithSound() {
  if (mode !== "avatar") return;
  ui.output.muted = false;
  ui.output.play().then(
    () => {
      ui.unmute.hidden = true;
    },
    () => {
      ui.output.muted = true;
      ui.output.play().catch(() => {});
      ui.unmute.hidden = false;
    },
  );
}

function setRunning(running) {
  ui.start.textContent = running ? "Stop" : "Start";
  ui.share.disabled = !running;
  ui.record.disabled = !running;
  if (!running) {
    stopRecording();
    ui.shareLink.parentElement.hidden = true;
    ui.output.srcObject = null;
    ui.outputSize.textContent = "";
  }
}

/** The local stream a model takes: the camera, the microphone, or none (audio files). */
async function openInput(spec) {
  if (spec.name !== AVATAR) return openCamera(spec);
  if (!speaking) return null;
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("This browser cannot open a microphone here (it needs https or localhost).");
  }
  return navigator.mediaDevices.getUserMedia({ audio: true, video: false });
}

async function start() {
  stop();
  const current = run;
  showError(null);
  const spec = model();
  if (!spec) return;
  showMode(spec);
  setRunning(true);
  showState("connecting");
  ui.usage.textContent = "0";
  try {
    const stream = await openInput(spec);
    if (current !== run) {
      if (stream) for (const track of stream.getTracks()) track.stop(); // stopped while it opened
      return;
    }
    camera = stream;
    if (mode === "restyle") ui.camera.srcObject = camera;
    const client = createClient({ apiKey: await demoToken() });
    const prompt = ui.prompt.value.trim();
    const initialPrompt = prompt ? { text: prompt, enhance: ui.enhance.checked } : undefined;
    const options =
      mode === "avatar"
        ? { avatar: { avatarImage: portrait }, initialState: { prompt: initialPrompt } }
        : { initialState: { prompt: initialPrompt, image: image ?? undefined } };
    const rt = await client.realtime.connect(camera, {
      model: spec,
      onRemoteStream: (stream) => {
        ui.output.srcObject = stream;
        playWithSound();
      },
      ...options,
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

/** Show the chosen portrait beside the avatar, and mark its button. */
function showPortrait() {
  if (portraitUrl) URL.revokeObjectURL(portraitUrl);
  portraitUrl = typeof portrait === "string" ? null : URL.createObjectURL(portrait);
  ui.portraitView.src = portraitUrl ?? portrait;
  for (const button of ui.portraits) {
    button.setAttribute("aria-pressed", String(bundled(button) === portrait));
  }
}

/** A new portrait: a running avatar takes it at once, as the next frame's face. */
async function choosePortrait(choice) {
  showError(null);
  try {
    if (session && mode === "avatar") await session.setImage(choice);
  } catch (error) {
    showError(error);
    return;
  }
  portrait = choice;
  showPortrait();
}

/** Speak (the microphone) or play files: the session restarts with the other input. */
async function setSpeaking(on) {
  speaking = on;
  ui.speak.textContent = on ? "Stop speaking" : "Speak";
  ui.speak.setAttribute("aria-pressed", String(on));
  await start();
  if (on && session) ui.audioState.textContent = "listening to your microphone";
}

async function playFile(file) {
  showError(null);
  try {
    if (speaking || !session) await setSpeaking(false); // files play into a session without a mic
    if (!session?.playAudio) return;
    ui.audioState.textContent = `playing ${file.name}`;
    const rt = session;
    await rt.playAudio(file);
    if (session === rt && ui.audioState.textContent === `playing ${file.name}`) {
      ui.audioState.textContent = "";
    }
  } catch (error) {
    ui.audioState.textContent = "";
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

/** The output's MIME type the browser records best: WebM (VP8/VP9), else what it offers. */
function recordingType() {
  const wanted = ["video/webm;codecs=vp8,opus", "video/webm", "video/mp4"];
  return wanted.find((type) => MediaRecorder.isTypeSupported(type)) ?? "";
}

/** Record the output as it plays, with the browser's MediaRecorder; a second click (or
 * Stop, or a reconnect, which ends the recorded tracks) saves it behind a download link. */
function startRecording() {
  const stream = ui.output.srcObject;
  if (!stream || typeof MediaRecorder === "undefined") {
    showError(new Error("Nothing to record yet, or this browser cannot record."));
    return;
  }
  const chunks = [];
  recorded = 0;
  recorder = new MediaRecorder(stream, { mimeType: recordingType() });
  recorder.addEventListener("dataavailable", (event) => {
    if (!event.data.size) return;
    chunks.push(event.data);
    recorded += event.data.size;
    ui.record.textContent = "Stop recording";
    ui.record.title = `${Math.round(recorded / 1024)} KB so far`;
  });
  recorder.addEventListener("stop", () => {
    recorder = null;
    ui.record.textContent = "Record";
    ui.record.title = "";
    if (!recorded) return;
    recording = new Blob(chunks, { type: chunks[0].type || "video/webm" });
    const extension = recording.type.includes("mp4") ? "mp4" : "webm";
    if (ui.recordingLink.href) URL.revokeObjectURL(ui.recordingLink.href);
    ui.recordingLink.href = URL.createObjectURL(recording);
    ui.recordingLink.download = `livemorph-${new Date().toISOString().replace(/[:.]/g, "-")}.${extension}`;
    ui.recordingLink.textContent = `Save the recording (${Math.round(recording.size / 1024)} KB)`;
    ui.recordingLink.hidden = false;
    ui.recordingLink.parentElement.hidden = false;
  });
  recorder.start(1000); // hands over data every second, so a long take is not held twice
  ui.record.textContent = "Stop recording";
}

function stopRecording() {
  if (recorder && recorder.state !== "inactive") recorder.stop();
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
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    applyPrompt(ui.prompt.value);
  });
  ui.start.addEventListener("click", () => (session || camera ? stop() : start()));
  ui.model.addEventListener("change", () => start());
  ui.share.addEventListener("click", share);
  ui.record.addEventListener("click", () => (recorder ? stopRecording() : startRecording()));
  ui.image.addEventListener("change", () => {
    const [file] = ui.image.files;
    ui.image.value = "";
    if (file) applyImage(file);
  });
  ui.clearImage.addEventListener("click", () => applyImage(null));
  for (const button of ui.portraits) {
    button.addEventListener("click", () => choosePortrait(bundled(button)));
  }
  ui.portraitFile.addEventListener("change", () => {
    const [file] = ui.portraitFile.files;
    ui.portraitFile.value = "";
    if (file) choosePortrait(file);
  });
  ui.speak.addEventListener("click", () => setSpeaking(!speaking));
  ui.audioFile.addEventListener("change", () => {
    const [file] = ui.audioFile.files;
    ui.audioFile.value = "";
    if (file) playFile(file);
  });
  ui.unmute.addEventListener("click", () => {
    ui.output.muted = false;
    ui.output.play().catch(() => {});
    ui.unmute.hidden = true;
  });
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
  get recording() {
    return recording;
  },
  get recorded() {
    return recorded;
  },
};

wire();
showMode(null);
loadModels().then(start).catch(showError);

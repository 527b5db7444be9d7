/**
 * livemorph's browser SDK: a dependency-free ES module, served by every livemorph server at
 * /sdk/livemorph.js (types beside it at /sdk/livemorph.d.ts).
 *
 * It speaks the wire protocol of docs/protocol.md and offers the API of the published
 * `@decartai/sdk@0.0.46` (createDecartClient, models.realtime, realtime.connect/subscribe,
 * tokens.create), so apps written for it run unchanged but for the import line:
 *
 *   import { createDecartClient, models } from "http://HOST:8000/sdk/livemorph.js";
 *
 * The behaviour mirrors livemorph's Python SDK (src/livemorph/sdk/): one `Signaling` per
 * connection attempt, so acks and events of a dead attempt never leak into the next; retries
 * with backoff that stop on the protocol's permanent errors; and after a drop the last
 * acknowledged prompt and image are restored before the first frame of the new session.
 *
 * live_avatar works as in the published SDK: `connect(null, {model, avatar: {avatarImage}})`
 * sends the portrait (then the prompt) before the offer, a recvonly video transceiver and an
 * audio track of silence, and gives the session `playAudio(clip)`, which plays a clip into
 * that track (never on the speakers); `connect(micStream, ...)` sends the microphone instead.
 */

export const VERSION = "0.1.0";

/** Error codes carried by every error the SDK throws or emits (`error.code`). */
export const ERROR_CODES = Object.freeze({
  INVALID_API_KEY: "INVALID_API_KEY",
  INVALID_BASE_URL: "INVALID_BASE_URL",
  WEB_RTC_ERROR: "WEB_RTC_ERROR",
  MODEL_NOT_FOUND: "MODEL_NOT_FOUND",
  INVALID_INPUT: "INVALID_INPUT",
  INVALID_OPTIONS: "INVALID_OPTIONS",
  TOKEN_CREATE_ERROR: "TOKEN_CREATE_ERROR",
  SERVER_ERROR: "SERVER_ERROR",
  TIMEOUT: "TIMEOUT",
});

/** Error texts after which no client may retry (docs/protocol.md, "Error texts"). */
export const PERMANENT_ERRORS = Object.freeze([
  "permission denied",
  "not allowed",
  "invalid session",
  "401",
  "invalid api key",
  "unauthorized",
]);

/** `generation_ended` reasons after which a reconnect cannot help. */
export const FINAL_END_REASONS = Object.freeze(["insufficient_credits", "max_duration"]);

/** Largest decoded reference image the server accepts; larger ones are refused here. */
export const MAX_IMAGE_BYTES = 10 * 1024 * 1024;

/** How long the published SDK waits for a `prompt_ack`. */
export const PROMPT_TIMEOUT_MS = 15_000;
/** How long the published SDK waits for a `set_image_ack`. */
export const IMAGE_TIMEOUT_MS = 30_000;
const CONNECT_TIMEOUT_MS = 30_000;
const OPEN_TIMEOUT_MS = 10_000;
const USER_AGENT = `livemorph-js/${VERSION} lang/js runtime/browser`;
const EVENTS = ["connectionChange", "generationTick", "generationEnded", "error"];

/** Any failure the SDK reports; `code` is one of ERROR_CODES. */
export class LivemorphError extends Error {
  constructor(code, message, data, cause) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "LivemorphError";
    this.code = code;
    if (data !== undefined) this.data = data;
  }

  /** True when retrying cannot help (bad key, unknown model, not allowed, ...). */
  get permanent() {
    return (
      this.code === ERROR_CODES.INVALID_API_KEY ||
      this.code === ERROR_CODES.MODEL_NOT_FOUND ||
      isPermanentError(this.message)
    );
  }
}

/** The published SDK's name for the same thing, so `instanceof DecartSDKError` works. */
export { LivemorphError as DecartSDKError };

/** True when an error text forbids a retry. */
export function isPermanentError(text) {
  const lowered = String(text).toLowerCase();
  return PERMANENT_ERRORS.some((marker) => lowered.includes(marker));
}

/** Classify the text of a server `error` message into a coded error. */
export function errorFromServerText(text) {
  const lowered = String(text).toLowerCase();
  if (
    lowered.includes("invalid api key") ||
    lowered.includes("unauthorized") ||
    lowered.includes("401")
  ) {
    return new LivemorphError(ERROR_CODES.INVALID_API_KEY, text);
  }
  if (lowered.includes("model not found") || lowered.includes("model not available")) {
    return new LivemorphError(ERROR_CODES.MODEL_NOT_FOUND, text);
  }
  return new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, text);
}

function invalidInput(message) {
  return new LivemorphError(ERROR_CODES.INVALID_INPUT, message);
}

function asLivemorphError(error) {
  if (error instanceof LivemorphError) return error;
  const message = error && error.message ? error.message : String(error);
  return new LivemorphError(
    ERROR_CODES.WEB_RTC_ERROR,
    `connection failed: ${message}`,
    undefined,
    error,
  );
}

/** False for errors another attempt cannot fix: permanent ones and refused input. */
export function shouldRetry(error) {
  return !error.permanent && error.code !== ERROR_CODES.INVALID_INPUT;
}

// -- models -----------------------------------------------------------------------------------

const CATALOG = {
  mirage: { fps: 25, width: 1280, height: 704 },
  mirage_v2: { fps: 22, width: 1280, height: 704 },
  lucy_v2v_720p_rt: { fps: 25, width: 1280, height: 704 },
  lucy_2_rt: { fps: 20, width: 1280, height: 720 },
  live_avatar: { fps: 25, width: 1280, height: 720 },
  // The current published clients' names (livemorph/models.py says where they come from).
  "lucy-2.1": { fps: 30, width: 1280, height: 720 },
  "lucy-2.5": { fps: 30, width: 1280, height: 720 },
  "lucy-2.6": { fps: 30, width: 1280, height: 720 },
  "lucy-restyle-2": { fps: 30, width: 1280, height: 704 },
  "lucy-vton-2": { fps: 30, width: 1088, height: 624 },
  "lucy-vton-3": { fps: 30, width: 1088, height: 624 },
  "lucy-vton-3.5": { fps: 30, width: 1280, height: 720 },
  "lucy-vton-3.6": { fps: 30, width: 1280, height: 720 },
  // Aliases: served as the model named in `aliasOf`, at its size and rate.
  "lucy-latest": { fps: 30, width: 1280, height: 720, aliasOf: "lucy-2.5" },
  "lucy-restyle-latest": { fps: 30, width: 1280, height: 704, aliasOf: "lucy-restyle-2" },
  "lucy-vton-latest": { fps: 30, width: 1280, height: 720, aliasOf: "lucy-vton-3.6" },
  "lucy-2.1-vton-2": { fps: 30, width: 1088, height: 624, aliasOf: "lucy-vton-2" },
};

/** `models.realtime("mirage_v2")`: a model's name, WebSocket path, fps, width and height. */
function realtime(name) {
  const spec = Object.prototype.hasOwnProperty.call(CATALOG, name) ? CATALOG[name] : null;
  if (!spec) throw new LivemorphError(ERROR_CODES.MODEL_NOT_FOUND, `Model ${name} not found`);
  return Object.freeze({ name, urlPath: "/v1/stream", ...spec });
}
realtime.mirage = () => realtime("mirage");
realtime.mirageV2 = () => realtime("mirage_v2");
realtime.lucyV2V720pRt = () => realtime("lucy_v2v_720p_rt");
realtime.lucy2Rt = () => realtime("lucy_2_rt");
realtime.liveAvatar = () => realtime("live_avatar");

export const models = Object.freeze({ realtime });

function resolveModel(model) {
  if (typeof model === "string") return realtime(model);
  if (!model || typeof model.name !== "string" || !model.name) {
    throw new LivemorphError(
      ERROR_CODES.INVALID_OPTIONS,
      "options.model must come from models.realtime()",
    );
  }
  return { urlPath: "/v1/stream", ...model };
}

// -- retries ----------------------------------------------------------------------------------

/** The published clients' policy: 5 attempts, 1, 2, 4, 8 s apart (doubling, capped). */
export const DEFAULT_RETRY = Object.freeze({ attempts: 5, baseDelay: 1000, maxDelay: 10_000 });

/** The waits (ms) between consecutive attempts: one fewer than `attempts`. */
export function retryDelays(policy = DEFAULT_RETRY) {
  const { attempts, baseDelay, maxDelay } = { ...DEFAULT_RETRY, ...policy };
  const delays = [];
  for (let i = 0; i < attempts - 1; i += 1) delays.push(Math.min(maxDelay, baseDelay * 2 ** i));
  return delays;
}

// -- small helpers ----------------------------------------------------------------------------

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const handle = { promise, done: false };
  handle.resolve = (value) => {
    if (!handle.done) {
      handle.done = true;
      resolve(value);
    }
  };
  handle.reject = (error) => {
    if (!handle.done) {
      handle.done = true;
      reject(error);
    }
  };
  promise.catch(() => {}); // a waiter that gave up must not raise "unhandled rejection"
  return handle;
}

function withTimeout(waiter, ms, what, onTimeout) {
  const timer = setTimeout(() => {
    if (onTimeout) onTimeout();
    waiter.reject(new LivemorphError(ERROR_CODES.TIMEOUT, `${what} timed out after ${ms / 1000}s`));
  }, ms);
  return waiter.promise.finally(() => clearTimeout(timer));
}

function checkPrompt(text) {
  if (typeof text !== "string" || !text.trim())
    throw invalidInput("prompt must be a non-empty string");
}

function defaultBaseUrl() {
  try {
    const here = new URL(import.meta.url);
    if (here.protocol === "http:" || here.protocol === "https:") return here.origin;
  } catch {
    // not loaded from a URL: fall through
  }
  return "http://127.0.0.1:8000";
}

function validateBaseUrl(url) {
  let parsed = null;
  try {
    parsed = new URL(url);
  } catch {
    parsed = null;
  }
  if (!parsed || (parsed.protocol !== "http:" && parsed.protocol !== "https:")) {
    throw new LivemorphError(ERROR_CODES.INVALID_BASE_URL, `Invalid base URL: ${url}`);
  }
  return parsed.href.replace(/\/+$/, "");
}

// -- images -----------------------------------------------------------------------------------

function tooLarge(size) {
  return invalidInput(`image is ${size} bytes; the limit is ${MAX_IMAGE_BYTES} bytes (10 MB)`);
}

function checkImageSize(size) {
  if (size > MAX_IMAGE_BYTES) throw tooLarge(size);
  if (size === 0) throw invalidInput("image is empty");
}

function bytesToBase64(bytes) {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

async function blobToBase64(blob) {
  checkImageSize(blob.size);
  return bytesToBase64(new Uint8Array(await blob.arrayBuffer()));
}

/** Bytes a base64 string decodes to, without decoding it. */
function decodedSize(b64) {
  const padding = b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0;
  return Math.floor((b64.length * 3) / 4) - padding;
}

function plainBase64(text) {
  const b64 = text.replace(/\s+/g, "");
  const size = decodedSize(b64);
  if (size > MAX_IMAGE_BYTES) throw tooLarge(size);
  if (!b64) throw invalidInput("image is empty");
  if (b64.length % 4 === 1 || !/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) {
    throw invalidInput("image string is neither a data: URL, an http(s) URL, nor base64");
  }
  return b64;
}

/**
 * Plain base64 (no `data:` prefix) of a reference image, refusing anything over 10 MB before
 * a byte is sent. Takes a Blob or File, an ArrayBuffer or typed array, a `data:` URL, an
 * http(s) URL (fetched), or a base64 string.
 */
export async function imageToBase64(image) {
  if (typeof Blob !== "undefined" && image instanceof Blob) return blobToBase64(image);
  if (image instanceof ArrayBuffer) return imageToBase64(new Uint8Array(image));
  if (ArrayBuffer.isView(image)) {
    const bytes = new Uint8Array(image.buffer, image.byteOffset, image.byteLength);
    checkImageSize(bytes.length);
    return bytesToBase64(bytes);
  }
  if (typeof image === "string") {
    if (image.startsWith("data:")) {
      const comma = image.indexOf(",");
      if (comma < 0 || !image.slice(0, comma).includes(";base64")) {
        throw invalidInput("data: URL images must be base64-encoded");
      }
      return plainBase64(image.slice(comma + 1));
    }
    if (/^https?:\/\//i.test(image)) {
      let response;
      try {
        response = await fetch(image);
      } catch (error) {
        throw new LivemorphError(
          ERROR_CODES.INVALID_INPUT,
          `cannot fetch image: ${error.message}`,
          undefined,
          error,
        );
      }
      if (!response.ok) throw invalidInput(`cannot fetch image: HTTP ${response.status}`);
      const length = Number(response.headers.get("content-length"));
      if (length > MAX_IMAGE_BYTES) throw tooLarge(length);
      return blobToBase64(await response.blob());
    }
    return plainBase64(image);
  }
  throw invalidInput("image must be a Blob, a File, an ArrayBuffer, a URL or a base64 string");
}

// -- subscribe tokens -------------------------------------------------------------------------

/** Encode for both generations of the published SDKs: base64 of `{"sid", "ip", "port"}`
 * (the direct-WebRTC ones) and `room_name` (the current ones): the room is the session. */
export function encodeSubscribeToken(sessionId, ip, port) {
  return btoa(JSON.stringify({ sid: sessionId, ip, port, room_name: sessionId }));
}

/** Decode a subscribe token (standard or URL-safe base64, as the Python SDK writes them). */
export function decodeSubscribeToken(token) {
  try {
    let text = String(token).trim().replace(/-/g, "+").replace(/_/g, "/");
    text += "=".repeat((4 - (text.length % 4)) % 4);
    const payload = JSON.parse(atob(text));
    if (!payload.sid && typeof payload.room_name === "string" && payload.room_name)
      return { sid: payload.room_name, ip: "", port: 0 }; // the current clients' form
    const port = Number(payload.port);
    if (!payload.sid || !payload.ip || !Number.isInteger(port) || port <= 0)
      throw new Error("fields");
    return { sid: String(payload.sid), ip: String(payload.ip), port };
  } catch {
    throw invalidInput("Invalid subscribe token");
  }
}

// -- one connection attempt -------------------------------------------------------------------

function preferCodec(pc, mimeType) {
  if (typeof RTCRtpSender === "undefined" || typeof RTCRtpSender.getCapabilities !== "function")
    return;
  const capabilities = RTCRtpSender.getCapabilities("video");
  if (!capabilities) return;
  const wanted = mimeType.toLowerCase();
  const codecs = [
    ...capabilities.codecs.filter((c) => c.mimeType.toLowerCase() === wanted),
    ...capabilities.codecs.filter((c) => c.mimeType.toLowerCase() !== wanted),
  ];
  for (const transceiver of pc.getTransceivers()) {
    const kind = transceiver.sender.track?.kind ?? transceiver.receiver.track?.kind;
    if (kind !== "video" || typeof transceiver.setCodecPreferences !== "function") continue;
    try {
      transceiver.setCodecPreferences(codecs);
    } catch {
      // not supported here: the default order will do
    }
  }
}

/** Add the published SDK's VP8 bitrate hints (kbps) to an offer's SDP. */
export function addVp8Bitrate(sdp, minKbps = 300, startKbps = 600) {
  const params = `x-google-min-bitrate=${minKbps};x-google-start-bitrate=${startKbps}`;
  const lines = sdp.split("\r\n");
  const types = new Set();
  for (const line of lines) {
    const match = line.match(/^a=rtpmap:(\d+) VP8\/90000/);
    if (match) types.add(match[1]);
  }
  const out = [];
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    const fmtp = line.match(/^a=fmtp:(\d+) /);
    if (fmtp && types.has(fmtp[1])) {
      out.push(line.includes("x-google-min-bitrate") ? line : `${line};${params}`);
      types.delete(fmtp[1]);
      continue;
    }
    out.push(line);
    const rtpmap = line.match(/^a=rtpmap:(\d+) VP8\/90000/);
    if (rtpmap && !lines.some((l) => l.startsWith(`a=fmtp:${rtpmap[1]} `))) {
      out.push(`a=fmtp:${rtpmap[1]} ${params}`);
      types.delete(rtpmap[1]);
    }
  }
  return out.join("\r\n");
}

/**
 * One WebSocket plus one RTCPeerConnection. Never retries and never comes back to life once
 * ended: a reconnect makes a new one. Reports through `onEvent(kind, payload)` with kinds
 * "state", "error", "session_id", "generation_tick", "generation_ended" and "track".
 */
class Signaling {
  constructor(
    url,
    {
      onEvent,
      iceServers = [],
      handedIceServers = [],
      customizeOffer = null,
      openTimeout = OPEN_TIMEOUT_MS,
    },
  ) {
    this.url = url;
    this.state = "connecting";
    this.pc = null;
    this.ws = null;
    this.session = null;
    this.enhancedPrompt = null;
    this.error = null;
    this.ended = false;
    this.endError = null;
    this._lastWasError = false;
    this._onEvent = onEvent;
    this._iceServers = iceServers;
    // The server's own (an `ice_servers` message), used after `iceServers` when they arrive
    // before the peer connection is made; a reconnect starts with the last attempt's.
    this.handedIceServers = handedIceServers;
    this._customizeOffer = customizeOffer;
    this._openTimeout = openTimeout;
    this._pendingPrompts = new Map();
    this._pendingImages = [];
    this._connected = null;
    this._queuedCandidates = [];
    this._remoteStream = null;
    this._inbox = Promise.resolve();
  }

  /** Open the WebSocket; resolves once it is open. */
  open() {
    const opened = deferred();
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      return Promise.reject(
        new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, `cannot open WebSocket: ${error.message}`),
      );
    }
    this.ws = ws;
    ws.onopen = () => opened.resolve();
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not JSON: ignored, like the Python SDK
      }
      if (message && typeof message === "object" && !Array.isArray(message)) {
        // One at a time, in order: an answer is applied before the candidates after it.
        this._inbox = this._inbox
          .then(() => this.handleMessage(message))
          .catch((error) => console.error("[livemorph] message handling failed", error));
      }
    };
    ws.onerror = () => {}; // a close event always follows, with the code
    ws.onclose = (event) => {
      const error = opened.done
        ? this._closeError(event)
        : new LivemorphError(
            ERROR_CODES.WEB_RTC_ERROR,
            `cannot open WebSocket to ${this.url.split("?")[0]} (code ${event.code})`,
          );
      opened.reject(error);
      this._end(error);
    };
    return withTimeout(opened, this._openTimeout, "opening the WebSocket", () => this.close());
  }

  _closeError(event) {
    if (this._lastWasError && this.error && event.code !== 1000 && event.code !== 1001)
      return this.error;
    if (event.reason) return errorFromServerText(event.reason);
    return new LivemorphError(
      ERROR_CODES.WEB_RTC_ERROR,
      `connection closed by server (code ${event.code})`,
    );
  }

  /** End the attempt on purpose: close the peer connection and the WebSocket. */
  close() {
    this._end(null);
    if (this.pc) {
      this.pc.onconnectionstatechange = null;
      this.pc.close();
    }
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
  }

  _end(error) {
    if (this.ended) return;
    this.ended = true;
    this.endError = error;
    this._failPending(error || new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, "connection closed"));
    this._setState("disconnected");
  }

  /** Throw why the attempt ended, if it has. */
  _throwIfEnded() {
    if (this.ended) {
      throw this.endError || new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, "connection closed");
    }
  }

  sendRaw(message) {
    if (!this.ws || this.ended || this.ws.readyState !== WebSocket.OPEN) {
      // The server may have said why just before closing: that error, not a generic one,
      // decides whether a retry can help.
      const why = this.endError || (this._lastWasError ? this.error : null);
      if (why) throw new LivemorphError(why.code, why.message);
      throw new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, "WebSocket is not open");
    }
    this.ws.send(JSON.stringify(message));
  }

  /** Send `prompt` and wait for the `prompt_ack` that carries the same text. */
  async sendPrompt(text, enhance = true, timeoutMs = PROMPT_TIMEOUT_MS) {
    const waiter = deferred();
    const queue = this._pendingPrompts.get(text) || [];
    queue.push(waiter);
    this._pendingPrompts.set(text, queue);
    const forget = () => {
      const waiters = this._pendingPrompts.get(text);
      if (!waiters) return;
      const index = waiters.indexOf(waiter);
      if (index >= 0) waiters.splice(index, 1);
      if (!waiters.length) this._pendingPrompts.delete(text);
    };
    try {
      this.sendRaw({ type: "prompt", prompt: text, enhance_prompt: enhance });
      await withTimeout(waiter, timeoutMs, "prompt acknowledgment");
    } finally {
      forget();
    }
  }

  /** Send `set_image` and wait for the next `set_image_ack` (acks come back in order). */
  async sendImage(imageData, prompt, enhance, timeoutMs = IMAGE_TIMEOUT_MS) {
    const message = { type: "set_image", image_data: imageData };
    if (prompt !== undefined && prompt !== null) {
      message.prompt = prompt;
      if (enhance !== undefined) message.enhance_prompt = enhance;
    }
    const waiter = deferred();
    this._pendingImages.push(waiter);
    const forget = () => {
      const index = this._pendingImages.indexOf(waiter);
      if (index >= 0) this._pendingImages.splice(index, 1);
    };
    try {
      this.sendRaw(message);
      await withTimeout(waiter, timeoutMs, "image acknowledgment");
    } finally {
      forget();
    }
  }

  /**
   * Create the peer connection, trade offer and answer, and wait until it is connected.
   * `receive` adds recvonly transceivers first (viewers: video and audio; live_avatar: video).
   */
  async negotiate(stream, { receive = [], connectTimeout = CONNECT_TIMEOUT_MS } = {}) {
    this._throwIfEnded();
    const pc = new RTCPeerConnection({
      iceServers: [...this._iceServers, ...this.handedIceServers],
    });
    this.pc = pc;
    for (const kind of receive) pc.addTransceiver(kind, { direction: "recvonly" });
    if (stream) for (const track of stream.getTracks()) pc.addTrack(track, stream);
    pc.ontrack = (event) => this._onTrack(event);
    pc.onicecandidate = (event) => {
      if (this.ended) return;
      try {
        this.sendRaw({
          type: "ice-candidate",
          candidate: event.candidate ? event.candidate.toJSON() : null,
        });
      } catch {
        // the socket is gone: the close handler reports it
      }
    };
    pc.onconnectionstatechange = () => this._onPcState();
    preferCodec(pc, "video/VP8");

    const offer = await pc.createOffer();
    const description = { type: offer.type, sdp: addVp8Bitrate(offer.sdp || "") };
    if (this._customizeOffer) {
      const result = await this._customizeOffer(description);
      if (result && typeof result.sdp === "string") description.sdp = result.sdp;
    }
    this._throwIfEnded();
    await pc.setLocalDescription(description);

    this._connected = deferred();
    try {
      if (pc.connectionState === "connected") this._connected.resolve();
      // The offer as customized, as the published SDK sends it (not the browser's rewrite).
      this.sendRaw({ type: "offer", sdp: description.sdp });
      await withTimeout(this._connected, connectTimeout, "peer connection");
    } finally {
      this._connected = null;
    }
  }

  _onTrack(event) {
    let stream = event.streams && event.streams[0];
    if (!stream) {
      if (!this._remoteStream) this._remoteStream = new MediaStream();
      this._remoteStream.addTrack(event.track);
      stream = this._remoteStream;
    }
    this._emit("track", stream);
  }

  _onPcState() {
    const state = this.pc ? this.pc.connectionState : "closed";
    if (state === "connected") {
      if (this._connected) this._connected.resolve();
      this._setState("connected");
    } else if (state === "failed" || state === "closed") {
      this._end(new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, `peer connection ${state}`));
    }
  }

  /** Act on one message from the server. */
  async handleMessage(data) {
    const kind = data.type;
    this._lastWasError = kind === "error";
    if (
      (kind === "prompt_ack" || kind === "set_image_ack") &&
      data.success &&
      data.enhanced_prompt
    ) {
      this.enhancedPrompt = String(data.enhanced_prompt);
    }
    switch (kind) {
      case "answer":
        await this._applyAnswer(String(data.sdp || ""));
        break;
      case "ice-candidate":
        await this._addCandidate(data.candidate);
        break;
      case "session_id":
        this.session = {
          sessionId: String(data.session_id || ""),
          ip: String(data.server_ip || ""),
          port: Number(data.server_port || 0),
        };
        this._emit("session_id", this.session);
        break;
      case "prompt_ack":
        this._resolve(this._pendingPrompts.get(String(data.prompt)), data, "prompt");
        break;
      case "set_image_ack":
        this._resolve(this._pendingImages, data, "image");
        break;
      case "generation_started":
        this._setState("generating");
        break;
      case "ice_servers":
        if (Array.isArray(data.ice_servers)) this.handedIceServers = data.ice_servers;
        break;
      case "generation_tick":
        this._emit("generation_tick", Number(data.seconds) || 0);
        break;
      case "generation_ended":
        this._emit("generation_ended", {
          seconds: Number(data.seconds) || 0,
          reason: String(data.reason || ""),
        });
        break;
      case "error": {
        const error = errorFromServerText(String(data.error || "unknown server error"));
        this.error = error;
        // Before the peer connection is up, any error fails the attempt at once. Later ones
        // may be harmless (a refused message): waiters get their ack, or the close after it.
        if (this.state === "connecting") this._failPending(error);
        this._emit("error", error);
        break;
      }
      default:
        break;
    }
  }

  _resolve(waiters, data, what) {
    while (waiters && waiters.length) {
      const waiter = waiters.shift();
      if (waiter.done) continue;
      if (data.success) waiter.resolve();
      else waiter.reject(invalidInput(String(data.error || `${what} refused`)));
      return;
    }
  }

  _failPending(error) {
    const waiters = [...this._pendingImages];
    for (const queue of this._pendingPrompts.values()) waiters.push(...queue);
    if (this._connected) waiters.push(this._connected);
    for (const waiter of waiters) waiter.reject(new LivemorphError(error.code, error.message));
  }

  async _applyAnswer(sdp) {
    if (!this.pc) return;
    const queued = this._queuedCandidates;
    this._queuedCandidates = [];
    try {
      await this.pc.setRemoteDescription({ type: "answer", sdp });
    } catch (error) {
      if (this._connected) {
        this._connected.reject(
          new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, `cannot apply answer: ${error.message}`),
        );
      }
      return;
    }
    // Each one as if it came now: a malformed one is skipped, not fatal to the answer.
    for (const candidate of queued) await this._addCandidate(candidate);
  }

  async _addCandidate(candidate) {
    if (!candidate || typeof candidate !== "object" || !candidate.candidate) return;
    if (this.pc && this.pc.remoteDescription) {
      try {
        await this.pc.addIceCandidate(candidate);
      } catch {
        // a malformed candidate: ignored, the others may do
      }
    } else {
      this._queuedCandidates.push(candidate);
    }
  }

  _setState(state) {
    if (this.state === state || this.state === "disconnected") return;
    if (this.state === "generating" && state !== "disconnected") return;
    this.state = state;
    this._emit("state", state);
  }

  _emit(kind, payload) {
    try {
      this._onEvent(kind, payload);
    } catch (error) {
      console.error(`[livemorph] error in ${kind} handler`, error);
    }
  }
}

// -- sessions and viewers ---------------------------------------------------------------------

/** What publishing sessions and viewers share: events, state, retries, reconnects. */
class LiveConnection {
  constructor(url, options) {
    this._url = url;
    this._stream = options.stream || null;
    this._receive = options.receive || [];
    this._release = options.release || null;
    this._onRemoteStream = options.onRemoteStream || null;
    this._iceServers = options.iceServers || [];
    this._handedIceServers = [];
    this._customizeOffer = options.customizeOffer || null;
    this._delays = retryDelays(options.retry);
    this._connectTimeout = options.connectTimeout ?? CONNECT_TIMEOUT_MS;
    this._state = "disconnected";
    this._signaling = null;
    this._negotiating = false;
    this._closing = false;
    this._reconnecting = false;
    this._endedByServer = null;
    this._reported = null;
    this._listeners = Object.fromEntries(EVENTS.map((event) => [event, []]));
    this._buffer = [];
    this._lastStream = null;
    this._wake = null;
    for (const name of ["on", "off", "isConnected", "getConnectionState", "disconnect"]) {
      this[name] = this[name].bind(this);
    }
  }

  isConnected() {
    return this._state === "connected" || this._state === "generating";
  }

  getConnectionState() {
    return this._state;
  }

  /**
   * Listen to "connectionChange", "generationTick", "generationEnded" or "error". Events that
   * happen while connect() runs are delivered right after it resolves.
   */
  on(event, listener) {
    this._listenersFor(event).push(listener);
  }

  off(event, listener) {
    const listeners = this._listenersFor(event);
    const index = listeners.indexOf(listener);
    if (index >= 0) listeners.splice(index, 1);
  }

  /** End the session: close the peer connection and the WebSocket, stop retrying. */
  disconnect() {
    this._closing = true;
    this._buffer = null;
    if (this._wake) this._wake();
    const signaling = this._signaling;
    this._signaling = null;
    if (signaling) signaling.close();
    this._setState("disconnected");
  }

  _listenersFor(event) {
    const listeners = this._listeners[event];
    if (!listeners) {
      throw invalidInput(
        `unknown event ${JSON.stringify(event)}; expected one of ${EVENTS.join(", ")}`,
      );
    }
    return listeners;
  }

  _emit(event, payload) {
    if (this._buffer) {
      this._buffer.push([event, payload]);
      return;
    }
    for (const listener of [...this._listeners[event]]) {
      try {
        listener(payload);
      } catch (error) {
        console.error(`[livemorph] error in ${event} listener`, error);
      }
    }
  }

  _flush() {
    const buffered = this._buffer || [];
    this._buffer = null;
    for (const [event, payload] of buffered) this._emit(event, payload);
  }

  _setState(state) {
    if (state === this._state) return;
    this._state = state;
    // "disconnected" only ever follows the start as the end: free what the session held.
    if (state === "disconnected" && this._release) {
      this._release();
      this._release = null;
    }
    this._emit("connectionChange", state);
  }

  _report(error) {
    if (error !== this._reported) {
      this._reported = error;
      this._emit("error", error);
    }
  }

  /** The first connect: retries transient failures, throws the last error. */
  async _start() {
    this._setState("connecting");
    try {
      await this._connectWithRetries();
    } catch (error) {
      this._closing = true;
      this._buffer = null;
      this._setState("disconnected");
      throw error;
    }
    this._setState(this._signaling ? this._signaling.state : "disconnected");
    setTimeout(() => this._flush(), 0);
  }

  /** Wait `ms`, or less if disconnect() wakes it. */
  _sleep(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this._wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this._wake = done;
    });
  }

  async _connectWithRetries() {
    this._negotiating = true;
    try {
      for (let attempt = 0; ; attempt += 1) {
        try {
          await this._attempt();
          return;
        } catch (caught) {
          const error = asLivemorphError(caught);
          if (this._closing || !shouldRetry(error) || attempt >= this._delays.length) throw error;
          const wait = this._delays[attempt];
          console.warn(
            `[livemorph] attempt ${attempt + 1} failed: ${error.message}; retry in ${wait} ms`,
          );
          await this._sleep(wait);
          if (this._closing) throw new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, "disconnected");
        }
      }
    } finally {
      this._negotiating = false;
    }
  }

  async _attempt() {
    const signaling = new Signaling(this._url, {
      onEvent: (kind, payload) => this._onSignal(signaling, kind, payload),
      iceServers: this._iceServers,
      handedIceServers: this._handedIceServers,
      customizeOffer: this._customizeOffer,
    });
    this._signaling = signaling;
    this._endedByServer = null;
    try {
      await signaling.open();
      await this._prepare(signaling);
      await signaling.negotiate(this._stream, {
        receive: this._receive,
        connectTimeout: this._connectTimeout,
      });
      signaling._throwIfEnded();
    } catch (error) {
      signaling.close();
      if (this._signaling === signaling) this._signaling = null;
      throw error;
    } finally {
      this._handedIceServers = signaling.handedIceServers;
    }
  }

  /** Messages to exchange before the offer (a publisher's initial state). */
  async _prepare() {}

  /** A `session_id` message arrived. */
  _onSession() {}

  _onSignal(signaling, kind, payload) {
    if (signaling !== this._signaling || this._closing) return; // stale, or shutting down
    if (kind === "track") {
      if (this._onRemoteStream && payload !== this._lastStream) {
        this._lastStream = payload;
        try {
          this._onRemoteStream(payload);
        } catch (error) {
          console.error("[livemorph] error in onRemoteStream", error);
        }
      }
    } else if (kind === "session_id") {
      this._onSession(payload);
    } else if (kind === "generation_tick") {
      this._emit("generationTick", { seconds: payload });
    } else if (kind === "generation_ended") {
      this._endedByServer = payload;
      this._emit("generationEnded", payload);
    } else if (kind === "error") {
      if (!this._negotiating) this._report(payload); // while connecting, the outcome reports it
    } else if (kind === "state" && !this._negotiating) {
      if (payload === "disconnected") this._onDrop(signaling);
      else this._setState(payload);
    }
  }

  _onDrop(signaling) {
    if (this._reconnecting) return;
    const error =
      signaling.endError || new LivemorphError(ERROR_CODES.WEB_RTC_ERROR, "connection lost");
    const ended = this._endedByServer;
    signaling.close();
    if (this._signaling === signaling) this._signaling = null;
    if ((ended && FINAL_END_REASONS.includes(ended.reason)) || !shouldRetry(error)) {
      this._setState("disconnected");
      if (!ended) this._report(error);
      return;
    }
    console.warn(`[livemorph] session dropped (${error.message}); reconnecting`);
    this._reconnect();
  }

  async _reconnect() {
    this._reconnecting = true;
    this._setState("reconnecting");
    try {
      await this._connectWithRetries();
    } catch (error) {
      if (!this._closing) {
        this._setState("disconnected");
        this._report(error);
      }
      return;
    } finally {
      this._reconnecting = false;
    }
    if (this._signaling) this._setState(this._signaling.state);
  }
}

/** A publishing session: your camera in, the transformed video out. */
class RealtimeClient extends LiveConnection {
  constructor(url, options) {
    super(url, options);
    this.model = options.model;
    this._prompt = options.prompt || null;
    this._image = options.image || null;
    this._session = null;
    this._avatar = Boolean(options.avatar);
    for (const name of ["set", "setPrompt", "setImage"]) this[name] = this[name].bind(this);
    if (options.audio) {
      const audio = options.audio;
      /**
       * live_avatar without a microphone: play a clip (Blob, File or ArrayBuffer) into the
       * session, not on the speakers; resolves when it has played. A second call stops the
       * clip under way (whose promise then resolves).
       */
      this.playAudio = (clip) => audio.play(clip);
    }
  }

  /** The current session's id, or null before one exists. */
  get sessionId() {
    return this._session ? this._session.sessionId : null;
  }

  /** A token another page passes to `client.realtime.subscribe()` to watch this session. */
  get subscribeToken() {
    return this._session
      ? encodeSubscribeToken(this._session.sessionId, this._session.ip, this._session.port)
      : null;
  }

  /** How the server's engine read the current prompt when `enhance` was on, or null. */
  get enhancedPrompt() {
    return this._signaling ? this._signaling.enhancedPrompt : null;
  }

  /**
   * Change the prompt, the reference image, or both; waits for the server's ack. `image: null`
   * clears the image; leaving `image` out keeps it.
   */
  async set(input = {}) {
    const { prompt, enhance = true, image } = input || {};
    if (prompt === undefined && image === undefined) {
      throw invalidInput("At least one of 'prompt' or 'image' must be provided");
    }
    if (image === undefined) return this.setPrompt(prompt, { enhance });
    return this.setImage(image, { prompt, enhance, timeout: IMAGE_TIMEOUT_MS });
  }

  /** Send a prompt and wait (15 s) for its ack; a refusal throws INVALID_INPUT. */
  async setPrompt(prompt, { enhance = true } = {}) {
    checkPrompt(prompt);
    await this._live().sendPrompt(prompt, enhance !== false, PROMPT_TIMEOUT_MS);
    this._prompt = { text: prompt, enhance: enhance !== false };
  }

  /**
   * Send a reference image (null clears it), maybe with a prompt, and wait for its ack.
   * Images over 10 MB are refused here, before anything is sent.
   */
  async setImage(image, { prompt, enhance = true, timeout = IMAGE_TIMEOUT_MS } = {}) {
    const withPrompt = prompt !== undefined && prompt !== null;
    if (withPrompt) checkPrompt(prompt);
    if (image === undefined) throw invalidInput("image must be given (null clears it)");
    const data = image === null ? null : await imageToBase64(image);
    // sendImage leaves out `prompt` and `enhance_prompt` when there is no prompt.
    await this._live().sendImage(data, prompt, enhance !== false, timeout);
    this._image = data;
    if (withPrompt) this._prompt = { text: prompt, enhance: enhance !== false };
  }

  _live() {
    const signaling = this._signaling;
    if (!signaling || signaling.ended || this._negotiating) {
      throw new LivemorphError(
        ERROR_CODES.WEB_RTC_ERROR,
        `Cannot send message: connection is ${this._state}`,
      );
    }
    return signaling;
  }

  async _prepare(signaling) {
    if (this._avatar) {
      // As the published SDK: the portrait alone, then the behaviour prompt, each acked.
      await signaling.sendImage(this._image, undefined, undefined, IMAGE_TIMEOUT_MS);
      if (this._prompt) {
        await signaling.sendPrompt(this._prompt.text, this._prompt.enhance, IMAGE_TIMEOUT_MS);
      }
      return;
    }
    if (this._image) {
      await signaling.sendImage(this._image, this._prompt?.text, this._prompt?.enhance);
    } else if (this._prompt) {
      await signaling.sendPrompt(this._prompt.text, this._prompt.enhance, PROMPT_TIMEOUT_MS);
    }
  }

  _onSession(info) {
    this._session = info;
  }
}

/** A viewer of another session's output: it can watch, never steer. */
class Subscription extends LiveConnection {
  constructor(url, options) {
    super(url, options);
    this.sessionId = options.sessionId;
  }
}

// -- live_avatar: the portrait and the voice ---------------------------------------------------

/** How long playAudio waits for the browser to let its AudioContext run. */
const AUDIO_RESUME_TIMEOUT_MS = 2_000;

/**
 * The audio a live_avatar session sends when it has no microphone, as the published SDK makes
 * it: an AudioContext whose MediaStream destination carries silence (a gain-0 oscillator keeps
 * the track sending) until `play` decodes a clip and plays it into that destination, and only
 * there: the page's speakers never hear it; the person hears the avatar's voice as it comes
 * back from the server, in step with the mouth.
 */
class AvatarAudio {
  constructor() {
    this.context = new AudioContext();
    this.destination = this.context.createMediaStreamDestination();
    this._oscillator = this.context.createOscillator();
    const silence = this.context.createGain();
    silence.gain.value = 0;
    this._oscillator.connect(silence);
    silence.connect(this.destination);
    this._oscillator.start();
    this.stream = this.destination.stream;
    this.closed = false;
    this._current = null; // { source, done } of the clip under way
    this._turn = 0; // bumps on every play and on close: a clip still decoding is then dropped
    this.context.resume().catch(() => {}); // may wait for a user gesture: play() asks again
  }

  /** Play one clip into the connection; resolves when it has played (or was stopped). */
  async play(audio) {
    if (this.closed) {
      throw new LivemorphError(
        ERROR_CODES.WEB_RTC_ERROR,
        "Cannot play audio: the session has ended",
      );
    }
    const reading = audioBytes(audio); // refuses what is no audio before anything stops
    const turn = (this._turn += 1);
    this.stop(); // a second call stops the clip under way; that one's promise resolves
    const bytes = await reading;
    await this._running();
    let buffer;
    try {
      buffer = await this.context.decodeAudioData(bytes);
    } catch (error) {
      throw invalidInput(`cannot decode audio: ${error?.message || error}`);
    }
    if (turn !== this._turn || this.closed) return; // a later call or disconnect came first
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.destination);
    await new Promise((resolve) => {
      const done = () => {
        if (this._current && this._current.source === source) this._current = null;
        resolve();
      };
      this._current = { source, done };
      source.onended = done;
      source.start();
    });
  }

  /** Stop the clip under way, if any: the track goes back to silence. */
  stop() {
    const current = this._current;
    this._current = null;
    if (!current) return;
    try {
      current.source.stop();
    } catch {
      // never started, or already over
    }
    current.done();
  }

  async _running() {
    if (this.context.state === "running") return;
    await Promise.race([
      this.context.resume().catch(() => {}),
      new Promise((resolve) => setTimeout(resolve, AUDIO_RESUME_TIMEOUT_MS)),
    ]);
    if (this.context.state !== "running") {
      throw new LivemorphError(
        ERROR_CODES.INVALID_INPUT,
        "the browser does not let this page play audio yet: call playAudio() after a click or key press",
      );
    }
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this._turn += 1;
    this.stop();
    try {
      this._oscillator.stop();
    } catch {
      // already stopped
    }
    this.context.close().catch(() => {});
  }
}

/**
 * The bytes of an audio clip as a fresh ArrayBuffer (decoding detaches the one it is given,
 * and the caller's stays usable). Throws at once, not in the promise, for what is no clip.
 */
function audioBytes(audio) {
  if (typeof Blob !== "undefined" && audio instanceof Blob) return audio.arrayBuffer();
  if (audio instanceof ArrayBuffer) return Promise.resolve(audio.slice(0));
  if (ArrayBuffer.isView(audio)) {
    const view = new Uint8Array(audio.buffer, audio.byteOffset, audio.byteLength);
    return Promise.resolve(view.slice().buffer);
  }
  throw invalidInput("audio must be a Blob, a File or an ArrayBuffer");
}

/** A base64 image rather than a URL: long, and nothing but the base64 alphabet. */
function looksLikeBase64(text) {
  return text.length >= 100 && /^[A-Za-z0-9+/]+={0,2}$/.test(text);
}

/**
 * Plain base64 of the avatar's portrait. As in the published SDK a string is a URL (fetched;
 * a relative one is read against the page, a `data:` URL is decoded here); a long string of
 * nothing but base64 is taken as the image itself. Blobs, Files and bytes are read as they are.
 */
export async function portraitToBase64(image) {
  if (typeof image !== "string") return imageToBase64(image);
  const text = image.trim();
  if (text.startsWith("data:")) return imageToBase64(text);
  const compact = text.replace(/\s+/g, "");
  if (looksLikeBase64(compact)) return plainBase64(compact);
  let url = null;
  try {
    url = new URL(text, globalThis.location ? globalThis.location.href : undefined);
  } catch {
    url = null;
  }
  if (!text || !url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    throw invalidInput(
      "avatarImage must be a Blob, a File, an image URL (http, https, relative or data:) or base64",
    );
  }
  return imageToBase64(url.href);
}

const NO_PORTRAIT =
  "live_avatar needs a portrait: pass avatar: { avatarImage } (a Blob, a File or an image URL)";

/** What a session sends and receives: `stream`, recvonly `receive` kinds, its avatar audio. */
function mediaPlan(modelName, stream) {
  if (stream !== null && stream !== undefined && typeof stream.getTracks !== "function") {
    throw invalidInput("stream must be a MediaStream or null");
  }
  if (modelName === "live_avatar") {
    if (!stream) return { stream: null, receive: ["video"], avatarAudio: true };
    const audio = stream.getAudioTracks();
    if (!audio.length) {
      throw invalidInput(
        "live_avatar listens to a voice: pass a stream with an audio track (a microphone), " +
          "or null and play clips with playAudio()",
      );
    }
    return { stream: new MediaStream(audio), receive: ["video"], avatarAudio: false };
  }
  if (!stream || !stream.getVideoTracks().length) {
    throw invalidInput(`model ${modelName} needs a stream with a video track`);
  }
  return { stream, receive: [], avatarAudio: false };
}

function initialStateOf(state) {
  if (state === undefined || state === null) return { prompt: null, image: undefined };
  if (typeof state !== "object") throw invalidInput("initialState must be an object");
  let prompt = null;
  if (typeof state.prompt === "string") {
    checkPrompt(state.prompt);
    prompt = { text: state.prompt, enhance: true };
  } else if (state.prompt) {
    checkPrompt(state.prompt.text);
    prompt = { text: state.prompt.text, enhance: state.prompt.enhance !== false };
  }
  return { prompt, image: state.image };
}

class RealtimeAPI {
  constructor(config) {
    this._config = config;
  }

  /**
   * Start a session that transforms `stream` (a MediaStream; null only for live_avatar) with
   * `options.model`; resolves once the peer connection is up. `initialState` ({prompt:
   * {text, enhance}, image}) is applied before the first frame.
   *
   * live_avatar animates `options.avatar.avatarImage` (initialState.image also serves) by a
   * voice: with `stream` null the session sends silence and gains `playAudio(clip)`; with a
   * microphone stream, its audio track is sent instead.
   */
  async connect(stream, options = {}) {
    if (!options || typeof options !== "object")
      throw new LivemorphError(ERROR_CODES.INVALID_OPTIONS, "connect() needs options");
    const model = resolveModel(options.model);
    if (options.onRemoteStream !== undefined && typeof options.onRemoteStream !== "function") {
      throw new LivemorphError(ERROR_CODES.INVALID_OPTIONS, "onRemoteStream must be a function");
    }
    const { prompt, image: imageInput } = initialStateOf(options.initialState);
    const avatar = model.name === "live_avatar";
    let portrait = null;
    if (avatar) {
      const given = options.avatar;
      if (given !== undefined && given !== null && typeof given !== "object") {
        throw new LivemorphError(ERROR_CODES.INVALID_OPTIONS, "avatar must be { avatarImage }");
      }
      portrait = given?.avatarImage ?? imageInput;
      if (portrait === undefined || portrait === null || portrait === "") {
        throw invalidInput(NO_PORTRAIT);
      }
    }
    const plan = mediaPlan(model.name, stream);
    let image = null;
    if (avatar) image = await portraitToBase64(portrait);
    else if (imageInput !== undefined && imageInput !== null)
      image = await imageToBase64(imageInput);
    const audio = plan.avatarAudio ? new AvatarAudio() : null;
    const query = new URLSearchParams({
      api_key: this._config.apiKey,
      model: model.name,
      user_agent: USER_AGENT,
    });
    const session = new RealtimeClient(`${this._config.wsBaseUrl}${model.urlPath}?${query}`, {
      ...options,
      model: model.name,
      stream: audio ? audio.stream : plan.stream,
      receive: plan.receive,
      release: audio ? () => audio.close() : null,
      avatar,
      audio,
      prompt,
      image,
    });
    await session._start();
    return session;
  }

  /** Watch the session that `token` (a publisher's `subscribeToken`) names. */
  async subscribe(options = {}) {
    const { sid, ip, port } = decodeSubscribeToken(options.token);
    const query = new URLSearchParams({ IP: ip, port: String(port), api_key: this._config.apiKey });
    const viewer = new Subscription(
      `${this._config.wsBaseUrl}/subscribe/${encodeURIComponent(sid)}?${query}`,
      {
        ...options,
        sessionId: sid,
        stream: null,
        receive: ["video", "audio"],
        customizeOffer: null,
      },
    );
    await viewer._start();
    return viewer;
  }
}

// -- batch work: video jobs and image edits ---------------------------------------------------

/** How often `jobs.wait` and `jobs.submitAndWait` poll a job's status, in ms. */
export const JOB_POLL_INTERVAL_MS = 1000;

/** A refusal of the REST API (`{"error": ...}`) as a coded error. */
async function refusal(what, response) {
  let text = (await response.text().catch(() => "")).trim();
  try {
    text = String(JSON.parse(text).error ?? text);
  } catch {
    // not JSON: the text as it came
  }
  text = text.slice(0, 500) || `HTTP ${response.status}`;
  const status = response.status;
  let code = ERROR_CODES.SERVER_ERROR;
  if (status === 401) code = ERROR_CODES.INVALID_API_KEY;
  else if ((status === 403 || status === 404) && text.includes("model"))
    code = ERROR_CODES.MODEL_NOT_FOUND;
  else if ([400, 413, 415, 422].includes(status)) code = ERROR_CODES.INVALID_INPUT;
  else if (status === 504) code = ERROR_CODES.TIMEOUT;
  return new LivemorphError(code, `${what}: ${status} - ${text}`, { status });
}

async function call(config, what, path, init = {}) {
  let response;
  try {
    response = await fetch(`${config.baseUrl}${path}`, {
      ...init,
      headers: { "X-API-KEY": config.apiKey },
    });
  } catch (error) {
    const message = `${what}: ${error.message}`;
    throw new LivemorphError(ERROR_CODES.SERVER_ERROR, message, undefined, error);
  }
  if (!response.ok) throw await refusal(what, response);
  return response;
}

/** An image (anything `imageToBase64` takes) as a Blob to upload, 10 MB at most. */
async function imageBlob(image) {
  if (typeof Blob !== "undefined" && image instanceof Blob) {
    checkImageSize(image.size);
    return image;
  }
  const binary = atob(await imageToBase64(image));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes]);
}

/** A video to upload: a Blob or File, bytes, or a URL (fetched). */
async function videoBlob(video) {
  if (typeof Blob !== "undefined" && video instanceof Blob) return video;
  if (video instanceof ArrayBuffer || ArrayBuffer.isView(video)) return new Blob([video]);
  if (typeof video === "string" && video) {
    let response;
    try {
      response = await fetch(video);
    } catch (error) {
      throw new LivemorphError(
        ERROR_CODES.INVALID_INPUT,
        `cannot fetch video: ${error.message}`,
        undefined,
        error,
      );
    }
    if (!response.ok) throw invalidInput(`cannot fetch video: HTTP ${response.status}`);
    return response.blob();
  }
  throw invalidInput("video must be a Blob, a File, an ArrayBuffer or a URL");
}

function editForm(prompt, enhancePrompt) {
  const form = new FormData();
  if (prompt !== undefined && prompt !== null) form.append("prompt", String(prompt));
  form.append("enhance_prompt", enhancePrompt === false ? "false" : "true");
  return form;
}

function jobStatus(body) {
  const status = { jobId: String(body.job_id), status: String(body.status) };
  if (typeof body.progress === "number") status.progress = body.progress;
  if (body.error !== undefined && body.error !== null) status.error = String(body.error);
  return status;
}

function jobFailure(status) {
  const reason = status.error || "the job failed";
  const code = reason.startsWith("invalid") ? ERROR_CODES.INVALID_INPUT : ERROR_CODES.SERVER_ERROR;
  return new LivemorphError(code, `job ${status.jobId} failed: ${reason}`, { job: status });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const sameStatus = (a, b) =>
  !!a && a.status === b.status && a.progress === b.progress && a.error === b.error;

/** `client.jobs`: batch video jobs (`POST /v1/jobs/{model}`, its status and its MP4). */
class JobsAPI {
  constructor(config) {
    this._config = config;
  }

  /**
   * Submit a video (Blob, File, bytes or URL) with `prompt`, `referenceImage`, or both;
   * resolves to `{jobId, status}` once the server has queued it.
   */
  async submit(model, video, options = {}) {
    const { prompt, referenceImage, enhancePrompt } = options || {};
    if ((prompt === undefined || prompt === null) && !referenceImage) {
      throw invalidInput("give a prompt, a referenceImage, or both");
    }
    const form = editForm(prompt, enhancePrompt);
    if (referenceImage) {
      form.append("reference_image", await imageBlob(referenceImage), "reference");
    }
    form.append("data", await videoBlob(video), "video");
    const name = typeof model === "string" ? model : model?.name;
    const response = await call(
      this._config,
      "cannot submit the job",
      `/v1/jobs/${encodeURIComponent(name)}`,
      { method: "POST", body: form },
    );
    return jobStatus(await response.json());
  }

  /** The job's status: `{jobId, status, progress?, error?}` (progress 0..1 while it runs). */
  async status(jobId) {
    const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
    const response = await call(this._config, "cannot get the job's status", path);
    return jobStatus(await response.json());
  }

  /** The completed job's video: a Blob of type video/mp4. */
  async result(jobId) {
    const path = `/v1/jobs/${encodeURIComponent(jobId)}/content`;
    const response = await call(this._config, "cannot get the job's video", path);
    return response.blob();
  }

  /**
   * Poll until the job completes (resolves to its status) or fails (rejects with the server's
   * reason); `onProgress` hears each new status. `signal` (an AbortSignal) stops the waiting.
   */
  async wait(jobId, options = {}) {
    const { onProgress, pollInterval = JOB_POLL_INTERVAL_MS, signal } = options || {};
    let last = null;
    for (;;) {
      if (signal?.aborted) {
        throw new LivemorphError(ERROR_CODES.TIMEOUT, `stopped waiting for job ${jobId}`);
      }
      const status = await this.status(jobId);
      if (onProgress && !sameStatus(last, status)) await onProgress(status);
      last = status;
      if (status.status === "failed") throw jobFailure(status);
      if (status.status === "completed") return status;
      await sleep(pollInterval);
    }
  }

  /** `submit`, `wait` and `result` in one: the transformed video as a Blob (video/mp4). */
  async submitAndWait(model, video, options = {}) {
    const job = await this.submit(model, video, options);
    await this.wait(job.jobId, options);
    return this.result(job.jobId);
  }
}

/** `POST /v1/generate/{model}`: the edited picture as a Blob (PNG, or JPEG for a JPEG). */
async function editImage(config, model, image, options = {}) {
  const { prompt, referenceImage, enhancePrompt } = options || {};
  if (typeof prompt !== "string") throw invalidInput("editImage needs a prompt");
  const form = editForm(prompt, enhancePrompt);
  form.append("data", await imageBlob(image), "image");
  if (referenceImage) form.append("reference_image", await imageBlob(referenceImage), "reference");
  const response = await call(
    config,
    "cannot edit the image",
    `/v1/generate/${encodeURIComponent(model)}`,
    { method: "POST", body: form },
  );
  return response.blob();
}

async function createToken(config, options) {
  const init = { method: "POST", headers: { "X-API-KEY": config.apiKey } };
  if (options && Object.keys(options).length) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options);
  }
  let response;
  try {
    response = await fetch(`${config.baseUrl}/v1/client/tokens`, init);
  } catch (error) {
    throw new LivemorphError(
      ERROR_CODES.TOKEN_CREATE_ERROR,
      `Failed to create token: ${error.message}`,
      undefined,
      error,
    );
  }
  if (!response.ok) {
    const text = (await response.text().catch(() => "")).trim().slice(0, 500);
    const code =
      response.status === 401 ? ERROR_CODES.INVALID_API_KEY : ERROR_CODES.TOKEN_CREATE_ERROR;
    throw new LivemorphError(code, `Failed to create token: ${response.status} - ${text}`, {
      status: response.status,
    });
  }
  return response.json();
}

/**
 * A client for the livemorph server at `baseUrl` (default: the origin this module was loaded
 * from). `apiKey` may be a permanent key (on your backend) or a client token (in a browser).
 */
export function createClient(options = {}) {
  const { apiKey, baseUrl } = options || {};
  if (typeof apiKey !== "string" || !apiKey.trim()) {
    throw new LivemorphError(
      ERROR_CODES.INVALID_API_KEY,
      "Missing API key: pass apiKey to createClient()",
    );
  }
  const base = validateBaseUrl(baseUrl ?? defaultBaseUrl());
  const config = { apiKey: apiKey.trim(), baseUrl: base, wsBaseUrl: base.replace(/^http/, "ws") };
  return {
    baseUrl: base,
    realtime: new RealtimeAPI(config),
    jobs: new JobsAPI(config),
    /** Edit one picture (`lucy-image-2`, ...): `{prompt, referenceImage?, enhancePrompt?}`. */
    editImage: (model, image, editOptions) => editImage(config, model, image, editOptions),
    tokens: {
      /** Mint a client token with this (permanent) key: `{apiKey, expiresAt, ...}`. */
      create: (tokenOptions) => createToken(config, tokenOptions),
    },
    /** The server's model catalog (`GET /v1/models`), with what each model expects. */
    async listModels() {
      const response = await fetch(`${base}/v1/models`);
      if (!response.ok)
        throw new LivemorphError(
          ERROR_CODES.SERVER_ERROR,
          `cannot list models: HTTP ${response.status}`,
        );
      return response.json();
    },
  };
}

/** The published SDK's name for `createClient`. */
export const createDecartClient = createClient;

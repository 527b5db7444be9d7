// A small app on the published @decartai/sdk@0.1.20, used as it is: the SDK bundle is loaded
// from this page's own origin and pointed at a livemorph server by the two public options
// an app sets, `baseUrl` (REST, watch-stream) and `realtimeBaseUrl` (the /v1/stream socket).
// The page's query string names them: ?baseUrl=http://HOST:PORT&realtimeBaseUrl=ws://HOST:PORT
//
// The tests drive it through `window.app`; every result is plain data (errors described,
// never thrown), and every event the SDK emits is kept in `app.events`.
import * as sdk from "./decart-sdk.js";

const query = new URLSearchParams(location.search);
const baseUrl = query.get("baseUrl");
const realtimeBaseUrl = query.get("realtimeBaseUrl");
// livekit-client's own log (signal URLs, join, fallbacks), for the test's console capture.
sdk.setLiveKitLogLevel(query.get("livekitLog") || "info");

const video = document.querySelector("#out");
const events = [];
const record = (name) => (data) => events.push({ name, t: performance.now(), data: data ?? null });

/** Whatever the SDK rejected with, as data: SDK errors are plain objects with a `code`,
 * server refusals are `Error`s with `source: "server"`, bad options are ZodErrors. */
function describe(error) {
  if (error === null || typeof error !== "object") return { kind: typeof error, message: String(error) };
  return {
    isError: error instanceof Error,
    name: error.name ?? null,
    code: error.code ?? null,
    source: error.source ?? null,
    message: String(error.message ?? error),
    data: error.data ?? null,
    cause: error.cause ? String(error.cause.message ?? error.cause) : null,
  };
}

async function settle(promise) {
  try {
    const value = await promise;
    return { ok: true, value: value ?? null };
  } catch (error) {
    return { ok: false, error: describe(error) };
  }
}

function client(apiKey) {
  return sdk.createDecartClient({
    apiKey,
    baseUrl,
    realtimeBaseUrl,
    telemetry: false,
    logger: sdk.createConsoleLogger("debug"),
  });
}

function show(stream) {
  video.srcObject = stream;
  video.play().catch(() => {});
}

async function camera(model) {
  return navigator.mediaDevices.getUserMedia({
    video: { frameRate: model.fps.ideal ?? model.fps, width: model.width, height: model.height },
  });
}

/** connect(stream, {model, onRemoteStream, initialState}) as the seeds' snippet does; the
 * session is `app.rt`. Resolves to the connection state, or the refusal described. */
async function start(apiKey, { model, prompt, enhance = false, imageUrl = null } = {}) {
  const definition = sdk.models.realtime(model);
  const stream = await camera(definition);
  const initialState = {};
  if (prompt) initialState.prompt = { text: prompt, enhance };
  if (imageUrl) initialState.image = await fetch(imageUrl).then((r) => r.blob());
  const result = await settle(
    client(apiKey).realtime.connect(stream, {
      model: definition,
      onRemoteStream: show,
      onConnectionChange: record("onConnectionChange"),
      onQueuePosition: record("onQueuePosition"),
      initialState,
    }),
  );
  if (!result.ok) return result;
  const rt = result.value;
  app.rt = rt;
  for (const name of ["connectionChange", "generationTick", "generationEnded", "error", "diagnostic"]) {
    rt.on(name, record(name));
  }
  return {
    ok: true,
    state: rt.getConnectionState(),
    sessionId: rt.sessionId,
    subscribeToken: rt.subscribeToken,
    camera: stream.getVideoTracks()[0].getSettings(),
  };
}

/** client.realtime.subscribe({token, onRemoteStream}): a viewer of another page's session. */
async function watch(apiKey, token) {
  const result = await settle(
    client(apiKey).realtime.subscribe({
      token,
      onRemoteStream: show,
      onConnectionChange: record("viewerConnectionChange"),
    }),
  );
  if (!result.ok) return result;
  app.viewer = result.value;
  return { ok: true, state: app.viewer.getConnectionState() };
}

/** A client token minted with `apiKey`: `client.tokens.create(options)`. */
async function mint(apiKey, options) {
  return settle(client(apiKey).tokens.create(options));
}

window.app = {
  sdk,
  baseUrl,
  realtimeBaseUrl,
  liveKitVersion: sdk.liveKitVersion,
  events,
  rt: null,
  viewer: null,
  describe,
  settle,
  client,
  start,
  watch,
  mint,
  count: (name) => events.filter((event) => event.name === name).length,
  size: () => [video.videoWidth, video.videoHeight],
};
document.title = "ready";

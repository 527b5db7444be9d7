// A small app on the published @decartai/sdk@0.1.20, used as it is: `client.queue` (video
// jobs) and `client.process` (image edits) with the SDK's own model definitions, files
// given as `File`s. The page's query string names the server: ?baseUrl=http://HOST:PORT
//
// The tests drive it through `window.app`; every result is plain data: a Blob the SDK
// returned as {type, size, base64}, a rejection described (the SDK rejects with plain
// objects carrying a `code`), never thrown.
import * as sdk from "./decart-sdk.js";

const baseUrl = new URLSearchParams(location.search).get("baseUrl");

function describe(error) {
  if (error === null || typeof error !== "object") return { kind: typeof error, message: String(error) };
  return {
    isError: error instanceof Error,
    code: error.code ?? null,
    message: String(error.message ?? error),
    data: error.data ?? null,
  };
}

async function blob(value) {
  if (!(value instanceof Blob)) return value;
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(value);
  });
  return { blob: true, type: value.type, size: value.size, base64: url.slice(url.indexOf(",") + 1) };
}

/** The SDK's answer as data: Blobs (also a `data` field's) read out. */
async function plain(value) {
  if (value instanceof Blob) return blob(value);
  if (value && typeof value === "object" && value.data instanceof Blob) {
    return { ...value, data: await blob(value.data) };
  }
  return value ?? null;
}

async function settle(promise) {
  try {
    return { ok: true, value: await plain(await promise) };
  } catch (error) {
    return { ok: false, error: describe(error) };
  }
}

function client(apiKey) {
  return sdk.createDecartClient({
    apiKey,
    baseUrl,
    telemetry: false,
    logger: sdk.createConsoleLogger("debug"),
  });
}

/** A file of this origin as the `File` a user would pick. */
async function file({ url, name, type }) {
  const body = await fetch(url).then((r) => r.blob());
  return new File([body], name, { type });
}

/** The SDK's options: `model` a name of `kind` (`video`, `image`), `files` fields to load. */
async function options(kind, { model, files = {}, ...inputs }) {
  const loaded = {};
  for (const [field, spec] of Object.entries(files)) loaded[field] = await file(spec);
  return { model: sdk.models[kind](model), ...inputs, ...loaded };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

window.app = {
  sdk,
  baseUrl,
  /** queue.submitAndPoll: its result, and every status onStatusChange saw. */
  async submitAndPoll(apiKey, input) {
    const statuses = [];
    const result = await settle(
      options("video", input).then((o) =>
        client(apiKey).queue.submitAndPoll({ ...o, onStatusChange: (s) => statuses.push(s) }),
      ),
    );
    return { ...result, statuses };
  },
  /** queue.submit */
  async submit(apiKey, input) {
    return settle(options("video", input).then((o) => client(apiKey).queue.submit(o)));
  },
  /** queue.status until the job is completed or failed (or `timeoutMs`): every status. */
  async poll(apiKey, jobId, timeoutMs = 60000) {
    const queue = client(apiKey).queue;
    const seen = [];
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline) {
      const found = await settle(queue.status(jobId));
      seen.push(found);
      if (!found.ok || ["completed", "failed"].includes(found.value.status)) break;
      await sleep(250);
    }
    return seen;
  },
  /** queue.result */
  async result(apiKey, jobId) {
    return settle(client(apiKey).queue.result(jobId));
  },
  /** process, with an image model */
  async process(apiKey, input) {
    return settle(options("image", input).then((o) => client(apiKey).process(o)));
  },
};

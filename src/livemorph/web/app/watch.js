// The viewer: watches a shared session through its subscribe token (/watch?token=...).
import { createClient } from "/sdk/livemorph.js";
import { demoToken, showError, showState } from "/app/shared.js";

const output = document.getElementById("output");
const size = document.getElementById("output-size");
let viewer = null;

/** A viewer's "invalid session" means the shared session is over: say so in plain words. */
function showViewerError(error) {
  const ended = /invalid session/i.test(error.message);
  showError(ended ? new Error("The shared session has ended.") : error);
}

output.addEventListener("resize", () => {
  size.textContent = `${output.videoWidth}×${output.videoHeight}`;
});

async function watch() {
  const token = new URLSearchParams(location.search).get("token");
  if (!token)
    throw new Error("This link names no session: it needs ?token=... from the Share button.");
  showState("connecting");
  const client = createClient({ apiKey: await demoToken() });
  viewer = await client.realtime.subscribe({
    token,
    onRemoteStream: (stream) => {
      output.srcObject = stream;
    },
  });
  viewer.on("connectionChange", showState);
  viewer.on("error", showViewerError);
  showState(viewer.getConnectionState());
}

// For tests and the curious: the live viewer, as the SDK returns it.
window.livemorphViewer = {
  get viewer() {
    return viewer;
  },
};

window.addEventListener("pagehide", () => viewer?.disconnect());
watch().catch((error) => {
  showState("disconnected");
  showViewerError(error);
});

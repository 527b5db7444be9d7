// What the demo page and the viewer page share: client tokens, errors, the state badge.

let cachedToken = null;

/** A client token minted by this server for the demo (the permanent key stays there). */
export async function demoToken() {
  if (cachedToken && Date.parse(cachedToken.expiresAt) - Date.now() > 120_000) {
    return cachedToken.apiKey;
  }
  const response = await fetch("/demo/token", { method: "POST" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error || `the server refused a demo token (HTTP ${response.status})`);
  }
  cachedToken = body;
  return body.apiKey;
}

/** Words a person can act on, for the errors a camera page meets most. */
export function describeError(error) {
  if (!error) return "";
  switch (error.name) {
    case "NotAllowedError":
      return "Camera permission was denied: allow the camera for this page and press Start.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera was found that this browser can open.";
    case "NotReadableError":
      return "The camera is busy in another application.";
    default:
      break;
  }
  const message = error.message || String(error);
  return error.code ? `${message} (${error.code})` : message;
}

export function showError(error) {
  const box = document.getElementById("error");
  const text = describeError(error);
  box.textContent = text;
  box.hidden = !text;
  if (error) console.error("[demo]", error);
}

export function showState(state) {
  const badge = document.getElementById("state");
  badge.textContent = state;
  badge.dataset.state = state;
}

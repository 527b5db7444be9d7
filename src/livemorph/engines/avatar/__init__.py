"""The avatar engine: a portrait animated by the client's voice (`live_avatar`)."""

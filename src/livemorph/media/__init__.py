"""Media plumbing between WebRTC tracks and engines: hand-offs, output tracks, receive path."""

"""The HTTP and WebSocket face of livemorph: one ASGI app on one port."""

from .app import create_app

__all__ = ["create_app"]

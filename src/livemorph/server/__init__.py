"""The HTTP and WebSocket face of livemorph: one ASGI app on one port."""

from .app import GracefulServer, create_app

__all__ = ["GracefulServer", "create_app"]

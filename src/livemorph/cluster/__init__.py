"""Several nodes as one service: a directory of nodes and sessions in Redis (`directory`),
and signed WebSocket relays between nodes (`relay`). The server (server/cluster.py) decides
placement with them; nothing here imports the server."""

from .directory import (
    ClusterUnavailable,
    Directory,
    Node,
    RedisRateLimiter,
    SessionEntry,
    order_for,
)

__all__ = [
    "ClusterUnavailable",
    "Directory",
    "Node",
    "RedisRateLimiter",
    "SessionEntry",
    "order_for",
]

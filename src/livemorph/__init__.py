"""livemorph: self-hostable realtime video transformation over WebRTC.

The package root is the Python SDK; the server lives in `livemorph.server`.
"""

from ._version import __version__
from .errors import ErrorCode, LivemorphError
from .models import CATALOG, ModelSpec, models
from .sdk import (
    ArrayVideoTrack,
    Client,
    ClientToken,
    GenerationEnded,
    GenerationTick,
    RealtimeClient,
    RetryPolicy,
    Subscription,
    TokensClient,
    create_client,
    sources,
)

__all__ = [
    "CATALOG",
    "ArrayVideoTrack",
    "Client",
    "ClientToken",
    "ErrorCode",
    "GenerationEnded",
    "GenerationTick",
    "LivemorphError",
    "ModelSpec",
    "RealtimeClient",
    "RetryPolicy",
    "Subscription",
    "TokensClient",
    "__version__",
    "create_client",
    "models",
    "sources",
]

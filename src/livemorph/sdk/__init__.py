"""The Python SDK: publish a track to a livemorph server, watch sessions, mint tokens."""

from ..protocol import GenerationEnded, GenerationTick
from . import sources
from .audio import ClipAudioTrack, decode_audio
from .client import Client, ClientToken, TokensClient, create_client
from .images import image_bytes, image_to_base64
from .jobs import JobsClient, JobStatus
from .realtime import (
    UNSET,
    AvatarState,
    Event,
    InitialState,
    Player,
    PromptState,
    RealtimeAPI,
    RealtimeClient,
    RetryPolicy,
    Subscription,
    should_retry,
)
from .signaling import ConnectionState, Signaling
from .sources import ArrayVideoTrack

__all__ = [
    "UNSET",
    "ArrayVideoTrack",
    "AvatarState",
    "Client",
    "ClientToken",
    "ClipAudioTrack",
    "ConnectionState",
    "Event",
    "GenerationEnded",
    "GenerationTick",
    "InitialState",
    "JobStatus",
    "JobsClient",
    "Player",
    "PromptState",
    "RealtimeAPI",
    "RealtimeClient",
    "RetryPolicy",
    "Signaling",
    "Subscription",
    "TokensClient",
    "create_client",
    "decode_audio",
    "image_bytes",
    "image_to_base64",
    "should_retry",
    "sources",
]

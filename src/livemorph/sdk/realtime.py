"""Publishing sessions and viewers: connect, stay connected, report what happens.

Each connection attempt is a fresh `Signaling`; this module decides when to make another
one. The rules follow the published clients: retry transient failures with exponential
backoff, never retry an error the server marks as permanent (bad key, not allowed,
invalid session), and after a drop restore the last prompt and image that the server
acknowledged so the new session looks like the old one from its first frame (for
`live_avatar`, the portrait).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Required, TypedDict, overload
from urllib.parse import quote, urlencode

from aiortc import MediaStreamTrack, RTCIceServer
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from .._version import __version__
from ..errors import ErrorCode, LivemorphError
from ..models import CATALOG, ModelSpec
from ..protocol import (
    FINAL_END_REASONS,
    GenerationEnded,
    GenerationTick,
    SubscribeTarget,
    check_prompt,
    decode_subscribe_token,
    encode_subscribe_token,
)
from .audio import AudioInput, ClipAudioTrack, decode_audio
from .images import ImageInput, image_bytes
from .recording import Recording
from .signaling import (
    IMAGE_TIMEOUT,
    PROMPT_TIMEOUT,
    ConnectionState,
    OfferHook,
    SignalEvent,
    Signaling,
    StateChanged,
)

if TYPE_CHECKING:
    import httpx

    from .client import Client

logger = logging.getLogger(__name__)

USER_AGENT = f"livemorph-python/{__version__}"

#: The model that animates a portrait from audio instead of transforming a camera.
AVATAR_MODEL = "live_avatar"

#: Events that `on()` accepts, and what each listener is called with.
Event = Literal["connection_change", "generation_tick", "generation_ended", "error"]
EVENTS: tuple[Event, ...] = ("connection_change", "generation_tick", "generation_ended", "error")
EventPayload = ConnectionState | GenerationTick | GenerationEnded | LivemorphError

#: A listener may be a plain function or a coroutine function; what it returns is ignored.
Listener = Callable[[Any], object]
RemoteStreamCallback = Callable[[MediaStreamTrack], object]


class Player(Protocol):
    """A media source with tracks, such as aiortc's `MediaPlayer` (`sources.camera()`,
    `sources.microphone()`, `sources.file(path)`)."""

    @property
    def video(self) -> MediaStreamTrack | None: ...

    @property
    def audio(self) -> MediaStreamTrack | None: ...


class PromptState(TypedDict, total=False):
    """A prompt with its enhance flag, as in `initial_state={"prompt": {...}}`."""

    text: Required[str]
    enhance: bool


class InitialState(TypedDict, total=False):
    """What a session starts with, applied before its first frame."""

    prompt: str | PromptState
    image: ImageInput


class AvatarState(TypedDict, total=False):
    """`live_avatar`'s portrait: `avatar={"image": portrait}` (`avatar_image` as in the
    browser SDK works too)."""

    image: ImageInput
    avatar_image: ImageInput


#: What `connect` sends: a video track, tracks, or a player (its audio only for
#: `live_avatar`); None for an avatar that speaks what `play_audio` plays.
StreamInput = MediaStreamTrack | Sequence[MediaStreamTrack] | Player | None


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: Default of `RealtimeClient.set(image=...)`: "leave the image alone" (None clears it).
UNSET: Final = _Unset()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how patiently, to retry a failed connect or a dropped session.

    The defaults are the published clients': 5 attempts, waiting 1, 2, 4 and 8 s between
    them (doubling, capped at `max_delay`).
    """

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 10.0

    def delays(self) -> list[float]:
        """The waits between consecutive attempts (one fewer than `attempts`)."""
        return [min(self.max_delay, self.base_delay * 2**i) for i in range(self.attempts - 1)]


def should_retry(error: LivemorphError) -> bool:
    """False for errors another attempt cannot fix: permanent ones and refused input."""
    return not error.permanent and error.code is not ErrorCode.INVALID_INPUT


def _call(callback: Callable[[Any], object], arg: object, tasks: set[asyncio.Task[Any]]) -> None:
    """Call a sync or async user callback; a coroutine runs as a task we keep track of."""
    try:
        result = callback(arg)
    except Exception:
        logger.exception("error in %r callback", callback)
        return
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)
        tasks.add(task)
        task.add_done_callback(_finish_callback(tasks))


def _finish_callback(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("error in async callback", exc_info=task.exception())

    return done


class _Outlet(MediaStreamTrack):
    """One connection attempt's hold on a track the session sends.

    aiortc stops a sender's track when its peer connection closes, and a stopped track
    (a camera, a microphone, the avatar's clips) cannot be sent again. Each attempt sends
    an outlet instead: the old connection's close ends only its outlet, the reconnect
    sends the same source through a new one, and the sources are stopped when the
    session ends.
    """

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.kind = source.kind
        self.source = source

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        return await self.source.recv()


class _LiveConnection:
    """What publishing sessions and viewers share: events, state, retries, reconnects."""

    def __init__(
        self,
        url: str,
        *,
        on_remote_stream: RemoteStreamCallback | None,
        send: Sequence[MediaStreamTrack],
        receive: Sequence[str],
        ice_servers: Iterable[RTCIceServer],
        customize_offer: OfferHook | None,
        retry: RetryPolicy,
        connect_timeout: float,
        fast_receive: bool = True,
        ssl: SSLContext | None = None,
    ) -> None:
        self._url = url
        self._fast_receive = fast_receive
        self._ssl = ssl
        self._on_remote_stream = on_remote_stream
        self._send = list(send)
        self._receive = tuple(receive)
        self._ice_servers = list(ice_servers)
        #: What the server handed over on the last attempt, for the next (signaling.py).
        self._handed_ice_servers: list[RTCIceServer] = []
        self._customize_offer = customize_offer
        self._retry = retry
        self._connect_timeout = connect_timeout
        self._state: ConnectionState = "disconnected"
        self._signaling: Signaling | None = None
        self._negotiating = False
        self._closing = False
        self._ended_by_server: GenerationEnded | None = None
        self._reported: LivemorphError | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._listeners: dict[str, list[Listener]] = {event: [] for event in EVENTS}
        self._buffer: list[tuple[Event, EventPayload]] | None = []
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._video_track: MediaStreamTrack | None = None
        self._audio_track: MediaStreamTrack | None = None
        self._owned_tracks: list[MediaStreamTrack] = []
        self._on_close: Callable[[_LiveConnection], None] | None = None
        # Each remote track is handed out through a relay, so a recording reads its own copy
        # and the caller's `video_track` still gets every frame (sdk/recording.py).
        self._relay = MediaRelay()
        self._remote: dict[str, MediaStreamTrack] = {}
        self._recording: Recording | None = None

    # -- public surface ----------------------------------------------------------------------

    @property
    def video_track(self) -> MediaStreamTrack | None:
        """The remote video track, once received; a reconnect replaces it with a new one.

        The old track ends when its connection drops, so `recv()` on it raises
        `MediaStreamError`: read `video_track` again after "connection_change".
        """
        return self._video_track

    @property
    def audio_track(self) -> MediaStreamTrack | None:
        return self._audio_track

    async def record(
        self,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        """Record what this connection receives into `path` (aiortc's `MediaRecorder`): the
        video, and the audio when some is received now. The container follows the file's
        name (`.mp4`: H.264 and AAC; `.webm`: VP8 and Opus; `.mkv`...) unless `format`
        names one. A reconnect's new tracks go on into the same file. `stop_recording()`,
        or `disconnect()`, finishes it; until then the file is not playable."""
        if self._recording is not None:
            raise LivemorphError(
                f"already recording to {self._recording.path}", ErrorCode.INVALID_INPUT
            )
        if "video" not in self._remote or self._closing:
            raise LivemorphError(
                f"nothing to record: not connected (state: {self._state})",
                ErrorCode.WEB_RTC_ERROR,
            )
        sources = {kind: self._relay.subscribe(track) for kind, track in self._remote.items()}
        try:
            recording = Recording(path, sources, format=format, options=options)
        except Exception as exc:
            for source in sources.values():
                source.stop()
            raise LivemorphError(
                f"cannot record to {path}: {exc}", ErrorCode.INVALID_INPUT
            ) from None
        self._recording = recording
        await recording.start()

    async def stop_recording(self) -> Path | None:
        """Finish the recording `record()` started; its path (None when none was running)."""
        recording, self._recording = self._recording, None
        return None if recording is None else await recording.stop()

    @property
    def recording(self) -> Path | None:
        """The file being recorded into, or None."""
        return None if self._recording is None else self._recording.path

    @property
    def signaling(self) -> Signaling | None:
        """Low-level: the current signaling attempt, None while reconnecting or closed."""
        return self._signaling

    def is_connected(self) -> bool:
        return self._state in ("connected", "generating")

    def get_connection_state(self) -> ConnectionState:
        return self._state

    @overload
    def on(
        self, event: Literal["connection_change"], callback: Callable[[ConnectionState], object]
    ) -> None: ...
    @overload
    def on(
        self, event: Literal["generation_tick"], callback: Callable[[GenerationTick], object]
    ) -> None: ...
    @overload
    def on(
        self, event: Literal["generation_ended"], callback: Callable[[GenerationEnded], object]
    ) -> None: ...
    @overload
    def on(self, event: Literal["error"], callback: Callable[[LivemorphError], object]) -> None: ...
    def on(self, event: Event, callback: Listener) -> None:
        """Listen to "connection_change" (a `ConnectionState`), "generation_tick" (a
        `GenerationTick`), "generation_ended" (a `GenerationEnded`) or "error" (a
        `LivemorphError`).

        Callbacks may be plain functions or coroutine functions. Events that happen while
        `connect()` runs are delivered right after it returns, so listeners registered then
        miss nothing.
        """
        self._listeners_for(event).append(callback)

    def off(self, event: Event, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners_for(event).remove(callback)

    async def disconnect(self) -> None:
        """End the session: close the peer connection and WebSocket, stop every task; a
        recording is finished first."""
        self._closing = True
        await self.stop_recording()
        self._buffer = None
        task = self._supervisor
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        signaling, self._signaling = self._signaling, None
        if signaling is not None:
            await signaling.close()
        self._release()
        self._set_state("disconnected")
        pending = {t for t in self._callback_tasks if t is not asyncio.current_task()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=1.0)
            for leftover in late:
                leftover.cancel()

    async def __aenter__(self) -> _LiveConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    # -- events ------------------------------------------------------------------------------

    def _listeners_for(self, event: str) -> list[Listener]:
        try:
            return self._listeners[event]
        except KeyError:
            raise LivemorphError(
                f"unknown event {event!r}; expected one of {', '.join(EVENTS)}",
                ErrorCode.INVALID_INPUT,
            ) from None

    def _emit(self, event: Event, payload: EventPayload) -> None:
        if self._buffer is not None:
            self._buffer.append((event, payload))
            return
        for callback in list(self._listeners[event]):
            _call(callback, payload, self._callback_tasks)

    def _flush(self) -> None:
        buffered, self._buffer = self._buffer or [], None
        for event, payload in buffered:
            self._emit(event, payload)

    def _set_state(self, state: ConnectionState) -> None:
        if state != self._state:
            logger.debug("connection %s", state)
            self._state = state
            self._emit("connection_change", state)

    def _report(self, error: LivemorphError) -> None:
        if error is not self._reported:
            self._reported = error
            self._emit("error", error)

    # -- connecting --------------------------------------------------------------------------

    async def _start(self) -> None:
        """The first connect: retries transient failures, raises the last error."""
        self._set_state("connecting")
        try:
            await self._connect_with_retries()
        except BaseException:
            self._closing = True
            self._buffer = None
            self._release()
            self._set_state("disconnected")
            raise
        assert self._signaling is not None
        self._set_state(self._signaling.state)
        asyncio.get_running_loop().call_soon(self._flush)

    async def _connect_with_retries(self) -> None:
        delays = self._retry.delays()
        self._negotiating = True
        try:
            for attempt in itertools.count():
                try:
                    await self._attempt()
                    return
                except LivemorphError as error:
                    if self._closing or not should_retry(error) or attempt >= len(delays):
                        raise
                    logger.warning(
                        "connect attempt %d failed: %s; retrying in %gs",
                        attempt + 1,
                        error.message,
                        delays[attempt],
                    )
                    await asyncio.sleep(delays[attempt])
        finally:
            self._negotiating = False

    async def _attempt(self) -> None:
        signaling: Signaling

        def on_event(event: SignalEvent) -> None:
            self._on_signal(signaling, event)

        signaling = Signaling(
            self._url,
            on_event=on_event,
            ice_servers=self._ice_servers,
            handed_ice_servers=self._handed_ice_servers,
            customize_offer=self._customize_offer,
            fast_receive=self._fast_receive,
            ssl=self._ssl,
        )
        self._signaling = signaling
        self._ended_by_server = None
        try:
            await signaling.open()
            await self._prepare(signaling)
            await signaling.negotiate(
                [_Outlet(track) for track in self._send],
                receive=self._receive,
                connect_timeout=self._connect_timeout,
            )
            if signaling.ended:
                raise signaling.end_error or LivemorphError(
                    "connection closed", ErrorCode.WEB_RTC_ERROR
                )
        except BaseException as exc:
            await signaling.close()
            if self._signaling is signaling:
                self._signaling = None
            if isinstance(exc, LivemorphError) or not isinstance(exc, Exception):
                raise
            raise LivemorphError(f"connection failed: {exc}", ErrorCode.WEB_RTC_ERROR) from exc
        finally:
            self._handed_ice_servers = signaling.handed_ice_servers

    async def _prepare(self, signaling: Signaling) -> None:
        """Messages to exchange before the offer (a publisher's initial state)."""

    def _on_session(self, info: SubscribeTarget) -> None:
        """A `session_id` message arrived."""

    def _on_signal(self, signaling: Signaling, event: SignalEvent) -> None:
        if signaling is not self._signaling or self._closing:
            return  # a stale attempt, or we are shutting down
        match event:
            case MediaStreamTrack():
                self._remote[event.kind] = event
                track = self._relay.subscribe(event)
                if event.kind == "video":
                    self._video_track = track
                else:
                    self._audio_track = track
                if self._recording is not None:
                    self._recording.follow(event.kind, self._relay.subscribe(event))
                if self._on_remote_stream is not None:
                    _call(self._on_remote_stream, track, self._callback_tasks)
            case SubscribeTarget():
                self._on_session(event)
            case GenerationTick():
                self._emit("generation_tick", event)
            case GenerationEnded():
                self._ended_by_server = event
                self._emit("generation_ended", event)
            case LivemorphError():
                if not self._negotiating:  # while connecting, the attempt's outcome reports it
                    self._report(event)
            case StateChanged(state=state) if not self._negotiating:
                if state == "disconnected":
                    self._on_drop(signaling)
                else:
                    self._set_state(state)

    def _on_drop(self, signaling: Signaling) -> None:
        if self._supervisor is not None and not self._supervisor.done():
            return
        error = signaling.end_error or LivemorphError("connection lost", ErrorCode.WEB_RTC_ERROR)
        ended = self._ended_by_server
        if (ended is not None and ended.reason in FINAL_END_REASONS) or not should_retry(error):
            report = ended is None
            self._supervisor = asyncio.create_task(self._give_up(signaling, error, report))
        else:
            logger.warning("session dropped (%s); reconnecting", error.message)
            self._supervisor = asyncio.create_task(self._reconnect(signaling))

    async def _give_up(self, signaling: Signaling, error: LivemorphError, report: bool) -> None:
        await signaling.close()
        if self._signaling is signaling:
            self._signaling = None
        self._set_state("disconnected")
        if report:
            self._report(error)

    async def _reconnect(self, old: Signaling) -> None:
        self._set_state("reconnecting")
        await old.close()
        try:
            await self._connect_with_retries()
        except LivemorphError as error:
            if not self._closing:
                self._set_state("disconnected")
                self._report(error)
            return
        if self._signaling is not None:
            self._set_state(self._signaling.state)

    def _release(self) -> None:
        for track in [*self._send, *self._owned_tracks]:
            track.stop()  # as closing a peer connection stops its tracks
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None


class RealtimeClient(_LiveConnection):
    """A publishing session: your video in, the transformed video out; for `live_avatar`,
    a portrait and your audio in, the talking portrait and its voice out.

    Get one from `client.realtime.connect(...)`.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str,
        prompt: tuple[str, bool] | None = None,
        image: bytes | None = None,
        http: httpx.AsyncClient | None = None,
        clip_track: ClipAudioTrack | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        self.model = model
        self._prompt = prompt
        self._image = image
        self._http = http
        self._clip_track = clip_track
        self._session: SubscribeTarget | None = None

    @property
    def session_id(self) -> str | None:
        return self._session.session_id if self._session else None

    @property
    def subscribe_token(self) -> str | None:
        """A token another client passes to `client.realtime.subscribe()` to watch this."""
        if self._session is None:
            return None
        return encode_subscribe_token(self._session)

    async def set(
        self,
        prompt: str | None = None,
        enhance: bool = True,
        image: ImageInput | _Unset | None = UNSET,
    ) -> None:
        """Change the prompt, the reference image, or both; waits for the server's ack.

        `image=None` clears the reference image; leaving it out keeps it.
        """
        if prompt is None and isinstance(image, _Unset):
            raise LivemorphError("give a prompt, an image, or both", ErrorCode.INVALID_INPUT)
        if isinstance(image, _Unset):
            assert prompt is not None
            await self.set_prompt(prompt, enhance)
        else:
            await self.set_image(image, prompt=prompt, enhance=enhance)

    @property
    def enhanced_prompt(self) -> str | None:
        """How the server's engine read the current prompt when `enhance` was on: the fuller
        description it renders (sent as `enhanced_prompt` in the acks), or None."""
        return self._signaling.enhanced_prompt if self._signaling is not None else None

    async def passthrough(self) -> None:
        """Stop transforming: clear the prompt and the image until the next `set`."""
        self._keep_portrait(None)
        await self._live().send_image(None, ack_timeout=IMAGE_TIMEOUT, passthrough=True)
        self._prompt = None
        self._image = None

    async def set_prompt(self, text: str, enhance: bool = True) -> None:
        """Send a prompt and wait (15 s) for its ack; refused → INVALID_INPUT."""
        _checked_prompt(text)
        await self._live().send_prompt(text, enhance, ack_timeout=PROMPT_TIMEOUT)
        self._prompt = (text, enhance)

    async def set_image(
        self,
        image: ImageInput | None,
        prompt: str | None = None,
        enhance: bool = True,
        timeout: float = IMAGE_TIMEOUT,  # noqa: ASYNC109 - the published SDKs' signature
    ) -> None:
        """Send a reference image (None clears it), maybe with a prompt, and wait for its ack.

        Images over 10 MB are refused here, before anything is sent. For `live_avatar` the
        image is the portrait: a new one replaces it, None is refused.
        """
        self._keep_portrait(image)
        if prompt is not None:
            _checked_prompt(prompt)
        data = None if image is None else await image_bytes(image, self._http)
        signaling = self._live()
        await signaling.send_image(
            data, prompt, enhance if prompt is not None else None, ack_timeout=timeout
        )
        self._image = data
        if prompt is not None:
            self._prompt = (prompt, enhance)

    async def play_audio(self, audio: AudioInput, sample_rate: int | None = None) -> bool:
        """Play a clip through the avatar (`live_avatar` connected with no audio source).

        `audio` is an audio file's bytes (WAV, MP3, Ogg, ... anything FFmpeg decodes), its
        path, a binary file object, or a numpy array of samples, float in -1..1 or int16,
        shaped (n,) or (n, channels), with its `sample_rate`. The clip is sent on the
        session's audio track (mixed to mono, 48 kHz) in place of the silence sent between
        clips; the avatar speaks it and its voice comes back on `audio_track`, in step with
        the mouth. Nothing plays on the local speakers.

        Returns once the clip has been sent, about its own length later: True when it was
        played to the end; False when it was stopped first, by a later `play_audio` (which
        stops the clip under way, as the published clients do), by `stop_audio()`, by a
        dropped connection or by `disconnect()`. Cancelling the call stops the clip too.
        Raises INVALID_INPUT for audio that cannot be decoded, and for a session that sends
        an audio source of its own (a microphone, a file): that one is the voice.
        """
        track = self._clip_track
        if track is None:
            reason = (
                "it sends an audio source of its own"
                if self.model == AVATAR_MODEL
                else f"model {self.model} is not an avatar"
            )
            raise LivemorphError(
                "play_audio() is only available for live_avatar connected without an audio "
                f"source (connect(None, ...)); this session cannot: {reason}",
                ErrorCode.INVALID_INPUT,
            )
        self._live()
        claim = track.claim()
        samples = await asyncio.to_thread(decode_audio, audio, sample_rate)
        if track.is_current(claim):
            self._live()  # the connection dropped while the clip was decoded
        done = track.play(samples, claim)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done():
                track.stop_clip()
            raise

    def stop_audio(self) -> None:
        """Stop the clip that `play_audio` is sending, if any; silence follows."""
        if self._clip_track is not None:
            self._clip_track.stop_clip()

    async def __aenter__(self) -> RealtimeClient:
        return self

    def _keep_portrait(self, image: object) -> None:
        if self.model == AVATAR_MODEL and image is None:
            raise LivemorphError(
                "live_avatar needs its portrait: replace it with set_image(new_portrait), "
                "it cannot be cleared",
                ErrorCode.INVALID_INPUT,
            )

    def _set_state(self, state: ConnectionState) -> None:
        if state in ("reconnecting", "disconnected") and self._clip_track is not None:
            # nobody sends the clip any more: its caller hears False, not a hang
            self._clip_track.stop_clip()
        super()._set_state(state)

    def _live(self) -> Signaling:
        signaling = self._signaling
        if signaling is None or signaling.ended or self._negotiating:
            raise LivemorphError(f"not connected (state: {self._state})", ErrorCode.WEB_RTC_ERROR)
        return signaling

    async def _prepare(self, signaling: Signaling) -> None:
        if self.model == AVATAR_MODEL and self._image is not None:
            # the browser client's order: the portrait alone, then the prompt, then the offer
            await signaling.send_image(self._image, ack_timeout=IMAGE_TIMEOUT)
            if self._prompt is not None:
                await signaling.send_prompt(*self._prompt, ack_timeout=PROMPT_TIMEOUT)
        elif self._image is not None:
            text, enhance = self._prompt if self._prompt else (None, None)
            await signaling.send_image(self._image, text, enhance, ack_timeout=IMAGE_TIMEOUT)
        elif self._prompt is not None:
            await signaling.send_prompt(*self._prompt, ack_timeout=PROMPT_TIMEOUT)
        else:
            await signaling.send_image(None, ack_timeout=IMAGE_TIMEOUT, passthrough=True)

    def _on_session(self, info: SubscribeTarget) -> None:
        self._session = info


class Subscription(_LiveConnection):
    """A viewer of another session's output; it can watch but never steer."""

    def __init__(self, url: str, *, target: SubscribeTarget, **options: Any) -> None:
        super().__init__(url, **options)
        self._target = target

    @property
    def session_id(self) -> str:
        return self._target.session_id

    async def __aenter__(self) -> Subscription:
        return self


class RealtimeAPI:
    """`client.realtime`: start publishing sessions and viewers."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def connect(
        self,
        stream: StreamInput,
        *,
        model: ModelSpec | str,
        on_remote_stream: RemoteStreamCallback | None = None,
        initial_state: InitialState | None = None,
        avatar: AvatarState | None = None,
        customize_offer: OfferHook | None = None,
        ice_servers: Iterable[RTCIceServer] = (),
        retry: RetryPolicy | None = None,
        connect_timeout: float = 30.0,
        fast_receive: bool = True,
    ) -> RealtimeClient:
        """Start a session that transforms `stream` with `model`; returns once connected.

        `stream` is a video track, a sequence of tracks, or a player with `.video`.
        `model` is a `ModelSpec` or a model name. `initial_state` is
        `{"prompt": {"text": ..., "enhance": True} | str, "image": ...}`, applied before the
        first frame. `on_remote_stream(track)` runs once per remote track. The peer
        connection uses `ice_servers`, then those the server hands over (its
        `--ice-servers`, in an `ice_servers` message before the opening ack); with neither,
        no STUN or TURN: the server is reached directly.
        `fast_receive=False` keeps aiortc's stock receive path (one frame slower; for
        comparison, or should aiortc's internals change).

        `live_avatar` animates a portrait instead: `avatar={"image": portrait}` (bytes, a
        path, base64, a URL or an RGB array; the published Python client's
        `initial_state={"image": ...}` works too), and `stream` None, then `play_audio()`
        makes it speak, or an audio source (`sources.microphone()`, `sources.file(path)`,
        an audio track) that it listens to. The portrait is sent and acknowledged first,
        then the prompt, then the offer (video received only, audio both ways); the
        avatar's voice comes back on the session's `audio_track`.
        """
        name, url_path = _model_target(model)
        prompt, image_input = _initial_state(initial_state)
        image_input = _portrait(name, avatar, image_input)
        image = None
        if image_input is not None:
            image = await image_bytes(image_input, self._client._http)
        send, receive, owned = _media_plan(name, stream)
        clip_track = next((t for t in owned if isinstance(t, ClipAudioTrack)), None)
        query = urlencode(
            {"api_key": self._client.api_key, "model": name, "user_agent": USER_AGENT}
        )
        session = RealtimeClient(
            f"{self._client.ws_base_url}{url_path}?{query}",
            model=name,
            prompt=prompt,
            image=image,
            http=self._client._http,
            clip_track=clip_track,
            on_remote_stream=on_remote_stream,
            send=send,
            receive=receive,
            ice_servers=ice_servers,
            customize_offer=customize_offer,
            retry=retry or RetryPolicy(),
            connect_timeout=connect_timeout,
            fast_receive=fast_receive,
            ssl=self._client.ssl,
        )
        session._owned_tracks = owned
        await self._start(session)
        return session

    async def subscribe(
        self,
        token: str,
        *,
        on_remote_stream: RemoteStreamCallback | None = None,
        ice_servers: Iterable[RTCIceServer] = (),
        retry: RetryPolicy | None = None,
        connect_timeout: float = 30.0,
        fast_receive: bool = True,
    ) -> Subscription:
        """Watch the session that `token` (a publisher's `subscribe_token`) names.

        `ice_servers` as for `connect`; the server's own are used when they arrive before
        the offer is made (a viewer offers at once) and on every retry and reconnect."""
        try:
            target = decode_subscribe_token(token)
        except ValueError:
            raise LivemorphError("invalid subscribe token", ErrorCode.INVALID_INPUT) from None
        query = urlencode(
            {"IP": target.ip, "port": str(target.port), "api_key": self._client.api_key}
        )
        path = f"/subscribe/{quote(target.session_id, safe='')}"
        viewer = Subscription(
            f"{self._client.ws_base_url}{path}?{query}",
            target=target,
            on_remote_stream=on_remote_stream,
            send=(),
            receive=("video", "audio"),
            ice_servers=ice_servers,
            customize_offer=None,
            retry=retry or RetryPolicy(),
            connect_timeout=connect_timeout,
            fast_receive=fast_receive,
            ssl=self._client.ssl,
        )
        await self._start(viewer)
        return viewer

    async def _start(self, connection: _LiveConnection) -> None:
        sessions = self._client._sessions
        sessions.add(connection)
        connection._on_close = sessions.discard
        await connection._start()


def _checked_prompt(text: object) -> str:
    """`text`, once it is a prompt the server takes (docs/protocol.md)."""
    try:
        return check_prompt(text)
    except ValueError as exc:
        raise LivemorphError(str(exc), ErrorCode.INVALID_INPUT) from None


def _model_target(model: object) -> tuple[str, str]:
    """The model's name and WebSocket path; unknown names go to the server to refuse."""
    if isinstance(model, str):
        spec = CATALOG.get(model)
        return model, spec.url_path if spec else "/v1/stream"
    name = getattr(model, "name", None)
    if not isinstance(name, str) or not name:
        raise LivemorphError("model must be a ModelSpec or a model name", ErrorCode.INVALID_INPUT)
    return name, str(getattr(model, "url_path", None) or "/v1/stream")


def _initial_state(
    state: Mapping[str, Any] | None,
) -> tuple[tuple[str, bool] | None, ImageInput | None]:
    if state is None:
        return None, None
    if not isinstance(state, Mapping):
        raise LivemorphError("initial_state must be a mapping", ErrorCode.INVALID_INPUT)
    unknown = set(state) - {"prompt", "image"}
    if unknown:
        raise LivemorphError(
            f"unknown initial_state keys: {', '.join(sorted(map(str, unknown)))}",
            ErrorCode.INVALID_INPUT,
        )
    prompt = state.get("prompt")
    parsed: tuple[str, bool] | None = None
    if isinstance(prompt, str):
        _checked_prompt(prompt)
        parsed = (prompt, True)
    elif isinstance(prompt, Mapping):
        text = _checked_prompt(prompt.get("text"))
        parsed = (text, bool(prompt.get("enhance", True)))
    elif prompt is not None:
        raise LivemorphError(
            "initial_state prompt must be a string or {text, enhance}", ErrorCode.INVALID_INPUT
        )
    return parsed, state.get("image")


def _portrait(model: str, avatar: Mapping[str, Any] | None, image: Any) -> Any:
    """The image to send first: for `live_avatar` the portrait, which it cannot do without."""
    if model != AVATAR_MODEL:
        if avatar is not None:
            raise LivemorphError(
                f"avatar is only for live_avatar; model {model} transforms a camera "
                "(use initial_state={'image': ...} for a reference image)",
                ErrorCode.INVALID_INPUT,
            )
        return image
    portrait = None
    if avatar is not None:
        if not isinstance(avatar, Mapping):
            raise LivemorphError(
                "avatar must be a mapping: avatar={'image': portrait}", ErrorCode.INVALID_INPUT
            )
        unknown = set(avatar) - {"image", "avatar_image"}
        if unknown:
            raise LivemorphError(
                f"unknown avatar keys: {', '.join(sorted(map(str, unknown)))}; "
                "expected avatar={'image': portrait}",
                ErrorCode.INVALID_INPUT,
            )
        given = [avatar[key] for key in ("image", "avatar_image") if avatar.get(key) is not None]
        if len(given) > 1:
            raise LivemorphError("give the portrait once", ErrorCode.INVALID_INPUT)
        portrait = given[0] if given else None
    if portrait is not None and image is not None:
        raise LivemorphError(
            "give the portrait once: avatar={'image': ...} or initial_state={'image': ...}",
            ErrorCode.INVALID_INPUT,
        )
    portrait = image if portrait is None else portrait
    if portrait is None:
        raise LivemorphError(
            "live_avatar needs a portrait to animate: connect(None, model='live_avatar', "
            "avatar={'image': portrait}) with bytes, a path, base64 or an RGB array",
            ErrorCode.INVALID_INPUT,
        )
    return portrait


def _tracks_of(stream: StreamInput, *, with_audio: bool) -> list[MediaStreamTrack]:
    if stream is None:
        return []
    if isinstance(stream, MediaStreamTrack):
        return [stream]
    if isinstance(stream, Sequence):
        if all(isinstance(t, MediaStreamTrack) for t in stream):
            return list(stream)
    elif hasattr(stream, "video") or hasattr(stream, "audio"):  # a MediaPlayer or alike
        found = [getattr(stream, "video", None)]
        if with_audio:
            found.append(getattr(stream, "audio", None))
        return [track for track in found if isinstance(track, MediaStreamTrack)]
    raise LivemorphError(
        "stream must be a MediaStreamTrack, a list of them, or a media player",
        ErrorCode.INVALID_INPUT,
    )


def _media_plan(
    model: str, stream: StreamInput
) -> tuple[list[MediaStreamTrack], tuple[str, ...], list[MediaStreamTrack]]:
    """Tracks to send, kinds to receive only, and tracks we made (and must stop)."""
    if model == AVATAR_MODEL:
        if stream is None:
            clips = ClipAudioTrack()
            return [clips], ("video",), [clips]
        audio = [t for t in _tracks_of(stream, with_audio=True) if t.kind == "audio"]
        if not audio:
            raise LivemorphError(
                "live_avatar listens to audio, and this stream has none: pass None (then "
                "play_audio) or an audio source such as sources.microphone()",
                ErrorCode.INVALID_INPUT,
            )
        return audio[:1], ("video",), []
    tracks = _tracks_of(stream, with_audio=False)
    if not any(track.kind == "video" for track in tracks):
        raise LivemorphError(f"model {model} needs a video track", ErrorCode.INVALID_INPUT)
    return tracks, (), []

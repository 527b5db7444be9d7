"""One publishing session: its peer connection, pipeline, usage clock and viewers."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from ..engines.base import AUDIO_RATE, Controls, EngineSession
from ..media.audio import AudioTap, ClockTrack, DelayedAudioTrack
from ..media.encoder import use_realtime_encoder
from ..media.jitter import install_on_peer_connection
from ..models import ModelSpec
from ..protocol import parse_candidate
from ..storage import Principal
from .metering import INSUFFICIENT_CREDITS_REASON, Meter, Unmetered
from .pipeline import Pipeline

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]


class SessionEnded(Exception):
    """The session is over; `reason` is what `generation_ended` said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_peer_connection() -> RTCPeerConnection:
    """A peer connection with no STUN/TURN: clients reach this node directly."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def add_ice_candidate(pc: RTCPeerConnection, payload: dict[str, Any]) -> None:
    """Apply one trickled candidate (`{candidate, sdpMid, sdpMLineIndex}`)."""
    candidate = parse_candidate(payload)
    if candidate is not None:
        await pc.addIceCandidate(candidate)


class Session:
    """A camera in, transformed video out; torn down completely by `close`."""

    def __init__(
        self,
        spec: ModelSpec,
        principal: Principal,
        engine: EngineSession,
        executor: Executor,
        send: Send,
        *,
        fast_receive: bool = True,
        meter: Meter | None = None,
    ) -> None:
        self.id = secrets.token_urlsafe(12)
        self.meter: Meter = meter or Unmetered()
        self.fast_receive = fast_receive
        self.spec = spec
        self.principal = principal
        self._send = send
        self.controls = Controls()
        self.pipeline = Pipeline(engine, executor, on_first_frame=self._on_first_frame)
        self.relay = MediaRelay()
        self.audio: MediaStreamTrack | None = None
        self.pc: RTCPeerConnection | None = None
        self.viewers: set[Viewer] = set()
        self.seconds = 0
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- control ----------------------------------------------------------------------

    async def apply(self, controls: Controls) -> None:
        """Make `controls` govern the next frame, then remember them."""
        await self.pipeline.apply(controls)
        self.controls = controls

    # -- media ------------------------------------------------------------------------

    async def accept_offer(self, sdp: str) -> str:
        """Answer the client's offer: its video goes into the pipeline, its audio comes back."""
        if self.pc is not None:
            raise ValueError("this session already has a peer connection")
        if self.pipeline.engine.listens and self.controls.image is None:
            # "not allowed" tells the published clients not to retry: only a portrait helps
            raise ValueError(
                f"{self.spec.name} needs a portrait image: an offer without one is not allowed;"
                " send set_image with image_data first"
            )
        pc = self.pc = new_peer_connection()
        try:
            return await self._negotiate(pc, sdp)
        except Exception:
            # A refused offer leaves no trace: the client may send a better one.
            self.pc = None
            if self.audio is not None and any(r.track is self.audio for r in pc.getReceivers()):
                self.audio = None
            await pc.close()
            raise

    async def _negotiate(self, pc: RTCPeerConnection, sdp: str) -> str:
        engine = self.pipeline.engine
        listens = engine.listens

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not listens:
                self.pipeline.consume(track)
                pc.addTrack(self.relay.subscribe(self.pipeline.track, buffered=False))
            elif track.kind == "audio" and self.audio is None:
                if listens:
                    # the engine hears the voice; it comes back delayed to meet its frames
                    echo = DelayedAudioTrack(engine.audio_delay)
                    tap = AudioTap(AUDIO_RATE, engine.hear, echo)
                    self._spawn(tap.run(track))
                    self.audio = echo
                else:
                    self.audio = track
                pc.addTrack(self.relay.subscribe(self.audio, buffered=False))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc is not self.pc:
                return  # a refused offer's connection, closed
            if pc.connectionState in ("failed", "closed") and not self._closing:
                logger.info("session %s: peer connection %s", self.id, pc.connectionState)
                await self.close("peer_connection_" + pc.connectionState, notify=False)

        if self.fast_receive:
            install_on_peer_connection(pc)  # before any RTP packet can reach a receiver
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            raise ValueError("the offer has no video")
        kinds_sent = {t.kind for t in pc.getTransceivers() if t.sender.track is not None}
        if "video" not in kinds_sent:
            # A recvonly video offer (an avatar) still gets the model's output.
            pc.addTrack(self.relay.subscribe(self.pipeline.track, buffered=False))
        if listens:
            # no camera: a clock at the model's rate drives the engine
            self.pipeline.consume(ClockTrack(self.spec.fps))
        await pc.setLocalDescription(await pc.createAnswer())
        use_realtime_encoder(pc)
        return pc.localDescription.sdp

    async def add_ice_candidate(self, payload: dict[str, Any]) -> None:
        if self.pc is None:
            raise ValueError("ice-candidate before offer")
        await add_ice_candidate(self.pc, payload)

    # -- usage ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_first_frame(self) -> None:
        self._spawn(self._send({"type": "generation_started"}))
        self._ticker = asyncio.create_task(self._tick(), name=f"ticks-{self.id}")

    async def _tick(self) -> None:
        """Count generated seconds on a drift-free schedule, each one recorded before it is
        announced; end when the key's credits run out or at the token's limit."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        limit = self.principal.max_session_seconds
        while True:
            await asyncio.sleep(max(0.0, start + self.seconds + 1 - loop.time()))
            self.seconds += 1
            has_credits = await self.meter.tick(self)
            await self._send({"type": "generation_tick", "seconds": self.seconds})
            if not has_credits:
                self._spawn(self.close(INSUFFICIENT_CREDITS_REASON))
                return
            if limit is not None and self.seconds >= limit:
                self._spawn(self.close("max_duration"))
                return

    # -- viewers ----------------------------------------------------------------------

    async def add_viewer(self, send: Send) -> Viewer:
        viewer = Viewer(self, send)
        self.viewers.add(viewer)
        return viewer

    # -- teardown ---------------------------------------------------------------------

    async def close(self, reason: str = "client_disconnected", *, notify: bool = True) -> None:
        """End everything this session holds. Safe to call more than once."""
        if self._closing:
            await self.ended.wait()
            return
        self._closing = True
        self.end_reason = reason
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.meter.end(self)  # usage stops being counted now
        if notify:
            await self._send(
                {"type": "generation_ended", "seconds": self.seconds, "reason": reason}
            )
        await asyncio.gather(*(viewer.close() for viewer in list(self.viewers)))
        await self.pipeline.close()
        if self.audio is not None:
            self.audio.stop()
        if self.pc is not None:
            await self.pc.close()
        self.ended.set()
        logger.info("session %s ended (%s) after %ss", self.id, reason, self.seconds)


class Viewer:
    """Watches a session's output through the relay; never steers it."""

    def __init__(self, session: Session, send: Send) -> None:
        self.session = session
        self._send = send
        self.pc: RTCPeerConnection | None = None
        self._tracks: list[MediaStreamTrack] = []
        self.ended = asyncio.Event()

    async def accept_offer(self, sdp: str) -> str:
        if self.pc is not None:
            raise ValueError("this viewer already has a peer connection")
        pc = self.pc = new_peer_connection()
        try:
            return await self._negotiate(pc, sdp)
        except Exception:
            self.pc = None  # a refused offer leaves no trace
            for track in self._tracks:
                track.stop()
            self._tracks.clear()
            await pc.close()
            raise

    async def _negotiate(self, pc: RTCPeerConnection, sdp: str) -> str:
        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc is self.pc and pc.connectionState in ("failed", "closed"):
                await self.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not pc.getTransceivers():
            raise ValueError("the offer has no audio or video")
        sources = {"video": self.session.pipeline.track, "audio": self.session.audio}
        offered = {transceiver.kind for transceiver in pc.getTransceivers()}
        for kind, source in sources.items():
            if source is not None and kind in offered:
                track = self.session.relay.subscribe(source, buffered=False)
                self._tracks.append(track)
                pc.addTrack(track)
        await pc.setLocalDescription(await pc.createAnswer())
        use_realtime_encoder(pc)
        return pc.localDescription.sdp

    async def add_ice_candidate(self, payload: dict[str, Any]) -> None:
        if self.pc is None:
            raise ValueError("ice-candidate before offer")
        await add_ice_candidate(self.pc, payload)

    async def close(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        self.session.viewers.discard(self)
        for track in self._tracks:
            track.stop()
        if self.pc is not None:
            await self.pc.close()

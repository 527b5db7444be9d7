"""One publishing session: its controls, peer connection, pipeline, usage clock and viewers.

The session owns what the client asked for. `set_prompt` and `set_image` ask the policy
(moderation, then enhancement), hand the engine its new controls through the pipeline, and
return the enhanced prompt for the ack, or raise `InputRefused` with the ack's reason.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from ..engines.base import AUDIO_RATE, Controls, EngineRefused, EngineSession, EngineUnavailable
from ..media.audio import AudioTap, ClockTrack, DelayedAudioTrack
from ..media.encoder import use_realtime_encoder
from ..media.frames import image_to_rgb
from ..media.jitter import install_on_peer_connection
from ..media.shared_encoder import SharedVp8Encoder, output_encoder
from ..models import ModelSpec
from ..policy import Expansion, Policy
from ..protocol import (
    Candidate,
    GenerationEnded,
    GenerationStarted,
    GenerationTick,
    IceServer,
    IceServers,
    ServerMessage,
)
from ..storage import Principal
from .metering import INSUFFICIENT_CREDITS_REASON, Meter, Unmetered
from .pipeline import FrameTimings, Pipeline, SessionClosedError

logger = logging.getLogger(__name__)

Send = Callable[[ServerMessage], Awaitable[None]]


class InputRefused(Exception):
    """A prompt or image the session did not apply; `str()` is the ack's `error`, and the
    session goes on as it was."""


class ModerationRefused(InputRefused):
    """An input the policy (moderation) refused, as opposed to one the engine could not
    take: told apart for the server's metrics."""


class SessionEnded(Exception):
    """The session is over; `reason` is what `generation_ended` said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: The output's codec on connections the server offers: VP8, which the shared encoder
#: writes once for every receiver (media/shared_encoder.py), and its retransmissions.
_VP8_ONLY = [
    codec
    for codec in RTCRtpSender.getCapabilities("video").codecs
    if codec.mimeType.lower() in ("video/vp8", "video/rtx")
]


def new_session_id() -> str:
    return secrets.token_urlsafe(12)


#: The node's STUN and TURN servers (`--ice-servers`); none: clients reach it directly.
_ice_servers: tuple[IceServer, ...] = ()


def set_ice_servers(servers: Iterable[IceServer]) -> None:
    """Set the STUN and TURN servers of every peer connection made from now on, and those
    handed to clients (`IceServers`). Called once by `livemorph serve`: a setting of the
    process, as the media modules' are, so it reaches sessions without the server's
    modules passing it down."""
    global _ice_servers
    _ice_servers = tuple(servers)


def new_peer_connection() -> RTCPeerConnection:
    """A peer connection that gathers with the node's ICE servers, if it has any: a node
    behind NAT then offers server-reflexive (STUN) and relayed (TURN) candidates in its
    answer. aiortc reads the first STUN and the first TURN URL it can use (turn: over UDP
    or TCP, turns: over TCP) and waits at most 5 s for them while it answers."""
    servers = [server.to_aiortc() for server in _ice_servers]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


async def hand_ice_servers(send: Send) -> None:
    """Tell a client the node's ICE servers, when it has some (docs/protocol.md)."""
    if _ice_servers:
        await send(IceServers(_ice_servers))


async def _nowhere(message: ServerMessage) -> None:
    """The `send` of an output whose signaling is not the protocol's JSON (LiveKit's)."""


async def add_ice_candidate(pc: RTCPeerConnection | None, candidate: Candidate) -> None:
    """Apply one trickled candidate; ValueError before the offer or for a bad line."""
    if pc is None:
        raise ValueError("ice-candidate before offer")
    try:
        parsed = candidate.to_aiortc()
    except (ValueError, IndexError, AssertionError):
        raise ValueError("the candidate line does not parse") from None
    await pc.addIceCandidate(parsed)


class Session:
    """A camera in, transformed video out; torn down completely by `close`."""

    def __init__(
        self,
        spec: ModelSpec,
        principal: Principal,
        engine: EngineSession,
        executor: Executor,
        send: Send,
        policy: Policy,
        *,
        fast_receive: bool = True,
        meter: Meter | None = None,
        timings: FrameTimings | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or new_session_id()
        self.meter: Meter = meter or Unmetered()
        self.policy = policy
        self.fast_receive = fast_receive
        self.spec = spec
        self.principal = principal
        self._send = send
        self.controls = Controls()
        self.pipeline = Pipeline(
            engine, executor, on_first_frame=self._on_first_frame, timings=timings
        )
        self.relay = MediaRelay()
        #: One VP8 encode of each output frame for the publisher's and every viewer's
        #: sender (None: each its own); media/shared_encoder.py.
        self.video_encoder: SharedVp8Encoder | None = output_encoder()
        self.audio: MediaStreamTrack | None = None
        self.pc: RTCPeerConnection | None = None
        self.viewers: set[Viewer] = set()
        #: The client's own output on connections the server offers (LiveKit's rooms).
        self.outputs: set[Viewer] = set()
        self.seconds = 0
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self._clocked = False

    # -- control ----------------------------------------------------------------------

    async def set_prompt(self, prompt: str, enhance: bool | None = None) -> str | None:
        """Restyle by `prompt` from the next frame on (`enhance` None: on); returns the
        enhanced prompt for the ack, if any. Raises `InputRefused`; `SessionClosedError`
        when the session ended meanwhile."""
        enhance = True if enhance is None else enhance
        if (refused := await self.policy.refusal(prompt=prompt)) is not None:
            logger.info("session %s: %s", self.id, refused)
            raise ModerationRefused(refused)
        expansion = await self.policy.expand(prompt, enhance)
        await self.apply(Controls(expansion.prompt, enhance, self.controls.image))
        return self._enhanced(expansion)

    async def set_image(
        self, image: bytes | None, prompt: str | None = None, enhance: bool | None = None
    ) -> str | None:
        """Set the reference image from its file's bytes (None clears it), with a new
        prompt or keeping the current one; `enhance` None keeps the current setting. The
        prompt and the image are moderated together: a refusal of either applies neither.
        Returns the enhanced prompt for the ack, if any; raises as `set_prompt`."""
        enhance = self.controls.enhance if enhance is None else enhance
        if (refused := await self.policy.refusal(prompt=prompt, image=image)) is not None:
            logger.info("session %s: %s", self.id, refused)
            raise ModerationRefused(refused)
        rgb = None
        if image is not None:
            try:
                rgb = await asyncio.to_thread(image_to_rgb, image)
            except ValueError as exc:
                raise InputRefused(f"invalid image: {exc}") from None
        if prompt is None:
            await self.apply(Controls(self.controls.prompt, enhance, rgb))
            return self._enhanced()
        expansion = await self.policy.expand(prompt, enhance)
        await self.apply(Controls(expansion.prompt, enhance, rgb))
        return self._enhanced(expansion)

    async def passthrough(self) -> None:
        """No transformation until the next prompt or image."""
        await self.apply(Controls())

    async def apply(self, controls: Controls) -> None:
        """Make `controls` govern the next frame, then remember them; `InputRefused` when the
        engine cannot take them (the pipeline logs why), and the old ones stay."""
        try:
            await self.pipeline.apply(controls)
        except SessionClosedError:
            raise
        except EngineUnavailable as exc:
            raise InputRefused(f"the engine could not apply this input: {exc.public}") from None
        except EngineRefused as exc:
            raise InputRefused(str(exc)) from None
        except Exception:
            raise InputRefused("the engine could not apply this input") from None
        self.controls = controls

    def _enhanced(self, expansion: Expansion | None = None) -> str | None:
        """The fuller reading of the prompt for the ack: the enhancer's expansion when it
        made one (it logs it), else the engine's own when enhancement is on."""
        if expansion is not None and expansion.enhanced is not None:
            return expansion.enhanced
        description = self.pipeline.engine.description
        if not description or not self.controls.enhance or self.controls.prompt is None:
            return None
        logger.info(
            "session %s: prompt %r enhanced to %r", self.id, self.controls.prompt, description
        )
        return description

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

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if (back := self._take(track)) is not None:
                pc.addTrack(self.relay.subscribe(back, buffered=False))

        self._watch(pc)
        if self.fast_receive:
            install_on_peer_connection(pc)  # before any RTP packet can reach a receiver
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            raise ValueError("the offer has no video")
        kinds_sent = {t.kind for t in pc.getTransceivers() if t.sender.track is not None}
        if "video" not in kinds_sent:
            # A recvonly video offer (an avatar) still gets the model's output.
            pc.addTrack(self.relay.subscribe(self.pipeline.track, buffered=False))
        if engine.listens:
            # no camera: a clock at the model's rate drives the engine
            self.pipeline.consume(ClockTrack(self.spec.fps))
        await pc.setLocalDescription(await pc.createAnswer())
        use_realtime_encoder(pc, self.video_encoder)
        return pc.localDescription.sdp

    def _take(self, track: MediaStreamTrack) -> MediaStreamTrack | None:
        """Route one of the client's tracks: video into the pipeline (the engine's output
        goes back), audio to the engine that listens (its echo, delayed to meet the frames,
        goes back) or straight back. Returns what goes back for it, if anything."""
        engine = self.pipeline.engine
        if track.kind == "video" and not engine.listens:
            self.pipeline.consume(track)
            return self.pipeline.track
        if track.kind == "audio" and self.audio is None:
            if engine.listens:
                echo = DelayedAudioTrack(engine.audio_delay)
                tap = AudioTap(AUDIO_RATE, engine.hear, echo)
                self._spawn(tap.run(track))
                self.audio = echo
            else:
                self.audio = track
            return self.audio
        return None

    def _watch(self, pc: RTCPeerConnection) -> None:
        """End the session when the client's connection fails or closes."""

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc is not self.pc:
                return  # a refused offer's connection, closed
            if pc.connectionState in ("failed", "closed") and not self._closing:
                logger.info("session %s: peer connection %s", self.id, pc.connectionState)
                await self.close("peer_connection_" + pc.connectionState, notify=False)

    async def accept_publisher_offer(self, sdp: str) -> str:
        """Answer an offer on LiveKit's publisher connection: the client's camera (and
        microphone) in, nothing out (the output goes to the client on a connection the
        server offers, a `Viewer`). The client offers again on the same connection as it
        adds tracks: its first offer carries data channels alone, which are accepted and
        left unread. ValueError for an offer that cannot be applied."""
        engine = self.pipeline.engine
        first = self.pc is None
        pc = self.pc if self.pc is not None else new_peer_connection()
        if first:
            self.pc = pc

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                self._take(track)

            self._watch(pc)
            if self.fast_receive:
                install_on_peer_connection(pc)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            media = {t.kind for t in pc.getTransceivers()}
            if media and engine.listens and self.controls.image is None:
                raise ValueError(
                    f"{self.spec.name} needs a portrait image: media without one is not "
                    "allowed; send set_image with image_data first"
                )
            if engine.listens and "audio" in media and not self._clocked:
                self._clocked = True
                self.pipeline.consume(ClockTrack(self.spec.fps))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            if first:
                self.pc = None
                await pc.close()
            raise
        return pc.localDescription.sdp

    async def drop_publisher(self) -> None:
        """Close the client's connection without ending the session: its LiveKit
        participant left or was replaced, and a new one may join the room. The engine
        keeps its controls; the next camera track takes the old one's place."""
        pc, self.pc = self.pc, None
        if pc is None:
            return
        if self.audio is not None and not self.pipeline.engine.listens:
            self.audio = None  # the client's own track, gone with its connection
        await pc.close()

    async def add_ice_candidate(self, candidate: Candidate) -> None:
        await add_ice_candidate(self.pc, candidate)

    # -- usage ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_first_frame(self) -> None:
        self._spawn(self._send(GenerationStarted()))
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
            await self._send(GenerationTick(self.seconds))
            if not has_credits:
                self._spawn(self.close(INSUFFICIENT_CREDITS_REASON))
                return
            if limit is not None and self.seconds >= limit:
                self._spawn(self.close("max_duration"))
                return

    # -- viewers ----------------------------------------------------------------------

    async def add_viewer(self, send: Send) -> Viewer:
        """A viewer that talks through `send`; it hears the node's ICE servers first."""
        viewer = Viewer(self, send)
        self.viewers.add(viewer)
        await hand_ice_servers(send)
        return viewer

    def add_output(self, *, watcher: bool) -> Viewer:
        """A connection of the output that the server offers (LiveKit's subscriber
        connection): a viewer's when `watcher`, else the publishing client's own, which
        is not one of the session's viewers. Closed with the session."""
        viewer = Viewer(self, _nowhere)
        (self.viewers if watcher else self.outputs).add(viewer)
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
            await self._send(GenerationEnded(self.seconds, reason))
        await asyncio.gather(*(v.close() for v in [*self.viewers, *self.outputs]))
        await self.pipeline.close()
        if self.audio is not None:
            self.audio.stop()
        if self.pc is not None:
            await self.pc.close()
        if self.video_encoder is not None:
            self.video_encoder.release()
        self.ended.set()
        logger.info("session %s ended (%s) after %ss", self.id, reason, self.seconds)
        if (encoder := self.video_encoder) is not None and encoder.encodes:
            logger.info(
                "session %s: %d frames encoded, %d sent by its senders (%d keyframes, "
                "%d frames skipped waiting for one)",
                self.id,
                encoder.encodes,
                encoder.deliveries,
                encoder.keyframes,
                encoder.skips,
            )


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
        self._watch(pc)
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
        use_realtime_encoder(pc, self.session.video_encoder)
        return pc.localDescription.sdp

    def _watch(self, pc: RTCPeerConnection) -> None:
        """Let the viewer go when its connection fails or closes."""

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc is self.pc and pc.connectionState in ("failed", "closed"):
                await self.close()

    async def offer(self) -> str:
        """The server's offer of the session's output, for a client that answers (LiveKit's
        subscriber connection): the video, in VP8 from the session's shared encoder, and
        the audio when the session has some. `accept_answer` completes it."""
        if self.pc is not None:
            raise ValueError("this viewer already has a peer connection")
        pc = self.pc = new_peer_connection()
        self._watch(pc)
        sources = {"video": self.session.pipeline.track, "audio": self.session.audio}
        for kind, source in sources.items():
            if source is None:
                continue
            track = self.session.relay.subscribe(source, buffered=False)
            self._tracks.append(track)
            transceiver = pc.addTransceiver(track, direction="sendonly")
            if kind == "video":
                transceiver.setCodecPreferences(_VP8_ONLY)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp

    async def offer_audio(self) -> str | None:
        """Offer again with the session's audio added, once the session has some (the
        avatar's voice starts with its client's microphone, after the first offer); None
        when there is none yet, it is already offered, or the last offer is unanswered."""
        pc, audio = self.pc, self.session.audio
        if pc is None or audio is None or pc.signalingState != "stable":
            return None
        if any(t.kind == "audio" for t in pc.getTransceivers()):
            return None
        track = self.session.relay.subscribe(audio, buffered=False)
        self._tracks.append(track)
        pc.addTransceiver(track, direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        """Apply the client's answer to `offer`; ValueError when there was no offer."""
        if self.pc is None or self.pc.signalingState != "have-local-offer":
            raise ValueError("an answer without an offer")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        use_realtime_encoder(self.pc, self.session.video_encoder)

    def media(self) -> list[tuple[str, str]]:
        """(mid, kind) of each media section this viewer's connection sends."""
        if self.pc is None:
            return []
        return [(t.mid or "", t.kind) for t in self.pc.getTransceivers() if t.mid is not None]

    async def add_ice_candidate(self, candidate: Candidate) -> None:
        await add_ice_candidate(self.pc, candidate)

    async def close(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        self.session.viewers.discard(self)
        self.session.outputs.discard(self)
        for track in self._tracks:
            track.stop()
        if self.pc is not None:
            await self.pc.close()

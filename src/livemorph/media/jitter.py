"""A video jitter buffer for aiortc that hands a frame on as soon as its last packet is in,
and an audio jitter buffer that holds one packet instead of four.

aiortc's `JitterBuffer` releases a frame only when the first packet of the *next* frame
arrives, ignoring the RTP marker bit that ends a frame. That adds one frame interval
(40 ms at 25 fps, 100 ms at 10 fps) to every WebRTC hop. `LowLatencyJitterBuffer` keeps all
of aiortc's behaviour (loss, reordering, PLI, capacity) and adds the marker-bit release.

For audio aiortc prefetches four packets: a 20 ms Opus packet is released only when four
more have arrived, 80 ms after it could be. The avatar hears the client's voice through
it, and the client hears the avatar's voice back through another: 160 ms of a round trip,
and an avatar whose mouth (drawn from what the server heard, sent at once) runs 30-40 ms
ahead of its voice at an aiortc client (bench/avatar.py). `AUDIO_PREFETCH` packets (one:
20 ms, the wait for the next packet that aiortc's buffer always has) is what we keep.
"""

from __future__ import annotations

import logging

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

logger = logging.getLogger(__name__)

# aiortc keeps the buffer in a name-mangled private attribute; we check it before swapping.
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
_VIDEO_CAPACITY = 512  # what aiortc uses for video
#: Audio packets held before one is released (aiortc: 4).
AUDIO_PREFETCH = 1
_warned = False


class LowLatencyJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, plus release of a frame once its packets are complete.

    A frame is complete when the packets from the buffer origin (the frame's first packet)
    up to the one carrying the marker bit are all present, contiguous and share one RTP
    timestamp. Its packets are then removed, so the stock "next frame started" path can never
    emit it again; packets that still carry a released frame's timestamp (padding sent after
    the marker) are discarded instead of becoming an empty frame. As with aiortc, the origin
    is trusted to be a frame start (only the stream's first packet or a resync can break
    that, and the decoder error then triggers a PLI), and at most one frame leaves per
    packet: a frame completed behind a just-filled gap leaves with the next packet.
    """

    def __init__(self, capacity: int = _VIDEO_CAPACITY) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self._released: int | None = None  # RTP timestamp of the last frame handed on

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        self._drop_released()
        # The stock path first: it still serves senders that never set the marker bit.
        frame = super()._remove_frame(sequence_number) or self._remove_complete_frame()
        if frame is not None:
            self._released = frame.timestamp
        return frame

    def _drop_released(self) -> None:
        """Discard packets at the origin that belong to a frame already handed on."""
        while self._origin is not None and self._released is not None:
            packet = self._packets[self._origin % self.capacity]
            if packet is None or packet.timestamp != self._released:
                return
            self.remove(1)

    def _remove_complete_frame(self) -> JitterFrame | None:
        """Pop the frame at the origin if all its packets through the marker are in."""
        if self._origin is None:
            return None
        packets: list[RtpPacket] = []
        for count in range(self.capacity):
            expected = uint16_add(self._origin, count)
            packet = self._packets[expected % self.capacity]
            if packet is None or packet.sequence_number != expected:
                return None  # a gap: wait for the missing packet (or a retransmission)
            if packets and packet.timestamp != packets[0].timestamp:
                return None  # next frame began without a marker; the stock path handles it
            packets.append(packet)
            if packet.marker:
                self.remove(len(packets))
                return JitterFrame(
                    data=b"".join(p._data for p in packets),  # type: ignore[attr-defined]
                    timestamp=packets[0].timestamp,
                )
        return None


def _warn_once(message: str, *args: object) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(message, *args)


def install_low_latency_jitter_buffer(receiver: RTCRtpReceiver) -> bool:
    """Swap a video receiver's jitter buffer for `LowLatencyJitterBuffer`; True on success.

    Call it before the receiver's first RTP packet. aiortc delivers packets to a receiver
    only after `receiver.receive()`, which the peer connection runs once ICE and DTLS are
    connected — strictly after `setRemoteDescription` has emitted the "track" event (even
    on renegotiation over a live connection, `receive()` is scheduled after the event). So
    a "track" handler (sync, or async before its first await), or any point between creating
    the transceiver and the connection coming up, is early enough. A buffer that already
    holds packets is left alone (swapping it would drop a partial frame). Returns False for
    a non-video receiver, and (warning once per process) when aiortc's internals no longer
    look as expected or it is too late.
    """
    current = getattr(receiver, _ATTRIBUTE, None)
    if isinstance(current, LowLatencyJitterBuffer):
        return True
    kind = (
        receiver.track.kind if receiver.track else getattr(receiver, "_RTCRtpReceiver__kind", None)
    )
    if kind != "video":
        return False
    if type(current) is not JitterBuffer or not getattr(current, "_is_video", False):
        _warn_once("aiortc receiver internals changed (%r); keeping its jitter buffer", current)
        return False
    if current._origin is not None:
        _warn_once("receiver already got RTP packets; low-latency jitter buffer installed too late")
        return False
    setattr(receiver, _ATTRIBUTE, LowLatencyJitterBuffer(capacity=current.capacity))
    return True


def install_short_audio_prefetch(receiver: RTCRtpReceiver) -> bool:
    """Give an audio receiver a jitter buffer that prefetches `AUDIO_PREFETCH` packets.

    Same conditions as the video buffer: aiortc's own buffer, not yet fed. Returns False
    (warning once) when aiortc's internals no longer look as expected or it is too late,
    and for a receiver that is not audio.
    """
    current = getattr(receiver, _ATTRIBUTE, None)
    kind = (
        receiver.track.kind if receiver.track else getattr(receiver, "_RTCRtpReceiver__kind", None)
    )
    if kind != "audio":
        return False
    if type(current) is not JitterBuffer or getattr(current, "_is_video", True):
        _warn_once("aiortc receiver internals changed (%r); keeping its jitter buffer", current)
        return False
    if current._prefetch == AUDIO_PREFETCH:
        return True
    if current._origin is not None:
        _warn_once("receiver already got RTP packets; short audio prefetch installed too late")
        return False
    setattr(receiver, _ATTRIBUTE, JitterBuffer(capacity=current.capacity, prefetch=AUDIO_PREFETCH))
    return True


def _install(transceiver: object) -> None:
    kind = getattr(transceiver, "kind", None)
    receiver = getattr(transceiver, "receiver", None)
    if kind == "video":
        install_low_latency_jitter_buffer(receiver)  # type: ignore[arg-type]
    elif kind == "audio":
        install_short_audio_prefetch(receiver)  # type: ignore[arg-type]


def install_on_peer_connection(pc: RTCPeerConnection) -> None:
    """Install on every receiver of `pc` (video: marker-bit release; audio: short
    prefetch), now and for tracks that appear later.

    Existing transceivers (from `addTransceiver`/`addTrack` or an applied remote offer) get
    it at once; transceivers created later by `setRemoteDescription` get it from the
    "track" event, which fires before any of their packets can arrive. Call it right after
    creating the connection or at the latest before the remote description's media flows.
    """
    for transceiver in pc.getTransceivers():
        _install(transceiver)

    @pc.on("track")
    def _on_track(track: object) -> None:
        for transceiver in pc.getTransceivers():
            if transceiver.receiver.track is track:
                _install(transceiver)

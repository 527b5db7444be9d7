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

**Loss** (issue: a session froze for seconds on a lossy link). aiortc's buffer waits for a
missing packet until 512 newer ones have come (2.5-5 s of 720p video) and its receiver asks
for a missing packet once: a lost NACK or a lost retransmission froze the picture for that
long, then fed the decoder frames whose references were gone. Here, as libwebrtc does:

- `RepeatingNackGenerator` asks again for a packet still missing after about a round trip
  (measured from its own NACKs to the retransmissions they bring), up to `MAX_NACKS` times,
  and never for one too old to be waited for;
- `LowLatencyJitterBuffer` waits for a missing packet only while it can still help (about
  three round trips, `WAIT_RTTS`, within `MIN_WAIT`..`MAX_WAIT`, and not at all for a gap
  longer than that in the stream's own time, as after a dropout), then gives the broken
  frames up, asks for a keyframe (PLI) and hands on nothing until one comes, asking again
  every `KEYFRAME_RETRY` seconds: the decoder never sees a frame whose reference is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import NackGenerator
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket
from aiortc.utils import uint16_add, uint16_gt

logger = logging.getLogger(__name__)

# aiortc keeps these in name-mangled private attributes; we check them before swapping.
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
_NACK_ATTRIBUTE = "_RTCRtpReceiver__nack_generator"
_VIDEO_CAPACITY = 512  # what aiortc uses for video
#: Audio packets held before one is released (aiortc: 4).
AUDIO_PREFETCH = 1
_warned = False

#: The round trip assumed before one is measured (libwebrtc's default too), seconds.
DEFAULT_RTT = 0.1
#: The least round trip assumed, whatever is measured, seconds.
MIN_RTT = 0.01
#: A gap of more packets than this is not asked for (a keyframe is): a sender keeps a
#: second or so of packets to resend (aiortc 128, libwebrtc more), and a dropout's worth
#: comes back faster than a keyframe from a paced sender, when it comes at all.
MAX_GAP_NACK = 300
#: Times one missing packet is asked for, at most.
MAX_NACKS = 10
#: The frame at the head waits for a missing packet this many round trips...
WAIT_RTTS = 3.0
#: ...but at least and at most this long, seconds.
MIN_WAIT = 0.1
MAX_WAIT = 0.4
#: While no keyframe has come since one was asked for, ask again this often, seconds.
KEYFRAME_RETRY = 0.3
#: Past this long without a keyframe, frames are handed on anyway (a codec whose keyframes
#: this module cannot tell: its decoder's errors still ask for one), seconds.
KEYFRAME_GIVE_UP = 3.0
#: RTP clock rate of video (VP8, H.264).
VIDEO_CLOCK = 90_000

Clock = Callable[[], float]


def is_keyframe(data: bytes) -> bool:
    """Whether a depayloaded frame (as aiortc's VP8 or H.264 depayloader gives it) is a
    keyframe: a VP8 key frame (its P bit clear and the start code 9d 01 2a), or H.264
    holding an IDR slice. A frame whose first packet was lost is neither."""
    if data[:4] == b"\x00\x00\x00\x01":
        position = 0
        while (position := data.find(b"\x00\x00\x01", position)) != -1:
            position += 3
            if position < len(data) and data[position] & 0x1F == 5:
                return True
        return False
    return len(data) >= 6 and not data[0] & 0x01 and data[3:6] == b"\x9d\x01\x2a"


@dataclass
class _Lost:
    #: When the gap holding it was seen, when it was last asked for, how many times.
    seen: float
    asked: float
    nacks: int


class RepeatingNackGenerator(NackGenerator):
    """aiortc's NACK generator, but a packet still missing a round trip after it was asked
    for is asked for again (up to `MAX_NACKS` times), and one missing longer than it can
    be waited for (`give_up`), or in a gap of more than `MAX_GAP_NACK`, is not. The
    round trip is measured from packets that came after one NACK (not after a repeat, which
    would credit a later NACK with the first one's answer and shrink it).

    aiortc's receiver sends a NACK listing `missing` whenever `add` answers True: here that
    is the packets due now, first asks and repeats together, in one NACK."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        # not NackGenerator.__init__: `missing` is a property here
        self.max_seq: int | None = None
        self._clock = clock
        self._lost: dict[int, _Lost] = {}
        self._due: list[int] = []
        self._max_timestamp = 0
        #: Seconds from a NACK to the retransmission it brought (running mean).
        self.rtt = DEFAULT_RTT
        #: NACKed packets asked for, in all; of them, how many came.
        self.asked = 0
        self.recovered = 0

    @property
    def missing(self) -> list[int]:  # type: ignore[override]
        return self._due

    @property
    def give_up(self) -> float:
        return wait_for(self.rtt)

    def add(self, packet: RtpPacket) -> bool:
        now = self._clock()
        seq = packet.sequence_number
        due: list[int] = []
        if self.max_seq is None:
            self.max_seq, self._max_timestamp = seq, packet.timestamp
            return False
        if uint16_gt(seq, self.max_seq):
            if uint16_add(seq, -self.max_seq) - 1 <= MAX_GAP_NACK:  # else: a keyframe
                missing = uint16_add(self.max_seq, 1)
                while uint16_gt(seq, missing):
                    self._lost[missing] = _Lost(now, now, 1)
                    due.append(missing)
                    missing = uint16_add(missing, 1)
            self.max_seq, self._max_timestamp = seq, packet.timestamp
        elif (lost := self._lost.pop(seq, None)) is not None:
            self.recovered += 1
            if lost.nacks == 1:  # Karn: after a repeat, which NACK it answers is unknown
                self.rtt = max(MIN_RTT, 0.8 * self.rtt + 0.2 * (now - lost.asked))
        oldest = uint16_add(self.max_seq, -RTP_HISTORY_SIZE)
        for missing, lost in list(self._lost.items()):
            if (
                now - lost.seen > self.give_up
                or lost.nacks >= MAX_NACKS
                or uint16_gt(oldest, missing)
            ):
                del self._lost[missing]
            elif lost.asked < now and now - lost.asked >= self.rtt:
                lost.asked, lost.nacks = now, lost.nacks + 1
                due.append(missing)
        self.asked += len(due)
        self._due = sorted(due)
        return bool(due)

    def truncate(self) -> None:
        """aiortc's bound on what is tracked; `add` keeps its own."""


def wait_for(rtt: float) -> float:
    """How long a missing packet is waited for, given the round trip."""
    return min(MAX_WAIT, max(MIN_WAIT, WAIT_RTTS * rtt))


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

    def __init__(
        self,
        capacity: int = _VIDEO_CAPACITY,
        clock: Clock = time.monotonic,
        rtt: Callable[[], float] = lambda: DEFAULT_RTT,
    ) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self._released: int | None = None  # RTP timestamp of the last frame handed on
        self._clock = clock
        #: The round trip, from the receiver's NACK generator once it is linked.
        self.rtt = rtt
        self._newest: RtpPacket | None = None
        self._blocked_since: float | None = None
        #: Whether the decoder needs a keyframe: frames are given up until one comes.
        self.needs_keyframe = False
        self._asked_at = -1e9
        self._broken_since = 0.0
        #: Gaps given up, frames not handed on for want of a keyframe, keyframes asked for.
        self.skipped = 0
        self.discarded = 0
        self.keyframes_asked = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self._newest is None or uint16_gt(packet.sequence_number, self._newest.sequence_number):
            self._newest = packet
        pli, frame = super().add(packet)
        now = self._clock()
        if pli:  # aiortc resynced (capacity, a jump in sequence numbers): the chain broke
            self._break(now)
            self._asked_at = now
            self.keyframes_asked += 1
        if frame is None and (stalled := self._stalled(now)) is not None:
            keyframe = self._keyframe_after_gap()
            if keyframe is not None:  # nothing before it is needed any more
                self._skip_to(keyframe)
                frame = self._remove_frame(packet.sequence_number)
            elif stalled:
                self._skip_gap()
                self._break(now)
                frame = self._remove_frame(packet.sequence_number)
            elif self._long_gap() and now - self._asked_at >= KEYFRAME_RETRY:
                # a dropout's worth: ask for a keyframe now, and take whichever comes
                # first, the resent packets or the keyframe
                self._asked_at = now
                self.keyframes_asked += 1
                pli = True
        if frame is not None:
            self._blocked_since = None
            if self.needs_keyframe:
                if is_keyframe(frame.data) or now - self._broken_since > KEYFRAME_GIVE_UP:
                    self.needs_keyframe = False
                else:
                    self.discarded += 1
                    frame = None
        if self.needs_keyframe and now - self._asked_at >= KEYFRAME_RETRY:
            self._asked_at = now
            self.keyframes_asked += 1
            pli = True
        return pli, frame

    def _break(self, now: float) -> None:
        if not self.needs_keyframe:
            self.needs_keyframe, self._broken_since = True, now

    def _stalled(self, now: float) -> bool | None:
        """None when the frame at the head waits for no missing packet; else whether it has
        waited past what can help (`wait_for` the round trip, from when the gap was seen)."""
        if self._gap() is None:
            self._blocked_since = None
            return None
        if self._blocked_since is None:
            self._blocked_since = now
        return now - self._blocked_since > wait_for(self.rtt())

    def _long_gap(self) -> bool:
        """Whether the packets after the gap are further ahead in the stream's time than a
        missing packet is waited for (a dropout): the packets may come back, or may not."""
        head = self._packets[self._origin % self.capacity] if self._origin is not None else None
        reference = head.timestamp if head is not None else self._released
        if self._newest is None or reference is None:
            return False
        span = (self._newest.timestamp - reference) % (1 << 32) / VIDEO_CLOCK
        return span > wait_for(self.rtt())

    def _keyframe_after_gap(self) -> int | None:
        """The sequence number of the first packet of a keyframe that is in whole after the
        gap at the head (its packets contiguous through its marker), if any."""
        if self._origin is None or self._newest is None:
            return None
        newest = self._newest.sequence_number
        start: int | None = None
        seen_gap = False
        for count in range(self.capacity):
            expected = uint16_add(self._origin, count)
            packet = self._packets[expected % self.capacity]
            present = packet is not None and packet.sequence_number == expected
            if not present:
                seen_gap, start = True, None
            elif seen_gap:
                assert packet is not None
                if start is None and is_keyframe(packet._data):  # type: ignore[attr-defined]
                    start = expected
                if start is not None and packet.marker:
                    return start
            if expected == newest:
                return None
        return None

    def _skip_to(self, sequence_number: int) -> None:
        """Drop every packet before `sequence_number`, a keyframe's first."""
        self.skipped += 1
        while self._origin is not None and self._origin != sequence_number:
            self.remove(1)
        self.needs_keyframe = False

    def _gap(self) -> int | None:
        """Packets from the origin to the first missing one, when a newer packet than the
        missing one is in (a gap, not packets still on their way); else None."""
        if self._origin is None or self._newest is None:
            return None
        newest = self._newest.sequence_number
        for count in range(self.capacity):
            expected = uint16_add(self._origin, count)
            packet = self._packets[expected % self.capacity]
            if packet is None or packet.sequence_number != expected:
                return count if uint16_gt(newest, expected) else None
            if expected == newest:
                return None
        return None

    def _skip_gap(self) -> None:
        """Give up the packets before the first gap and the gap itself: the origin moves to
        the first packet in after it."""
        count = self._gap()
        if count is None or self._newest is None:
            return
        self.skipped += 1
        self.remove(count)
        newest = self._newest.sequence_number
        while (origin := self._origin) is not None and origin != newest:
            if self._packets[origin % self.capacity] is not None:
                break
            self.remove(1)

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
    buffer = LowLatencyJitterBuffer(capacity=current.capacity)
    nacks = getattr(receiver, _NACK_ATTRIBUTE, None)
    if type(nacks) is NackGenerator and nacks.max_seq is None:
        generator = RepeatingNackGenerator()
        setattr(receiver, _NACK_ATTRIBUTE, generator)
        buffer.rtt = lambda: generator.rtt
    elif not isinstance(nacks, RepeatingNackGenerator):
        _warn_once("aiortc receiver internals changed (%r); keeping its NACKs", nacks)
    setattr(receiver, _ATTRIBUTE, buffer)
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

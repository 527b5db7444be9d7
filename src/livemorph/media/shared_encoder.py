"""One VP8 encode per output frame, shared by every sender of a session's output.

Each viewer on `/subscribe/{id}` reads the session's output through its own MediaRelay
subscription, and aiortc gives each `RTCRtpSender` an encoder of its own: N viewers cost
N encodes of every 1280x704 frame, 5-7 ms of server CPU per frame per viewer (measured by
bench/viewers.py; 0.0-0.4 ms shared). Here every sender of one output gets a
`SenderEncoder` handle on one `SharedVp8Encoder`. The relay hands all its subscribers the
same frame object, so the first sender that asks for a frame encodes it and the others get
the same payloads back. What an encoder returns is shareable: VP8 payloads (the payload descriptor,
with the encoder's picture id, then the frame's bytes) and an RTP timestamp counted from
the frame's pts; the sender adds what is its own (its SSRC, sequence numbers, payload
type, random timestamp origin and header extensions) when it packetises them.

A sender must not skip an encoded frame: the next one is predicted from it. Frames do not
queue, as before: a sender still takes the newest frame the relay holds. A sender whose
newest frame is not the next one encoded after its last one (it missed one while another
sender went ahead), or that has sent nothing yet, sends nothing until a keyframe, and asks
for one: the next frame anybody encodes is a keyframe, for all. A keyframe request
(PLI/FIR, aiortc's `force_keyframe`) from any sender does the same, so several viewers
asking at once cost one keyframe.

Bitrate: each sender keeps the target its receiver's REMB estimates set, as with aiortc's
own encoder; the shared one encodes at the lowest target of the senders still attached that
have had a report (a viewer on a poor link lowers the picture for all: one encode cannot
serve two rates), and changes it at most every `BITRATE_HOLD` seconds. A change over 10%
rebuilds the codec, as aiortc's rule is (libvpx through PyAV ignores a new bit_rate once
open), and a rebuilt codec starts with a keyframe, so several viewers' estimates moving at
once must not rebuild it on every report. A sender's target before its first report is
aiortc's starting guess (500 kbit/s), not an estimate: counted, it pulled the encoder down
to that on every join (measured: from 0.75 Mbit/s to 0.5, and 16 s to climb back, with a
keyframe every 2-4 s); a new viewer's first estimate is taken from what it receives, so it
starts near the rate the others get.

Keyframes made on request are at least `KEYFRAME_INTERVAL` apart in the stream's time: a
request that comes sooner is served by the first frame encoded once the interval has passed.

Threads: aiortc's senders call `encode` in the loop's default executor. The encode runs
under a lock; a sender asking for a frame being encoded waits for it on that lock.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import av
from aiortc.codecs import vpx
from aiortc.codecs.base import Encoder
from av.frame import Frame
from av.packet import Packet

from .encoder import RealtimeVp8Encoder

#: Seconds the shared bitrate stays put after a change.
BITRATE_HOLD = 2.0
#: The least time between two keyframes made on request, seconds: requests that come
#: sooner (a receiver asking again while its keyframe is on the way, several viewers, a
#: client flooding PLIs) are served by the next keyframe at this interval, as libwebrtc
#: spaces them. A keyframe is several times a frame's size; on a lossy link one per
#: request would turn loss into congestion.
KEYFRAME_INTERVAL = 0.3
#: Encoded frames remembered for senders still asking for one: a sender woken by the same
#: relay frame as the others but scheduled after the first went on to the next frame.
HISTORY = 3


def is_keyframe(payloads: list[bytes]) -> bool:
    """Whether the VP8 frame in these payloads (as aiortc packetises it) is a keyframe: the
    P bit of the VP8 frame header, right after the first payload's descriptor, is 0."""
    if not payloads:
        return False
    _, data = vpx.VpxPayloadDescriptor.parse(payloads[0])
    return bool(data) and not data[0] & 0x01


@dataclass(frozen=True)
class _Encoded:
    index: int
    #: The frame itself: found again by identity (held here, so its id is not reused);
    #: not by pts, which PyAV's encode rebases to the codec's time base in place.
    frame: av.VideoFrame
    #: Its time in seconds, from its pts before the encode.
    time: float | None
    payloads: list[bytes]
    timestamp: int
    keyframe: bool


class SenderEncoder(Encoder):
    """One sender's handle on a `SharedVp8Encoder`: what aiortc's sender calls its encoder.

    `target_bitrate` is this sender's, set from its receiver's REMB reports as aiortc does
    for its own encoder; the shared encoder reads the lowest one of its live handles."""

    def __init__(self, shared: SharedVp8Encoder) -> None:
        self.shared = shared
        self._target_bitrate = vpx.DEFAULT_BITRATE
        #: Whether a REMB report set the target: until then it is aiortc's starting guess,
        #: not this receiver's estimate, and must not pull the others down.
        self.reported = False
        #: The index of the last encoded frame this sender got; None before the first.
        self.last_index: int | None = None
        #: Whether this sender's receiver can decode the next delta frame.
        self.synced = False

    @property
    def target_bitrate(self) -> int:
        return self._target_bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._target_bitrate = max(vpx.MIN_BITRATE, min(bitrate, vpx.MAX_BITRATE))
        self.reported = True

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        return self.shared.encode_for(self, frame, force_keyframe)

    def pack(self, packet: Packet) -> tuple[list[bytes], int]:
        raise TypeError("a shared encoder encodes decoded frames, not packets")


class SharedVp8Encoder:
    """The VP8 encoder of one output track, for all the senders attached to it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._last_keyframe = -math.inf
        self._encoder = RealtimeVp8Encoder()
        self._history: deque[_Encoded] = deque(maxlen=HISTORY)
        self._next_index = 0
        self._keyframe_due = False
        self._handles: weakref.WeakSet[SenderEncoder] = weakref.WeakSet()
        self._handles_lock = threading.Lock()  # attach (loop) against the encode thread
        self._bitrate_changed: float | None = None
        #: Frames encoded; keyframes among them; encoded frames handed to a sender (one
        #: per sender that sent the frame); frames a sender skipped waiting for a keyframe.
        self.encodes = 0
        self.keyframes = 0
        self.deliveries = 0
        self.skips = 0

    def attach(self) -> SenderEncoder:
        """A handle for one more sender; it lives as long as the sender keeps it (aiortc's
        sender drops its encoder when its RTP loop ends)."""
        handle = SenderEncoder(self)
        with self._handles_lock:
            self._handles.add(handle)
        return handle

    @property
    def senders(self) -> int:
        with self._handles_lock:
            return len(self._handles)

    @property
    def target_bitrate(self) -> int:
        """What the codec encodes at now (or will, from its first frame)."""
        return self._encoder.target_bitrate

    def encode_for(
        self, handle: SenderEncoder, frame: Frame, force_keyframe: bool
    ) -> tuple[list[bytes], int]:
        """The payloads and RTP timestamp of `frame` for `handle`'s sender, encoding it if
        no sender has; ([], 0) when this sender must skip it (aiortc's sender then sends
        nothing and reads the next frame)."""
        assert isinstance(frame, av.VideoFrame)
        with self._lock:
            entry = self._find(frame)
            if entry is None:
                latest = self._history[-1] if self._history else None
                if latest is not None and _not_after(_seconds(frame), latest.time):
                    # Others went past this frame: encoding it now would make their next
                    # frame predicted from one they never had.
                    return self._skip(handle)
                wanted = force_keyframe or self._keyframe_due or not handle.synced
                keyframe = wanted and self._keyframe_allowed(_seconds(frame))
                if wanted and not keyframe:
                    self._keyframe_due = True  # at the interval's end
                entry = self._encode(frame, keyframe)
            elif force_keyframe and not entry.keyframe:
                self._keyframe_due = True  # this one is encoded already: the next, then
            if entry.keyframe:
                handle.synced = True
            elif not handle.synced or (
                handle.last_index is not None and entry.index != handle.last_index + 1
            ):
                handle.synced = False
                return self._skip(handle)
            handle.last_index = entry.index
            self.deliveries += 1
            return entry.payloads, entry.timestamp

    def release(self) -> None:
        """Free the codec and the frames kept for late senders, now: the session has ended.

        Its peer connections end up in reference cycles (aiortc's), which only the garbage
        collector's full pass frees, minutes later on a busy node; a libvpx context at
        1280x704 and its frames were about 35 MB of RSS a session until then: bench/memory.py's
        node grew 70-75 MiB a round of 2 sessions and 2 viewers, and now levels off.
        A sender that encodes again after this opens a new codec."""
        with self._lock:
            self._history.clear()
            self._encoder.codec = None

    def _find(self, frame: av.VideoFrame) -> _Encoded | None:
        for entry in self._history:
            if entry.frame is frame:
                return entry
        return None

    def _skip(self, handle: SenderEncoder) -> tuple[list[bytes], int]:
        if not handle.synced:
            self._keyframe_due = True
        self.skips += 1
        return [], 0

    def _encode(self, frame: av.VideoFrame, keyframe: bool) -> _Encoded:
        self._follow_bitrate()
        time = _seconds(frame)
        payloads, timestamp = self._encoder.encode(frame, keyframe)
        entry = _Encoded(self._next_index, frame, time, payloads, timestamp, is_keyframe(payloads))
        self._next_index += 1
        self._history.append(entry)
        self.encodes += 1
        if entry.keyframe:
            self.keyframes += 1
            self._keyframe_due = False
            self._last_keyframe = time if time is not None else self._clock()
        return entry

    def _keyframe_allowed(self, time: float | None) -> bool:
        """Whether a keyframe may be made for a frame at `time` (the stream's own clock,
        the wall's for a frame without one): `KEYFRAME_INTERVAL` after the last, or after a
        jump back in time (a new source)."""
        now = time if time is not None else self._clock()
        return not 0.0 <= now - self._last_keyframe < KEYFRAME_INTERVAL

    def _follow_bitrate(self) -> None:
        with self._handles_lock:
            targets = [handle.target_bitrate for handle in self._handles if handle.reported]
        if not targets:
            return
        lowest = min(targets)
        now = time.monotonic()
        if lowest == self._encoder.target_bitrate or (
            self._bitrate_changed is not None and now - self._bitrate_changed < BITRATE_HOLD
        ):
            return
        self._encoder.target_bitrate = lowest
        self._bitrate_changed = now


def _seconds(frame: av.VideoFrame) -> float | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return float(frame.pts * frame.time_base)


def _not_after(time: float | None, than: float | None) -> bool:
    """Whether a frame at `time` is no newer than one at `than` (a microsecond apart: the
    same frame, its pts rebased)."""
    return time is not None and than is not None and time <= than + 1e-6


#: Set to 0 (or false, no, off) to give each sender an encoder of its own again, as aiortc
#: does: for comparing the two (bench/viewers.py), or should the shared one misbehave.
ENV = "LIVEMORPH_SHARED_ENCODER"
_OFF_WORDS = frozenset({"0", "false", "no", "off"})


def output_encoder() -> SharedVp8Encoder | None:
    """The encoder for a new session's output: shared by its senders unless `ENV` says
    otherwise (None: each sender gets its own, `use_realtime_encoder`'s default)."""
    if os.environ.get(ENV, "").strip().lower() in _OFF_WORDS:
        return None
    return SharedVp8Encoder()

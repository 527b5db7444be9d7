"""LowLatencyJitterBuffer: frames leave on their marker packet, never twice, never partial."""

from __future__ import annotations

import asyncio
import fractions
import random

import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, VideoStreamTrack
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from av import VideoFrame

from livemorph.media.jitter import (
    AUDIO_PREFETCH,
    LowLatencyJitterBuffer,
    install_low_latency_jitter_buffer,
    install_on_peer_connection,
    install_short_audio_prefetch,
)

ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


def rtp(seq: int, ts: int, marker: bool = False, data: bytes | None = None) -> RtpPacket:
    packet = RtpPacket(payload_type=96, sequence_number=seq % 65536, timestamp=ts)
    packet.marker = int(marker)
    packet._data = data if data is not None else f"{ts}/{seq};".encode()  # type: ignore[attr-defined]
    return packet


def frame(first_seq: int, ts: int, count: int) -> list[RtpPacket]:
    """One frame of `count` packets, marker on the last, as aiortc's sender makes them."""
    return [rtp(first_seq + i, ts, marker=i == count - 1) for i in range(count)]


def feed(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[JitterFrame | None]:
    return [buffer.add(p)[1] for p in packets]


def expected_data(packets: list[RtpPacket]) -> bytes:
    """A frame's bytes, from its packets listed in sending order."""
    return b"".join(p._data for p in packets)  # type: ignore[attr-defined]


def test_frame_released_on_marker_packet_not_on_next_frame() -> None:
    first, second = frame(10, 1000, 3), frame(13, 4600, 2)

    fast = feed(LowLatencyJitterBuffer(), [*first, second[0]])
    stock = feed(JitterBuffer(capacity=512, is_video=True), [*first, second[0]])

    assert fast[:2] == [None, None]
    assert fast[2] is not None and fast[2].timestamp == 1000
    assert fast[2].data == expected_data(first)
    assert fast[3] is None  # the next frame's first packet does not emit frame one again
    # aiortc's stock buffer waits for the next frame's first packet: one frame interval later.
    assert stock[:3] == [None, None, None]
    assert stock[3] is not None and stock[3].data == expected_data(first)


def test_out_of_order_frame_released_once_complete() -> None:
    buffer = LowLatencyJitterBuffer()
    assert feed(buffer, frame(10, 1000, 2))[-1] is not None
    second = frame(12, 4600, 4)
    # first packet last, marker in the middle of the arrival order
    out = feed(buffer, [second[1], second[3], second[2], second[0]])
    assert out[:3] == [None, None, None]
    assert out[3] is not None and out[3].data == expected_data(second)


def test_missing_packet_holds_frame_until_it_arrives() -> None:
    buffer = LowLatencyJitterBuffer()
    assert feed(buffer, frame(10, 1000, 2))[-1] is not None
    second, third = frame(12, 4600, 3), frame(15, 8200, 2)
    # packet 13 is lost for now; later frames pile up behind the gap
    assert feed(buffer, [second[0], second[2], *third]) == [None, None, None, None]
    late = buffer.add(second[1])[1]  # e.g. the retransmission after a NACK
    assert late is not None and late.data == expected_data(second)
    # the later frame was left intact and comes out next, exactly once
    out = feed(buffer, frame(17, 11800, 2))
    emitted = [f for f in out if f is not None]
    assert [f.data for f in emitted] == [expected_data(third), expected_data(frame(17, 11800, 2))]


def test_marker_frame_with_gap_before_origin_frame_is_not_emitted_early() -> None:
    buffer = LowLatencyJitterBuffer()
    assert feed(buffer, frame(10, 1000, 1))[-1] is not None
    # frame at the origin (11, 12) lacks packet 11: the complete frame 13-14 must wait too
    assert feed(buffer, [rtp(12, 4600, marker=True), *frame(13, 8200, 2)]) == [None] * 3


def test_padding_after_marker_is_not_a_frame() -> None:
    """Senders pad with empty packets that reuse the last frame's timestamp."""
    buffer = LowLatencyJitterBuffer()
    first = frame(10, 1000, 2)
    padding = [rtp(12, 1000, data=b""), rtp(13, 1000, data=b"")]
    second = frame(14, 4600, 2)
    out = feed(buffer, [*first, *padding, *second])
    emitted = [f for f in out if f is not None]
    assert [f.data for f in emitted] == [expected_data(first), expected_data(second)]
    assert out[1] is emitted[0] and out[5] is emitted[1]


def test_wraparound() -> None:
    buffer = LowLatencyJitterBuffer()
    first = frame(65533, 1000, 4)  # 65533, 65534, 65535, 0
    out = feed(buffer, first)
    assert out[:3] == [None, None, None]
    assert out[3] is not None and out[3].data == expected_data(first)
    second = frame(1, 4600, 2)
    out = feed(buffer, [second[1], second[0]])
    assert out[0] is None and out[1] is not None and out[1].data == expected_data(second)


def test_matches_stock_frames_under_reordering_and_never_later() -> None:
    """Same frames, same bytes, each exactly once, never released later than aiortc's."""
    rng = random.Random(7)
    packets: list[RtpPacket] = []
    frames: dict[int, bytes] = {}
    seq = 65000  # crosses the uint16 wrap
    for index in range(300):
        ts = 1000 + index * 3600
        chunk = frame(seq, ts, rng.randint(1, 9))
        frames[ts] = expected_data(chunk)
        packets += chunk
        seq += len(chunk)
    # local reordering, never of the stream's very first packet (the buffer origin)
    for i in range(1, len(packets) - 3):
        if rng.random() < 0.15:
            j = i + rng.randint(1, 3)
            packets[i], packets[j] = packets[j], packets[i]

    def releases(buffer: JitterBuffer) -> dict[int, tuple[int, bytes]]:
        seen: dict[int, tuple[int, bytes]] = {}
        for index, out in enumerate(feed(buffer, packets)):
            if out is not None:
                assert out.timestamp not in seen, "frame emitted twice"
                seen[out.timestamp] = (index, out.data)
        return seen

    fast = releases(LowLatencyJitterBuffer())
    stock = releases(JitterBuffer(capacity=512, is_video=True))
    last_ts = max(frames)
    assert set(fast) == set(frames)  # the last frame too, which stock never releases
    assert set(stock) == set(frames) - {last_ts}
    for ts, data in frames.items():
        assert fast[ts][1] == data
        if ts in stock:
            assert fast[ts][0] <= stock[ts][0]
    assert sum(fast[ts][0] < stock[ts][0] for ts in stock) > len(stock) // 2


class MovingTrack(VideoStreamTrack):
    """Small synthetic video with motion, so VP8 makes multi-packet frames."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        super().__init__()
        self._count = 0
        x = np.linspace(0, 255, width, dtype=np.float32)
        self._base = np.tile(x, (height, 1))

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        self._count += 1
        noise = np.random.default_rng(self._count).integers(0, 40, self._base.shape)
        gray = (np.roll(self._base, self._count * 4, axis=1) + noise).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        out = VideoFrame.from_ndarray(rgb, format="rgb24")
        out.pts, out.time_base = pts, time_base or fractions.Fraction(1, 90000)
        return out


def prefer_vp8(pc: RTCPeerConnection) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    for transceiver in pc.getTransceivers():
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType == "video/VP8"])


async def test_loopback_decodes_frames_through_low_latency_buffer() -> None:
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    received: dict[str, list[VideoFrame]] = {"offerer": [], "answerer": []}
    buffer_was_empty: list[bool] = []
    tasks: list[asyncio.Task[None]] = []

    async def drain(name: str, track: VideoStreamTrack) -> None:
        while len(received[name]) < 15:
            received[name].append(await track.recv())

    try:
        offerer.addTrack(MovingTrack())
        prefer_vp8(offerer)
        # offerer: its transceiver exists, so this installs at once
        install_on_peer_connection(offerer)
        # answerer: no transceiver yet; the "track" event during setRemoteDescription installs
        install_on_peer_connection(answerer)

        @answerer.on("track")
        def on_track(track: VideoStreamTrack) -> None:
            receiver = answerer.getTransceivers()[0].receiver
            buffer_was_empty.append(getattr(receiver, ATTRIBUTE)._origin is None)
            answerer.addTrack(MovingTrack())
            tasks.append(asyncio.ensure_future(drain("answerer", track)))

        @offerer.on("track")
        def on_offerer_track(track: VideoStreamTrack) -> None:
            tasks.append(asyncio.ensure_future(drain("offerer", track)))

        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)

        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    finally:
        await offerer.close()
        await answerer.close()

    assert buffer_was_empty == [True]
    for pc in (offerer, answerer):
        receiver = pc.getTransceivers()[0].receiver
        assert isinstance(getattr(receiver, ATTRIBUTE), LowLatencyJitterBuffer)
    for frames in received.values():
        assert len(frames) == 15
        assert all((f.width, f.height) == (320, 240) for f in frames)


def test_install_refuses_audio_and_late_or_unknown_receivers() -> None:
    class FakeTrack:
        kind = "audio"

    class FakeReceiver:
        track = FakeTrack()

    assert install_low_latency_jitter_buffer(FakeReceiver()) is False  # type: ignore[arg-type]

    FakeTrack.kind = "video"
    receiver = FakeReceiver()
    assert install_low_latency_jitter_buffer(receiver) is False  # type: ignore[arg-type]

    started = JitterBuffer(capacity=512, is_video=True)
    started.add(rtp(1, 1000))
    setattr(receiver, ATTRIBUTE, started)
    assert install_low_latency_jitter_buffer(receiver) is False  # type: ignore[arg-type]
    assert getattr(receiver, ATTRIBUTE) is started

    setattr(receiver, ATTRIBUTE, JitterBuffer(capacity=512, is_video=True))
    assert install_low_latency_jitter_buffer(receiver) is True  # type: ignore[arg-type]
    assert isinstance(getattr(receiver, ATTRIBUTE), LowLatencyJitterBuffer)


def test_unrecovered_loss_resyncs_like_stock_without_duplicates() -> None:
    """Lost packets stall both buffers until capacity forces a resync (with a PLI)."""
    rng = random.Random(3)
    packets: list[RtpPacket] = []
    seq = 60000
    for index in range(400):
        chunk = frame(seq, 1000 + index * 3600, rng.randint(1, 9))
        packets += chunk
        seq += len(chunk)
    packets = [p for i, p in enumerate(packets) if i == 0 or rng.random() > 0.02]

    def run(buffer: JitterBuffer) -> tuple[list[int], int]:
        stamps, plis = [], 0
        for packet in packets:
            pli, out = buffer.add(packet)
            plis += pli
            if out is not None:
                stamps.append(out.timestamp)
        return stamps, plis

    fast, fast_plis = run(LowLatencyJitterBuffer(capacity=32))
    stock, stock_plis = run(JitterBuffer(capacity=32, is_video=True))
    assert len(fast) == len(set(fast)) and fast == sorted(fast)
    assert len(fast) >= len(stock) > 300
    assert fast_plis > 0 and abs(fast_plis - stock_plis) <= 2


def test_audio_is_released_one_packet_later_not_four() -> None:
    """aiortc holds four 20 ms audio packets before releasing one (80 ms a hop); the short
    prefetch holds one (the wait for the next packet every aiortc buffer has)."""

    def released_after(buffer: JitterBuffer) -> int:
        for index in range(10):
            _, out = buffer.add(rtp(100 + index, 960 * index))
            if out is not None:
                assert out.timestamp == 0
                return index
        raise AssertionError("nothing released")

    assert released_after(JitterBuffer(capacity=16, prefetch=4)) == 4
    assert released_after(JitterBuffer(capacity=16, prefetch=AUDIO_PREFETCH)) == 1


def test_short_audio_prefetch_goes_on_audio_receivers_only() -> None:
    class FakeTrack:
        kind = "audio"

    class FakeReceiver:
        track = FakeTrack()

    receiver = FakeReceiver()
    setattr(receiver, ATTRIBUTE, JitterBuffer(capacity=16, prefetch=4))
    assert install_short_audio_prefetch(receiver) is True  # type: ignore[arg-type]
    assert getattr(receiver, ATTRIBUTE)._prefetch == AUDIO_PREFETCH

    started = JitterBuffer(capacity=16, prefetch=4)
    started.add(rtp(1, 1000))
    setattr(receiver, ATTRIBUTE, started)
    assert install_short_audio_prefetch(receiver) is False  # type: ignore[arg-type]
    assert getattr(receiver, ATTRIBUTE) is started

    FakeTrack.kind = "video"
    setattr(receiver, ATTRIBUTE, JitterBuffer(capacity=512, is_video=True))
    assert install_short_audio_prefetch(receiver) is False  # type: ignore[arg-type]

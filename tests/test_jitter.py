"""LowLatencyJitterBuffer: frames leave on their marker packet, never twice, never partial."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import random

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, VideoStreamTrack
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from av import VideoFrame

from livemorph.media.jitter import (
    AUDIO_PREFETCH,
    LowLatencyJitterBuffer,
    RepeatingNackGenerator,
    install_low_latency_jitter_buffer,
    install_on_peer_connection,
    install_short_audio_prefetch,
    is_keyframe,
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
        buffer = getattr(receiver, ATTRIBUTE)
        assert isinstance(buffer, LowLatencyJitterBuffer)
        nacks = receiver._RTCRtpReceiver__nack_generator
        assert isinstance(nacks, RepeatingNackGenerator) and buffer.rtt() == nacks.rtt
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


KEY = b"\x10\x02\x00\x9d\x01\x2a"  # a VP8 key frame's tag and start code
DELTA = b"\x11\x02\x00"  # a VP8 inter frame's tag


def vp8_frame(first_seq: int, ts: int, count: int, key: bool) -> list[RtpPacket]:
    """A frame whose first packet carries a VP8 frame tag, key or inter."""
    packets = frame(first_seq, ts, count)
    packets[0]._data = (KEY if key else DELTA) + packets[0]._data  # type: ignore[attr-defined]
    return packets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stream(frames: int, keyframe_every: int, seq: int = 65000, packets: int = 4):
    """(frame index, its packets) at 25 fps, a keyframe every `keyframe_every` frames."""
    for index in range(frames):
        yield (
            index,
            vp8_frame(
                seq + index * packets, 1000 + index * 3600, packets, key=index % keyframe_every == 0
            ),
        )


def test_a_retransmission_in_time_fills_the_gap_and_nothing_is_given_up() -> None:
    clock = Clock()
    buffer = LowLatencyJitterBuffer(capacity=512, clock=clock)
    released, plis = [], 0
    held = None
    for index, packets in stream(10, keyframe_every=100):
        for packet in packets:
            if index == 3 and packet is packets[1]:
                held = packet  # lost, then retransmitted 60 ms later
                continue
            pli, out = buffer.add(packet)
            plis += pli
            released += [out.timestamp] if out else []
        if index == 4:
            assert held is not None
            pli, out = buffer.add(held)
            plis += pli
            released += [out.timestamp] if out else []
        clock.now += 0.04
    # one frame leaves per packet: the frames held behind the gap follow with the next ones
    assert released == [1000 + i * 3600 for i in range(len(released))] and len(released) >= 9
    assert plis == 0 and buffer.skipped == buffer.discarded == 0


def test_a_gap_never_filled_is_given_up_and_the_decoder_waits_for_a_keyframe() -> None:
    clock = Clock()
    buffer = LowLatencyJitterBuffer(capacity=512, clock=clock)
    released, plis = [], []
    for index, packets in stream(40, keyframe_every=20):
        for packet in packets:
            if index == 3 and packet is packets[1]:
                continue  # lost for good
            pli, out = buffer.add(packet)
            if pli:
                plis.append(round(clock.now - 100, 2))
            if out is not None:
                released.append(
                    index
                    if out.timestamp == 1000 + index * 3600
                    else (out.timestamp - 1000) // 3600
                )
        clock.now += 0.04
    # frames 0-2, then nothing until the next keyframe (20), then all of them
    assert released == [0, 1, 2, *range(20, 40)]
    assert buffer.skipped == 1 and buffer.discarded >= 10
    # asked for at once when given up (within the wait), again every KEYFRAME_RETRY
    assert plis and 0.12 + 0.1 <= plis[0] <= 0.12 + 0.4 + 0.05
    assert all(b - a >= 0.3 - 1e-9 for a, b in itertools.pairwise(plis))
    assert len(plis) <= 4


def test_after_a_dropout_a_keyframe_is_asked_for_at_once_and_the_first_to_come_wins() -> None:
    """A gap longer in the stream's time than the wait: a keyframe is asked for at once,
    and the frames resume from whichever comes first, the resent packets or a keyframe."""
    frames = dict(stream(60, keyframe_every=50))
    for resent in (False, True):
        clock = Clock()
        buffer = LowLatencyJitterBuffer(capacity=512, clock=clock)
        for index in range(10):
            for packet in frames[index]:
                buffer.add(packet)
        clock.now += 1.0  # a dropout: frames 10-34 and the start of 35 lost
        pli, out = buffer.add(frames[35][1])
        assert pli and out is None and buffer.skipped == 0, "asked at once, nothing skipped"
        for packet in frames[35][2:]:
            assert buffer.add(packet) == (False, None)
        released = []
        if resent:  # the sender had them all: resent within a round trip, in order
            clock.now += 0.08
            for index in range(10, 36):
                for packet in frames[index][: 1 if index == 35 else None]:
                    out = buffer.add(packet)[1]
                    released += [(out.timestamp - 1000) // 3600] if out else []
        for index in range(36, 60):
            for packet in frames[index]:
                out = buffer.add(packet)[1]
                released += [(out.timestamp - 1000) // 3600] if out else []
        if resent:
            assert released == list(range(10, len(released) + 10)) and len(released) > 40
            assert buffer.skipped == 0 and not buffer.needs_keyframe
        else:  # the keyframe (50) came first: straight to it, nothing waits longer
            assert released == list(range(50, 60)) and buffer.skipped == 1


def test_unrecovered_loss_never_hands_on_a_frame_behind_a_gap_before_a_keyframe() -> None:
    rng = random.Random(3)
    clock = Clock()
    buffer = LowLatencyJitterBuffer(capacity=512, clock=clock)
    stock = JitterBuffer(capacity=512, is_video=True)
    lost: set[int] = set()
    fast_out, stock_out = [], []
    for index, packets in stream(500, keyframe_every=25, packets=3):
        for packet in packets:
            if index > 0 and rng.random() < 0.02:
                lost.add(index)
                continue
            if (out := buffer.add(packet)[1]) is not None:
                fast_out.append((out.timestamp - 1000) // 3600)
            if (out := stock.add(packet)[1]) is not None:
                stock_out.append((out.timestamp - 1000) // 3600)
        clock.now += 0.04
    assert fast_out == sorted(set(fast_out))
    assert not lost & set(fast_out), "a frame that lost a packet was handed on"
    for index in fast_out:  # every frame handed on has an unbroken chain back to a keyframe
        key = index - index % 25
        assert not lost & set(range(key, index + 1)), index
    assert len(fast_out) > 200
    assert stock_out[-1] < 500 - 50, "the stock buffer sits on a gap until it overflows"


def test_the_nack_generator_asks_again_each_round_trip_then_gives_up() -> None:
    clock = Clock()
    nacks = RepeatingNackGenerator(clock=clock)
    asked: list[tuple[float, list[int]]] = []

    def add(seq: int, ts: int) -> None:
        if nacks.add(rtp(seq, ts)):
            asked.append((round(clock.now - 100, 3), list(nacks.missing)))

    add(10, 0)
    add(13, 3600)  # 11 and 12 missing
    for step in range(1, 30):
        clock.now += 0.02
        add(13 + step, 3600 + step * 720)
    assert asked[0] == (0.0, [11, 12])
    times = [at for at, _ in asked]
    assert all(abs((b - a) - 0.1) < 0.021 for a, b in itertools.pairwise(times)), times
    assert times[-1] <= 0.3 + 0.02, "not asked for past the wait (3 round trips)"
    assert nacks.asked == 2 * len(asked)


def test_the_nack_generator_learns_the_round_trip_and_skips_a_dropout() -> None:
    clock = Clock()
    nacks = RepeatingNackGenerator(clock=clock)
    ts = 0
    for gap in range(20):  # each gap's packet comes back 30 ms after it was asked for
        seq = 100 + gap * 3
        nacks.add(rtp(seq, ts))
        assert nacks.add(rtp(seq + 2, ts + 720)) and nacks.missing == [seq + 1]
        clock.now += 0.03
        nacks.add(rtp(seq + 1, ts))
        ts += 1440
    assert nacks.recovered == 20 and abs(nacks.rtt - 0.03) < 0.005
    # a second of stream time lost (a dropout): too old to ask for
    assert not nacks.add(rtp(1000, ts + 90_000))


def test_keyframes_are_told_apart_in_vp8_and_h264() -> None:
    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    image = VideoFrame.from_ndarray(np.zeros((240, 320, 3), np.uint8), format="rgb24")
    image.pts, image.time_base = 0, fractions.Fraction(1, 90000)
    for mime, depayload in (("video/VP8", "vpx"), ("video/H264", "h264")):
        codec = RTCRtpCodecParameters(mimeType=mime, clockRate=90000, payloadType=96)
        encoder = get_encoder(codec)
        frames = []
        for index in range(3):
            image.pts = index * 3000
            payloads, _ = encoder.encode(image, force_keyframe=index == 0)
            module = __import__(f"aiortc.codecs.{depayload}", fromlist=["x"])
            descriptor = (
                module.VpxPayloadDescriptor
                if depayload == "vpx"
                else (module.H264PayloadDescriptor)
            )
            frames.append(b"".join(descriptor.parse(p)[1] for p in payloads))
        assert [is_keyframe(data) for data in frames] == [True, False, False], mime
        assert not is_keyframe(frames[0][7:]), "a keyframe missing its start is no keyframe"


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


def test_a_retransmission_after_a_repeated_nack_does_not_shrink_the_round_trip() -> None:
    clock = Clock()
    nacks = RepeatingNackGenerator(clock=clock)
    nacks.add(rtp(1, 0))
    assert nacks.add(rtp(3, 720)) and nacks.missing == [2]
    clock.now += 0.11
    assert nacks.add(rtp(4, 1440)) and nacks.missing == [2], "asked again"
    clock.now += 0.005  # the first NACK's answer, just after the second NACK
    nacks.add(rtp(2, 720))
    assert nacks.recovered == 1 and nacks.rtt == pytest.approx(0.1), "no sample taken"

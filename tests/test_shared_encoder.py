"""One VP8 encode per output frame for all of a session's senders (media/shared_encoder.py).

First the shared encoder alone, then two real aiortc `RTCRtpSender`s on a stand-in transport
(pinning what of aiortc's sender it relies on: `encode(frame, force_keyframe)` per frame,
the sender's own SSRC, sequence numbers and payload type around the payloads, PLI to
`force_keyframe`, REMB to `target_bitrate`, the encoder dropped when the sender stops),
then a real server session with viewers through the Python SDK.
"""

from __future__ import annotations

import asyncio
import fractions
import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCRtpSender
from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
from aiortc.contrib.media import MediaRelay
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import (
    RTCRtcpParameters,
    RTCRtpCodecParameters,
    RTCRtpSendParameters,
)
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_PLI,
    RtcpPsfbPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
)

from livemorph import create_client, models
from livemorph.config import Settings
from livemorph.media import shared_encoder as shared_module
from livemorph.media.encoder import install_realtime_encoder
from livemorph.media.shared_encoder import SenderEncoder, SharedVp8Encoder, is_keyframe
from tests.inprocess import serve_in_process
from tests.media import FrameSink, SceneTrack, photo
from tests.support import eventually


def frame(index: int, width: int = 320, height: int = 176, step: int = 36_000) -> av.VideoFrame:
    """Frame `index` of a moving picture, `step` 90 kHz ticks apart: 0.4 s by default, so
    that each keyframe asked for here is past KEYFRAME_INTERVAL (tested on its own)."""
    rgb = np.roll(photo(width, height), index * 4, axis=1)
    out = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    out.pts, out.time_base = index * step, fractions.Fraction(1, 90_000)
    return out


def decode(payloads: list[bytes], decoder: Vp8Decoder) -> list[av.VideoFrame]:
    data = b"".join(vp8_depayload(payload) for payload in payloads)
    return decoder.decode(JitterFrame(data=data, timestamp=0))  # type: ignore[return-value]


# -- the shared encoder alone ---------------------------------------------------------


def test_each_frame_is_encoded_once_for_every_sender() -> None:
    shared = SharedVp8Encoder()
    handles = [shared.attach() for _ in range(4)]
    decoders = [Vp8Decoder() for _ in handles]
    for index in range(5):
        current = frame(index)
        results = [handle.encode(current) for handle in handles]
        assert all(result == results[0] for result in results), "the same payloads for all"
        for decoder, (payloads, _) in zip(decoders, results, strict=True):
            assert [(f.width, f.height) for f in decode(payloads, decoder)] == [(320, 176)]
    assert shared.encodes == 5 and shared.deliveries == 20
    assert shared.keyframes == 1, "only the first frame is a keyframe"


def test_a_sender_that_joins_late_waits_for_a_keyframe_that_comes_next() -> None:
    shared = SharedVp8Encoder()
    first = shared.attach()
    for index in range(3):
        first.encode(frame(index))
    late = shared.attach()
    fourth = frame(3)
    first.encode(fourth)  # a delta frame, encoded before the late sender asked
    assert late.encode(fourth) == ([], 0), "a delta frame it could not decode"
    fifth = frame(4)
    payloads, _ = late.encode(fifth)  # it asks first: encoded as a keyframe
    assert is_keyframe(payloads) and first.encode(fifth)[0] == payloads
    assert decode(payloads, Vp8Decoder())
    assert shared.encodes == 5 and shared.keyframes == 2


def test_release_frees_the_codec_and_the_frames_at_once() -> None:
    """A closed session's encoder is freed by reference counting, not left to the cycle
    collector with its peer connection (see `release`)."""
    shared = SharedVp8Encoder()
    handle = shared.attach()
    frames = [frame(index) for index in range(3)]
    for current in frames:
        handle.encode(current)
    last = frames[-1]
    held = sys.getrefcount(last)
    gc.disable()  # what is freed must be freed without the collector
    try:
        shared.release()
        assert shared._encoder.codec is None, "the libvpx context is dropped"
        assert sys.getrefcount(last) == held - 1, "no frame is kept for late senders"
    finally:
        gc.enable()
    payloads, _ = handle.encode(frame(3))  # a sender that goes on gets a new codec
    assert is_keyframe(payloads) and decode(payloads, Vp8Decoder())


def test_a_keyframe_request_gives_one_keyframe_for_all() -> None:
    shared = SharedVp8Encoder()
    a, b, c = (shared.attach() for _ in range(3))
    for index in range(2):
        current = frame(index)
        for handle in (a, b, c):
            handle.encode(current)
    current = frame(2)
    assert not is_keyframe(a.encode(current)[0])
    # b and c ask for a keyframe for a frame already encoded: the next one is key, once
    assert not is_keyframe(b.encode(current, force_keyframe=True)[0])
    assert not is_keyframe(c.encode(current, force_keyframe=True)[0])
    following = frame(3)
    assert all(is_keyframe(h.encode(following)[0]) for h in (a, b, c))
    assert shared.keyframes == 2 and shared.encodes == 4
    # asked for by the sender that encodes it: that very frame
    assert is_keyframe(c.encode(frame(4), force_keyframe=True)[0])


def test_a_sender_that_missed_an_encoded_frame_skips_until_the_keyframe() -> None:
    shared = SharedVp8Encoder()
    fast, slow = shared.attach(), shared.attach()
    for index in range(2):
        current = frame(index)
        fast.encode(current)
        slow.encode(current)
    fast.encode(frame(2))  # the slow sender never asks for this one
    third = frame(3)
    fast.encode(third)
    assert slow.encode(third) == ([], 0), "predicted from a frame it never sent"
    fourth = frame(4)
    assert is_keyframe(fast.encode(fourth)[0])
    payloads, _ = slow.encode(fourth)
    assert is_keyframe(payloads)
    fifth = frame(5)
    delta = slow.encode(fifth)
    assert delta[0] and not is_keyframe(delta[0]) and delta == fast.encode(fifth)


def test_a_frame_older_than_the_last_encoded_is_skipped_not_encoded() -> None:
    shared = SharedVp8Encoder()
    a, b = shared.attach(), shared.attach()
    first = frame(0)
    a.encode(first)
    b.encode(first)
    stale, newer = frame(1), frame(2)
    a.encode(newer)
    assert b.encode(stale) == ([], 0)
    assert shared.encodes == 2


def test_the_bitrate_is_the_lowest_reported_target_and_holds_between_changes(monkeypatch) -> None:
    opened: list[int] = []
    real = shared_module.RealtimeVp8Encoder.encode

    def spy(self: Any, current: av.VideoFrame, force_keyframe: bool = False) -> Any:
        result = real(self, current, force_keyframe)
        assert self.codec is not None
        if not opened or opened[-1] != self.codec.bit_rate:
            opened.append(self.codec.bit_rate)
        return result

    monkeypatch.setattr(shared_module.RealtimeVp8Encoder, "encode", spy)
    shared = SharedVp8Encoder()
    high, low, silent = shared.attach(), shared.attach(), shared.attach()
    high.target_bitrate, low.target_bitrate = 1_200_000, 600_000
    high.encode(frame(0))
    assert shared.target_bitrate == 600_000, "a sender without a REMB report yet does not count"
    assert not silent.reported and silent.target_bitrate < 600_000
    low.target_bitrate = 300_000
    high.encode(frame(1))
    assert shared.target_bitrate == 600_000, "held: a change at most every BITRATE_HOLD"
    monkeypatch.setattr(shared_module, "BITRATE_HOLD", 0.0)
    high.encode(frame(2))
    assert shared.target_bitrate == 300_000
    del low
    gc.collect()
    high.encode(frame(3))
    assert shared.target_bitrate == 1_200_000, "the sender that left no longer counts"
    assert opened == [600_000, 300_000, 1_200_000]


# -- aiortc's sender, on a stand-in transport -----------------------------------------


class Feed(MediaStreamTrack):
    """What a relay subscription is to a sender: frames the test puts, one by one."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue()

    async def recv(self) -> av.VideoFrame:
        item = await self.queue.get()
        if item is None:
            raise MediaStreamError
        return item


class Wire:
    """The DTLS transport as the sender uses it: what it sends is kept, parsed."""

    state = "connected"
    _stats_id = "wire"

    def __init__(self) -> None:
        self.packets: list[RtpPacket] = []

    def _register_rtp_sender(self, sender: object, parameters: object) -> None:
        pass

    def _unregister_rtp_sender(self, sender: object) -> None:
        pass

    async def _send_rtp(self, data: bytes) -> None:
        if not is_rtcp(data):
            self.packets.append(RtpPacket.parse(data))

    def frames(self) -> list[list[RtpPacket]]:
        """The packets of each frame sent, split on the marker bit."""
        frames: list[list[RtpPacket]] = [[]]
        for packet in self.packets:
            frames[-1].append(packet)
            if packet.marker:
                frames.append([])
        return frames[:-1]


VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90_000, payloadType=97)


async def start_sender(shared: SharedVp8Encoder, payload_type: int) -> SimpleNamespace:
    feed, wire = Feed(), Wire()
    sender = RTCRtpSender(feed, wire)  # type: ignore[arg-type]
    assert install_realtime_encoder(sender, shared)
    codec = RTCRtpCodecParameters(
        mimeType=VP8.mimeType, clockRate=VP8.clockRate, payloadType=payload_type
    )
    await sender.send(
        RTCRtpSendParameters(codecs=[codec], rtcp=RTCRtcpParameters(cname="test"), muxId="0")
    )
    return SimpleNamespace(sender=sender, feed=feed, wire=wire)


async def test_aiortc_senders_packetise_the_shared_payloads_each_its_own_way() -> None:
    shared = SharedVp8Encoder()
    one, two = await start_sender(shared, 96), await start_sender(shared, 97)
    try:
        assert shared.senders == 2
        for index in range(4):
            current = frame(index)
            for side in (one, two):
                side.feed.queue.put_nowait(current)
            await _until(lambda i=index: all(len(s.wire.frames()) > i for s in (one, two)))
        assert shared.encodes == 4 and shared.deliveries == 8
        for side, payload_type in ((one, 96), (two, 97)):
            packets = side.wire.packets
            assert {p.ssrc for p in packets} == {side.sender._ssrc}
            assert {p.payload_type for p in packets} == {payload_type}
            sequence = [p.sequence_number for p in packets]
            assert sequence == [(sequence[0] + i) % 65536 for i in range(len(sequence))]
        assert one.sender._ssrc != two.sender._ssrc
        payloads = [[[p.payload for p in f] for f in s.wire.frames()] for s in (one, two)]
        assert payloads[0] == payloads[1], "the same encoded bytes in both streams"
        decoder = Vp8Decoder()
        assert all(decode(frame_payloads, decoder) for frame_payloads in payloads[1])

        # A PLI on one sender: this frame or, if the other sender encoded it already, the
        # next is a keyframe, for both, and only one.
        await one.sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=one.sender._ssrc)
        )
        for index in (4, 5):
            current = frame(index)
            for side in (two, one):
                side.feed.queue.put_nowait(current)
            await _until(lambda i=index: all(len(s.wire.frames()) > i for s in (one, two)))
        keys = [[is_keyframe([f[0].payload]) for f in s.wire.frames()[4:]] for s in (one, two)]
        assert keys[0] == keys[1] and sorted(keys[0]) == [False, True]
        assert shared.keyframes == 2 and shared.encodes == 6

        # A REMB report on one sender sets that sender's target.
        remb = pack_remb_fci(300_000, [two.sender._ssrc])
        await two.sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=remb)
        )
        handle = two.sender._RTCRtpSender__encoder
        assert isinstance(handle, SenderEncoder) and handle.target_bitrate == 300_000
        del handle
    finally:
        for side in (one, two):
            side.feed.queue.put_nowait(None)
            await side.sender.stop()
    gc.collect()
    assert shared.senders == 0, "a stopped sender drops its handle"


async def test_aiortc_relay_hands_every_subscriber_the_same_frame_object() -> None:
    """What finding a frame again by identity rests on: MediaRelay does not copy frames."""
    source = Feed()
    relay = MediaRelay()
    one, two = (relay.subscribe(source, buffered=False) for _ in range(2))
    current = frame(0)
    receiving = asyncio.gather(one.recv(), two.recv())
    await asyncio.sleep(0)  # both subscribed (the relay starts reading on the first recv)
    source.queue.put_nowait(current)
    async with asyncio.timeout(10):
        first, second = await receiving
    assert first is current and second is current
    one.stop()
    two.stop()
    source.queue.put_nowait(None)  # the relay's reader ends
    await asyncio.sleep(0.01)


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the senders run on their own
            await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def _shared_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(shared_module.ENV, raising=False)


def test_the_environment_switches_sharing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(shared_module.output_encoder(), SharedVp8Encoder)
    monkeypatch.setenv(shared_module.ENV, "0")
    assert shared_module.output_encoder() is None


# -- a real session, with viewers through the SDK -------------------------------------

#: The camera is sent small (cheap for the test's own encoder); the session's output is
#: the model's size, 1280x704, fitted by the passthrough engine.
CAMERA = (640, 352)


@pytest.fixture
async def live(tmp_path) -> Any:
    async with (
        serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        yield SimpleNamespace(server=server, client=client)


@asynccontextmanager
async def publishing(live: Any) -> AsyncIterator[SimpleNamespace]:
    """A session of `mirage` on a moving scene, its output drained; its server side too."""
    rt = await live.client.realtime.connect(
        SceneTrack(*CAMERA), model="mirage", initial_state={"prompt": {"text": "ink"}}
    )
    output = FrameSink(rt.video_track)
    try:
        (session,) = live.server.state.sessions.all()
        assert session.video_encoder is not None
        yield SimpleNamespace(rt=rt, output=output, session=session)
    finally:
        await output.close()
        await rt.disconnect()


@asynccontextmanager
async def watching(live: Any, rt: Any) -> AsyncIterator[SimpleNamespace]:
    viewer = await live.client.realtime.subscribe(rt.subscribe_token)
    sink = FrameSink(viewer.video_track)
    try:
        yield SimpleNamespace(viewer=viewer, sink=sink)
    finally:
        await sink.close()
        await viewer.disconnect()


SIZE = (models.realtime("mirage").height, models.realtime("mirage").width, 3)


@pytest.mark.slow
async def test_three_viewers_and_the_publisher_cost_one_encode_a_frame(live) -> None:
    async with (
        publishing(live) as pub,
        watching(live, pub.rt) as one,
        watching(live, pub.rt) as two,
        watching(live, pub.rt) as three,
    ):
        sinks = [pub.output, one.sink, two.sink, three.sink]
        frames = await asyncio.gather(*(sink.fresh(5) for sink in sinks))
        assert all(picture.shape == SIZE for picture in frames)
        encoder, pipeline = pub.session.video_encoder, pub.session.pipeline
        assert encoder.senders == 4
        encodes, deliveries = encoder.encodes, encoder.deliveries
        await asyncio.gather(*(sink.fresh(10) for sink in sinks))
        # Each frame the pipeline put out is encoded at most once (a frame every sender
        # skipped is not encoded at all)...
        assert encoder.encodes <= pipeline.frames_sent
        # ...and what is encoded goes to the four senders.
        encoded, delivered = encoder.encodes - encodes, encoder.deliveries - deliveries
        assert encoded >= 10 and delivered > 2 * encoded


@pytest.mark.slow
async def test_a_late_viewer_gets_a_keyframe_and_a_leaving_one_disturbs_nobody(live) -> None:
    async with publishing(live) as pub, watching(live, pub.rt) as first:
        await asyncio.gather(pub.output.fresh(5), first.sink.fresh(5))
        encoder = pub.session.video_encoder
        keyframes = encoder.keyframes
        async with watching(live, pub.rt) as late:
            # Its first frame decodes: a keyframe, forced when it asked for a delta one.
            assert (await late.sink.fresh(0)).shape == SIZE
            assert encoder.keyframes > keyframes
            assert encoder.senders == 3
        # It has left: the others go on.
        await eventually(lambda: encoder.senders == 2)
        pictures = await asyncio.gather(pub.output.fresh(5), first.sink.fresh(5))
        assert all(picture.shape == SIZE for picture in pictures)
        assert pub.rt.get_connection_state() in ("connected", "generating")
        assert first.viewer.get_connection_state() in ("connected", "generating")


@pytest.mark.slow
async def test_switched_off_each_sender_encodes_for_itself(live, monkeypatch) -> None:
    monkeypatch.setenv(shared_module.ENV, "off")
    rt = await live.client.realtime.connect(
        SceneTrack(*CAMERA), model="mirage", initial_state={"prompt": {"text": "ink"}}
    )
    output = FrameSink(rt.video_track)
    try:
        (session,) = live.server.state.sessions.all()
        assert session.video_encoder is None
        async with watching(live, rt) as viewer:
            pictures = await asyncio.gather(output.fresh(3), viewer.sink.fresh(3))
            assert all(picture.shape == SIZE for picture in pictures)
    finally:
        await output.close()
        await rt.disconnect()


def test_keyframes_asked_for_sooner_than_the_interval_wait_for_it() -> None:
    """A client asking again and again (a PLI a frame) gets a keyframe every
    KEYFRAME_INTERVAL of the stream's time, not one a frame."""
    shared = SharedVp8Encoder()
    handle = shared.attach()
    keys = []
    for index in range(25):  # one second of frames 40 ms apart, every one asking
        keys.append(is_keyframe(handle.encode(frame(index, step=3600), force_keyframe=True)[0]))
    assert keys[0] and sum(keys) == 4, keys  # at 0, 0.32, 0.64 and 0.96 s
    assert shared.keyframes == 4

"""The server's VP8 encoder: aiortc's, with the denoiser off and a faster speed setting."""

from __future__ import annotations

import fractions

import av
import numpy as np
from aiortc import RTCPeerConnection, VideoStreamTrack
from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame

from livemorph.media import encoder as encoder_module
from livemorph.media.encoder import TUNED_OPTIONS, RealtimeVp8Encoder, use_realtime_encoder
from tests.media import photo


def frame(index: int, width: int = 320, height: int = 176) -> av.VideoFrame:
    rgb = np.roll(photo(width, height), index * 4, axis=1)
    out = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    out.pts, out.time_base = index * 3600, fractions.Fraction(1, 90_000)
    return out


def test_the_codec_gets_the_tuned_options_and_its_output_decodes() -> None:
    assert TUNED_OPTIONS.items() <= encoder_module._open_codec(frame(0), 500_000).options.items()
    encoder = RealtimeVp8Encoder()
    payloads, _ = encoder.encode(frame(0))
    data = b"".join(vp8_depayload(payload) for payload in payloads)
    decoded = Vp8Decoder().decode(JitterFrame(data=data, timestamp=0))
    assert [(f.width, f.height) for f in decoded] == [(320, 176)]


def test_a_new_size_or_bitrate_rebuilds_the_codec_still_tuned(monkeypatch) -> None:
    opened: list[tuple[int, int, int]] = []
    real = encoder_module._open_codec

    def spy(frame: av.VideoFrame, bitrate: int) -> av.CodecContext:
        opened.append((frame.width, frame.height, bitrate))
        return real(frame, bitrate)

    monkeypatch.setattr(encoder_module, "_open_codec", spy)
    encoder = RealtimeVp8Encoder()
    encoder.encode(frame(0))
    encoder.encode(frame(1))
    bitrate = encoder.target_bitrate
    encoder.target_bitrate = bitrate * 2
    encoder.encode(frame(2))
    encoder.encode(frame(3, 640, 352))
    assert opened == [(320, 176, bitrate), (320, 176, bitrate * 2), (640, 352, bitrate * 2)]


async def test_installed_on_the_answering_side_for_vp8() -> None:
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.addTransceiver("video", direction="recvonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        answerer.addTrack(VideoStreamTrack())
        await answerer.setLocalDescription(await answerer.createAnswer())
        use_realtime_encoder(answerer)
        sender = answerer.getTransceivers()[0].sender
        assert isinstance(sender._RTCRtpSender__encoder, RealtimeVp8Encoder)
    finally:
        await offerer.close()
        await answerer.close()

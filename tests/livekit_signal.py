"""A bare LiveKit participant on aiortc, for tests of the server's `/rtc` endpoint.

It speaks the classic two-connection signaling the way LiveKit's clients do (protobuf
`SignalRequest`s on a binary WebSocket, the server offering the subscriber connection),
with none of their retries, so a test sees exactly what the server says. The published
clients themselves are tested in tests/test_decart_livekit.py and
tests/test_browser_decart_livekit.py; this one is for fast checks and hostile input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from livekit.protocol import models, rtc

from tests.support import eventually


class RoomClient:
    """One participant: `join`, then `publish` a track and/or read `tracks`."""

    def __init__(self) -> None:
        self.ws: Any = None
        self.joined: rtc.JoinResponse | None = None
        self.publisher = RTCPeerConnection()
        self.subscriber = RTCPeerConnection()
        self.tracks: list[MediaStreamTrack] = []
        self.stream_ids: list[str] = []
        self.responses: list[rtc.SignalResponse] = []
        self._answers: dict[int, asyncio.Future[rtc.SessionDescription]] = {}
        self._published: dict[str, asyncio.Future[rtc.TrackInfo]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

        @self.subscriber.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tracks.append(track)

    async def join(self, livekit_url: str, token: str, *, bearer: bool = False) -> None:
        if bearer:
            self.ws = await websockets.connect(
                f"{livekit_url}/rtc?protocol=16",
                additional_headers={"Authorization": f"Bearer {token}"},
            )
        else:
            self.ws = await websockets.connect(f"{livekit_url}/rtc?access_token={token}")
        first = rtc.SignalResponse.FromString(await self.ws.recv())
        assert first.WhichOneof("message") == "join", first
        self.joined = first.join
        self._reader = asyncio.create_task(self._read())

    async def send(self, **message: Any) -> None:
        await self.ws.send(rtc.SignalRequest(**message).SerializeToString())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                response = rtc.SignalResponse.FromString(frame)
                self.responses.append(response)
                kind = response.WhichOneof("message")
                if kind == "offer":
                    await self._answer_subscriber(response.offer)
                elif kind == "answer":
                    future = self._answers.pop(response.answer.id, None)
                    if future is not None:
                        future.set_result(response.answer)
                elif kind == "track_published":
                    pending = self._published.pop(response.track_published.cid, None)
                    if pending is not None:
                        pending.set_result(response.track_published.track)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def _answer_subscriber(self, offer: rtc.SessionDescription) -> None:
        for line in offer.sdp.splitlines():
            if line.startswith("a=msid:"):
                self.stream_ids.append(line[len("a=msid:") :])
        await self.subscriber.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        await self.subscriber.setLocalDescription(await self.subscriber.createAnswer())
        sdp = self.subscriber.localDescription.sdp
        await self.send(answer=rtc.SessionDescription(type="answer", sdp=sdp, id=offer.id))

    async def publish(self, track: MediaStreamTrack, offer_id: int = 1) -> rtc.TrackInfo:
        """Announce the track, then offer it on the publisher connection."""
        video = track.kind == "video"
        cid = f"{track.kind}-{offer_id}"
        published: asyncio.Future[rtc.TrackInfo] = asyncio.get_running_loop().create_future()
        self._published[cid] = published
        await self.send(
            add_track=rtc.AddTrackRequest(
                cid=cid,
                name="camera" if video else "microphone",
                type=models.TrackType.VIDEO if video else models.TrackType.AUDIO,
                source=models.CAMERA if video else models.MICROPHONE,
            )
        )
        info = await asyncio.wait_for(published, 10)
        self.publisher.addTransceiver(track, direction="sendonly")
        await self.offer(offer_id)
        return info

    async def offer(self, offer_id: int, data: bool = False) -> rtc.SessionDescription:
        """Offer on the publisher connection; with `data`, the data channels both clients
        open. (Media added to this client's connection after its data channels did not
        flow here, and was not looked into: the published clients, which negotiate
        that way, are tested for it in the tests of Decart's clients.)"""
        if data and self.publisher.sctp is None:
            self.publisher.createDataChannel("_reliable")
            self.publisher.createDataChannel("_lossy", ordered=False, maxRetransmits=0)
        await self.publisher.setLocalDescription(await self.publisher.createOffer())
        answered: asyncio.Future[rtc.SessionDescription] = (
            asyncio.get_running_loop().create_future()
        )
        self._answers[offer_id] = answered
        sdp = self.publisher.localDescription.sdp
        await self.send(offer=rtc.SessionDescription(type="offer", sdp=sdp, id=offer_id))
        answer = await asyncio.wait_for(answered, 10)
        await self.publisher.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
        return answer

    async def video(self, within: float = 15.0) -> MediaStreamTrack:
        return await self.track("video", within)

    async def track(self, kind: str, within: float = 15.0) -> MediaStreamTrack:
        """The first track of `kind` the server sent, once it arrives."""
        await eventually(lambda: any(t.kind == kind for t in self.tracks), within)
        return next(t for t in self.tracks if t.kind == kind)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.send(leave=rtc.LeaveRequest(action=rtc.LeaveRequest.DISCONNECT))
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.publisher.close()
        await self.subscriber.close()


async def room_of(
    ws_url: str, api_key: str, model: str, prompt: str | None = None, image: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Open `/v1/stream`, set `prompt` or the base64 `image` (acked), send `livekit_join`:
    the control socket and the `livekit_room_info` it answered."""
    control = await websockets.connect(
        f"{ws_url}/v1/stream?api_key={api_key}&model={model}", max_size=None
    )
    if image is not None:
        await control.send(json.dumps({"type": "set_image", "image_data": image}))
    elif prompt is not None:
        await control.send(json.dumps({"type": "prompt", "prompt": prompt}))
    await control.send(json.dumps({"type": "livekit_join"}))
    acked = prompt is None and image is None
    info: dict[str, Any] | None = None
    async with asyncio.timeout(30):
        while info is None or not acked:
            message = json.loads(await control.recv())
            if message["type"] in ("prompt_ack", "set_image_ack"):
                assert message["success"], message
                acked = True
            elif message["type"] == "livekit_room_info":
                info = message
            elif message["type"] == "error":
                raise AssertionError(message)
    return control, info

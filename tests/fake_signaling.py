"""A scripted signaling server for testing clients: a real WebSocket and a real aiortc peer.

livemorph's own server never answers out of order, forgets an ack or refuses a reconnect
on cue; this one does, when told. The test sets a `Script` (how to answer), drives the
server (release held acks in any order, drop every socket) and reads what each connection
was sent. It runs its own event loop in a thread, so sync tests (Playwright) can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole
from websockets.asyncio.server import Server, ServerConnection, serve

from livemorph.protocol import MAX_MESSAGE_BYTES, IceCandidate, parse_client


@dataclass
class Script:
    """How the server answers the connections opened after it is set."""

    #: Sent as an `error` at once, then the socket is closed with `refuse_code`.
    refuse: str | None = None
    refuse_code: int = 1008
    #: "ack" answers each prompt; "hold" keeps them until `release`; "ignore" never answers.
    prompts: Literal["ack", "hold", "ignore"] = "ack"
    images: Literal["ack", "ignore"] = "ack"
    #: Prompts answered with `success: false`.
    refuse_prompts: tuple[str, ...] = ()
    #: `generation_tick`s sent once the peer connection is up (one every 0.2 s).
    ticks: int = 2


@dataclass
class Connection:
    """One client WebSocket: what it asked for and everything it sent."""

    path: str
    ws: ServerConnection
    messages: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    pc: RTCPeerConnection | None = None

    def types(self) -> list[str]:
        return [str(message.get("type")) for message in self.messages]


class FakeSignaling:
    """Serve the signaling protocol on 127.0.0.1 (any path) in a thread of its own."""

    def __init__(self) -> None:
        self.script = Script()
        self.connections: list[Connection] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeSignaling:
        self._thread.start()
        self.call(self._start)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def call(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run a coroutine function on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(function(*args), self._loop).result(timeout=30)

    def reset(self, script: Script | None = None) -> None:
        """Forget past connections (closing any still open) and answer by `script` from now."""
        self.drop(1000)
        self.connections = []
        self.script = script or Script()

    def release(self, *messages: dict[str, Any]) -> None:
        """Send `messages` as they are on the newest connection (held acks, in any order)."""
        self.call(self._send_all, self.connections[-1], list(messages))

    def drop(self, code: int = 1011) -> None:
        """Close every open socket with `code`, as a crashed or restarted server would."""
        self.call(self._drop, code)

    # -- on the server's loop -----------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0, max_size=MAX_MESSAGE_BYTES)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def _stop(self) -> None:
        await self._drop(1001)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _drop(self, code: int) -> None:
        for connection in list(self.connections):  # not those that reconnect meanwhile
            with contextlib.suppress(Exception):
                await connection.ws.close(code)
            if connection.pc is not None:
                await connection.pc.close()

    async def _send_all(self, connection: Connection, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            await connection.ws.send(json.dumps(message))

    async def _handle(self, ws: ServerConnection) -> None:
        connection = Connection(path=ws.request.path if ws.request else "", ws=ws)
        self.connections.append(connection)
        script = self.script
        if script.refuse is not None:
            await ws.send(json.dumps({"type": "error", "error": script.refuse}))
            await ws.close(script.refuse_code)
            return
        index = len(self.connections)
        await ws.send(
            json.dumps(
                {
                    "type": "session_id",
                    "session_id": f"fake-{index}",
                    "server_ip": "127.0.0.1",
                    "server_port": self.port,
                }
            )
        )
        try:
            async for raw in ws:
                message = json.loads(raw)
                connection.messages.append(message)
                await self._answer(connection, message, script)
        except Exception:  # a dropped client: nothing to answer
            pass
        finally:
            if connection.pc is not None:
                await connection.pc.close()

    async def _answer(
        self, connection: Connection, message: dict[str, Any], script: Script
    ) -> None:
        ws = connection.ws
        kind = message.get("type")
        if kind == "prompt":
            text = message.get("prompt")
            if text in script.refuse_prompts:
                ack = {"type": "prompt_ack", "prompt": text, "success": False}
                await ws.send(json.dumps({**ack, "error": f"prompt refused: {text}"}))
            elif script.prompts == "ack":
                await ws.send(json.dumps({"type": "prompt_ack", "prompt": text, "success": True}))
            elif script.prompts == "hold":
                connection.held.append(message)
        elif kind == "set_image" and script.images == "ack":
            await ws.send(json.dumps({"type": "set_image_ack", "success": True}))
        elif kind == "offer":
            await ws.send(
                json.dumps(
                    {
                        "type": "answer",
                        "sdp": await self._accept(connection, script, message["sdp"]),
                    }
                )
            )
        elif kind == "ice-candidate" and connection.pc is not None:
            parsed = parse_client(json.dumps(message))
            if isinstance(parsed, IceCandidate) and parsed.candidate is not None:
                await connection.pc.addIceCandidate(parsed.candidate.to_aiortc())

    async def _accept(self, connection: Connection, script: Script, sdp: str) -> str:
        pc = connection.pc = RTCPeerConnection()
        sink = MediaBlackhole()

        @pc.on("track")
        def on_track(track: Any) -> None:
            sink.addTrack(track)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                await sink.start()
                task = asyncio.create_task(self._generate(connection, script.ticks))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif pc.connectionState in ("failed", "closed"):
                await sink.stop()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def _generate(self, connection: Connection, ticks: int) -> None:
        with contextlib.suppress(Exception):
            await connection.ws.send(json.dumps({"type": "generation_started"}))
            for second in range(1, ticks + 1):
                await asyncio.sleep(0.2)
                await connection.ws.send(json.dumps({"type": "generation_tick", "seconds": second}))

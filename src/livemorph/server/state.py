"""What the request handlers share: settings, storage, engines, sessions, worker threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..config import Settings
from ..engines import EngineRegistry
from ..sessions import SessionRegistry
from ..storage import Store


@dataclass(slots=True)
class AppState:
    settings: Settings
    store: Store
    engines: EngineRegistry
    sessions: SessionRegistry
    executor: ThreadPoolExecutor

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        store = (
            Store(settings.database_url)
            if settings.database_url
            else Store.in_data_dir(settings.data_dir)
        )
        return cls(
            settings=settings,
            store=store,
            engines=EngineRegistry(settings.engine),
            sessions=SessionRegistry(),
            executor=ThreadPoolExecutor(
                max_workers=settings.engine_threads, thread_name_prefix="engine"
            ),
        )

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.sessions.close_all("server_shutdown")
        self.engines.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

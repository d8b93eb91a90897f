"""The bus for an asyncio front-end (`voxpipe web`, `voxpipe game`): one instance at a time, and a
thread that reads the bus for the event loop.

A `Connection` blocks in `receive`, so a thread reads it and hands each message to the event loop,
in order, where all the front-end's state lives; the loop never waits on the bus.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from ..protocol import Body, Message
from .connection import BusLost, Connection
from .instance import InstanceLock

log = logging.getLogger("voxpipe.runtime")


def feed_loop(bus: Connection, loop: asyncio.AbstractEventLoop, deliver: Callable[[Message[Body]], None],
              stopped: threading.Event, wanted: Callable[[Message[Body]], bool] = lambda message: True) -> None:
    """Run in a thread until `stopped`: every `wanted` message goes to `deliver` on `loop`. A lost bus
    is logged; the connection reconnects by itself."""
    while not stopped.is_set():
        try:
            message = bus.receive(0.2)
        except BusLost as exc:
            log.warning("%s", exc)
            continue
        if message is not None and wanted(message):
            loop.call_soon_threadsafe(deliver, message)


def serve_attached(lock: InstanceLock, what: str, bus: Connection, serve: Callable[[], Coroutine[Any, Any, int]],
                   prepare: Callable[[], None] = lambda: None) -> int:
    """Take the instance lock (AlreadyRunning names the one that runs), `prepare`, reach the bus
    (BusUnavailable when none answers), and run `serve()` to its exit code."""
    lock.acquire(what, f"stop it first (`voxpipe status` lists it as {bus.src})")
    try:
        prepare()
        bus.require_bus()
        bus.open()
        try:
            return asyncio.run(serve())
        finally:
            bus.close()
    finally:
        lock.release()

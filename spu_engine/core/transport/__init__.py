"""The engine's socket, both ends: ``EngineServer`` in the engine process, ``EngineClient`` in consoles and tests."""

from spu_engine.core.transport.client import EngineClient, socket_address
from spu_engine.core.transport.server import EngineServer

__all__ = ["EngineClient", "EngineServer", "socket_address"]

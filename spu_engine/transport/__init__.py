"""The engine's socket, both ends: ``EngineServer`` in the engine process, ``EngineClient`` in consoles and tests."""

from .client import EngineClient, socket_address
from .server import EngineServer

__all__ = ["EngineClient", "EngineServer", "socket_address"]

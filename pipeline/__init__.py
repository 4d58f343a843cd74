"""inferline core: plain asyncio and numpy, no Faust import, testable without a broker."""

__version__ = "0.1.0"

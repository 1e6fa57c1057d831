"""What every SDK service client shares: owning its gRPC channels and closing them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import grpc


class OwnedChannels:
    """Owns a client's channel and the channels it depends on (e.g. the auth channel
    of its token provider); closes them all, also as a context manager."""

    def __init__(self, channel: grpc.Channel, also_close: Sequence[grpc.Channel] = ()) -> None:
        self._channel = channel
        self._also_close = tuple(also_close)

    def close(self) -> None:
        """Close the channel and the channels it depends on."""
        self._channel.close()
        for channel in self._also_close:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

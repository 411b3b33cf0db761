"""The frames between the center and its MQTT worker process: a 4-byte length, then a pickle.

Both ends are the same program and the pipes are private to the two processes
(the child's stdin and stdout), so pickle, the fastest codec for a list of
tuples of str, bytes, int and bool, is safe here; it is never used on
anything from the network. The reader is sans-IO: bytes in, whole frames out,
a frame's size bounded.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

_LENGTH = struct.Struct(">I")
#: A frame's body at most: far above a batch of the publisher's MAX_OUTSTANDING messages of usual sizes.
MAX_FRAME = 1 << 30


class FrameError(ValueError):
    """The other end sent something that is no frame: the pipe is out of step and cannot be trusted."""


def encode(value: Any) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Takes the bytes of the pipe as they come; returns the frames completed by each chunk."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        frames: list[Any] = []
        start = 0
        with memoryview(buffer) as view:  # released before the buffer is cut
            while len(buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer, start)
                if length > MAX_FRAME:
                    raise FrameError(f"a frame of {length} bytes announced (at most {MAX_FRAME})")
                end = start + _LENGTH.size + length
                if len(buffer) < end:
                    break
                try:
                    frames.append(pickle.loads(view[start + _LENGTH.size:end]))
                except Exception as e:  # any unpickling error: the stream cannot be trusted from here
                    raise FrameError(f"not a frame: {e}") from None
                start = end
        del buffer[:start]
        return frames

"""Errors a Modbus request can fail with; their messages are meant for operators."""

from __future__ import annotations

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusError(Exception):
    """Base class of every failure a request to a meter can end with."""


class LinkOffline(ModbusError):
    """No connection is attached to the link, so nothing was sent."""

    def __init__(self, link: str) -> None:
        super().__init__(f"link {link} is offline")
        self.link = link


class LinkDisconnected(ModbusError):
    """The connection went away while the request was queued or in flight."""

    def __init__(self, link: str) -> None:
        super().__init__(f"link {link} disconnected before the answer arrived")
        self.link = link


class ModbusTimeout(ModbusError):
    """The unit did not answer, not even after the configured retries."""

    def __init__(self, unit: int, function_code: int, attempts: int) -> None:
        super().__init__(
            f"unit {unit} did not answer function {function_code}"
            f" ({attempts} attempt{'s' if attempts != 1 else ''})"
        )
        self.unit = unit
        self.function_code = function_code
        self.attempts = attempts


class ModbusExceptionResponse(ModbusError):
    """The unit answered with a Modbus exception response."""

    def __init__(self, unit: int, function_code: int, exception_code: int) -> None:
        name = EXCEPTION_NAMES.get(exception_code, "unknown exception")
        super().__init__(
            f"unit {unit} answered function {function_code}"
            f" with exception {exception_code} ({name})"
        )
        self.unit = unit
        self.function_code = function_code
        self.exception_code = exception_code


class ResponseMismatch(ModbusError):
    """A response passed the CRC but does not answer what was asked."""

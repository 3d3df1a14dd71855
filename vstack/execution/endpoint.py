"""The endpoint: terminates the application's UDP flow.

Outbound, the datapath hands the stack the transport payload (a slice of the packet read
from the TUN: no copy). Inbound, a stack's reply payload becomes a UDP/IP packet back to
the application with the *original* addresses and ports (source = the virtual destination
the application talked to, whatever the NAT picked), and correct IP and UDP checksums. The
header is precomputed per flow (``UDPTemplate``); each reply costs one checksum pass over
the payload, a length patch, and one ``write`` into the TUN.
"""

from __future__ import annotations

from collections.abc import Callable

from vstack.analysis.flowkey import FlowKey
from vstack.analysis.packet import UDPTemplate


class Endpoint:
    __slots__ = ("_build", "_write", "bytes_in", "errors", "key", "packets_in")

    def __init__(self, key: FlowKey, write: Callable[[bytes], object]) -> None:
        self.key = key
        # the reply travels from the virtual destination back to the application
        self._build = UDPTemplate(key.dst, key.src, key.dport, key.sport).build
        self._write = write
        self.packets_in = 0
        self.bytes_in = 0
        self.errors = 0

    def reply(self, payload: bytes) -> bytes:
        """The packet that carries ``payload`` to the application (for tests)."""
        return self._build(payload)

    def deliver(self, payload: bytes) -> None:
        """A stack's reply payload -> the application, through the TUN."""
        try:
            self._write(self._build(payload))
        except (OSError, ValueError):
            self.errors += 1
            return
        self.packets_in += 1
        self.bytes_in += len(payload)

"""The MPTCP stack (``"mptcp"``, RFC 8684): the TCP-framed stack (``tcp.py``) on a Multipath
TCP socket, ``socket(AF_INET[6], SOCK_STREAM, IPPROTO_MPTCP=262)``. Wire format, buffering,
errors, reconnects and options are the TCP stack's; only the socket differs. Which extra
subflows the kernel opens is the MPTCP path manager's business (``ip mptcp endpoint``).

If the kernel refuses MPTCP sockets (built without ``CONFIG_MPTCP``, or
``sysctl net.mptcp.enabled = 0`` in this network namespace), the stack says why in a
``StackError`` (``remote=False``) and carries the flow over plain TCP, with the same
framing, so a TCP-framed peer still understands it. Option ``fallback = false`` refuses
instead: ``open`` raises ``MptcpUnavailable`` (an ``OSError``) and the engine reports that
the stack could not open.

A peer that does not speak MPTCP makes the kernel fall back to TCP on its own (RFC 8684
§3.7); ``negotiated`` tells which happened after connecting (``MPTCP_INFO``: it fails with
EOPNOTSUPP on a fallen-back connection), ``subflows`` how many extra subflows there are
(both read at connect and every ``rtt_interval``).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

from vstack.execution.stacks.base import StackContext, StackError, register_stack
from vstack.execution.stacks.tcp import TcpStack, option_error

IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)
SOL_MPTCP = 284
MPTCP_INFO = 1
# struct mptcp_info (include/uapi/linux/mptcp.h): 0 u8 subflows, 1 add_addr_signal,
# 2 add_addr_accepted, 3 subflows_max, 4 add_addr_signal_max, 5 add_addr_accepted_max,
# 8 u32 flags (bit 0 FALLBACK, bit 1 REMOTE_KEY_RECEIVED), 12 u32 token.
MPTCP_INFO_LEN = 16
MPTCP_INFO_FLAG_FALLBACK = 1
SYSCTL_ENABLED = "/proc/sys/net/mptcp/enabled"
_REFUSED = frozenset({errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EINVAL,
                      errno.EAFNOSUPPORT, errno.ESOCKTNOSUPPORT})


class MptcpUnavailable(OSError):
    """The kernel refuses MPTCP sockets (local)."""


def mptcp_unavailable_reason(err: OSError) -> str:
    """Why the kernel refused ``socket(..., IPPROTO_MPTCP)``, from ``net.mptcp.enabled``."""
    try:
        with open(SYSCTL_ENABLED) as f:
            enabled = f.read().strip()
    except OSError:
        return (f"the kernel refuses MPTCP sockets ({err.strerror}): no {SYSCTL_ENABLED}, "
                "kernel built without CONFIG_MPTCP")
    if enabled == "0":
        return (f"the kernel refuses MPTCP sockets ({err.strerror}): sysctl "
                "net.mptcp.enabled = 0 in this network namespace")
    return f"the kernel refuses MPTCP sockets ({err.strerror}; net.mptcp.enabled = {enabled})"


@register_stack
class MptcpStack(TcpStack):
    name = "mptcp"
    ip_proto = IPPROTO_MPTCP
    OPTIONS: ClassVar[frozenset[str]] = TcpStack.OPTIONS | {"fallback"}

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        out = super().check_options(options)
        fb = (options or {}).get("fallback", True)
        if not isinstance(fb, bool):
            raise option_error(cls.name, "fallback", fb, "true or false")
        out["fallback"] = fb
        return out

    def __init__(self, ctx: StackContext) -> None:
        super().__init__(ctx)
        self.fallback: bool = self.check_options(ctx.options)["fallback"]
        self.plain_tcp = False  # the kernel refused MPTCP: plain TCP sockets
        self.negotiated: bool | None = None  # MPTCP in use on the last connection
        self.subflows = 0

    def _new_socket(self) -> socket.socket:
        fam = socket.AF_INET if self.ctx.family == 4 else socket.AF_INET6
        if not self.plain_tcp:
            try:
                return socket.socket(fam, socket.SOCK_STREAM, IPPROTO_MPTCP)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                reason = mptcp_unavailable_reason(e)
                if not self.fallback:
                    raise MptcpUnavailable(e.errno, reason) from e
                self.plain_tcp = True
                self.ctx.on_error(StackError(self.name, f"{reason}; falling back to TCP",
                                             remote=False))
        return socket.socket(fam, socket.SOCK_STREAM)

    def _refresh_info(self) -> None:
        s = self._sock
        if s is None:
            return
        try:
            info = s.getsockopt(SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_LEN)
        except OSError:  # EOPNOTSUPP: plain TCP, or MPTCP fell back
            self.negotiated = False
            self.subflows = 0
            return
        if len(info) < 12:
            self.negotiated = None
            return
        flags = struct.unpack_from("=I", info, 8)[0]
        self.negotiated = not flags & MPTCP_INFO_FLAG_FALLBACK
        self.subflows = info[0]

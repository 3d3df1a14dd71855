"""The offload datapath (issue 6): :class:`Datapath` over a TUN opened with ``IFF_VNET_HDR``
and ``TUNSETOFFLOAD`` (see :mod:`vstack.vnic.offload`).

Every packet read from the TUN starts with a 10-byte ``virtio_net_hdr``; every packet
written into it gets one too. Reading (``_on_tun_readable``):

* a **UDP super-packet** (``GSO_UDP_L4``: the application sent with ``UDP_SEGMENT``) of a
  flow on the fast path: its payload is cut into ``gso_size`` memoryview slices (no copy)
  and handed to the flow's ``send_many`` at once: the UDP stack sends them with **one
  ``sendmsg`` carrying ``UDP_SEGMENT``**; the DCCP stack's ``send_many`` takes the split
  views as one batch (DCCP-UDP packs them into ``UDP_SEGMENT`` runs);
* a plain UDP datagram of a fast-path flow: as in :class:`Datapath` (runs of equal size
  batched into one GSO ``sendmsg``); its ``NEEDS_CSUM`` does not matter (only the payload
  leaves);
* everything else goes through :func:`vstack.vnic.offload.to_datagrams` (super-packets
  split, UDP or TCP, checksums completed: those packets may leave unchanged through the
  raw stack) and then the ordinary slow path, one datagram at a time.

The header length is recomputed from the packet (IPv4 IHL, fixed IPv6 header); the vnet
header's ``hdr_len`` is never used.

Return path: UDP stack sockets get ``UDP_GRO`` (stack option ``gro``); a coalesced
receive reaches :meth:`Endpoint.deliver_gso`, which writes it into the TUN as one
``GSO_UDP_L4`` super-packet (``writev``: vnet header + IP/UDP header + the received
buffer, no copy); the kernel segments it for the application. Plain replies get a zero
vnet header.

Offloads refused by the kernel: :func:`vstack.vnic.offload.enable_offloads` falls back
(fewer offloads, none); with none the kernel still prepends a zero header and sends no
super-packets, and everything above still holds.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from vstack.analysis.flowkey import FlowKey
from vstack.datapath import (
    GSO_BYTES,
    MAX_SEGMENTS,
    Datapath,
    _fast_key,
)
from vstack.execution.endpoint import Endpoint
from vstack.execution.engine import StackEngine
from vstack.vnic import vnet
from vstack.vnic.offload import to_datagrams

UDP = 17
_GSO_UDP_L4 = vnet.GSO_UDP_L4
_HL = vnet.VNET_HDR_LEN
_LITTLE = sys.byteorder == "little"
READ_SIZE = 65535 + _HL + 64  # a whole super-packet in one read
_ZERO = vnet.NO_OFFLOAD


class OffloadDatapath(Datapath):
    """A :class:`Datapath` whose TUN carries virtio_net_hdrs (``attach`` an fd opened with
    ``IFF_VNET_HDR`` whose offloads were set with ``enable_offloads``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.super_packets = 0  # GSO super-packets read from the TUN
        self.gso_writes = 0  # GSO super-packets written into the TUN
        self.split_packets = 0  # super-packets split in user space for the slow path
        self._gso_write: Callable[[bytes, Any], int] | None = None
        # per fast-path key: the active stack's send_gso(payload, seg) where it has one
        # (the UDP stack: one sendmsg of the whole payload with UDP_SEGMENT)
        self._gso4: dict[bytes, Callable[[memoryview, int], None]] = {}
        self._gso6: dict[bytes, Callable[[memoryview, int], None]] = {}

    def attach(self, fd: int, loop: Any = None) -> None:
        super().attach(fd, loop)
        self._read_size = READ_SIZE
        writev = os.writev

        def write(pkt: bytes | bytearray | memoryview) -> int:
            return writev(fd, (_ZERO, pkt))

        def gso_write(head: bytes, body: Any) -> int:
            self.gso_writes += 1
            return writev(fd, (head, body))

        self._write = write
        self._gso_write = gso_write

    def _make_endpoint(self, key: FlowKey) -> Endpoint | None:
        ep = super()._make_endpoint(key)
        if ep is not None and self.tap is None:
            ep.enable_gso(self._gso_write)
        return ep

    def _register(self, e: StackEngine) -> None:
        super()._register(e)
        if e.key.proto != UDP:
            return
        fk = _fast_key(e.key)
        fast, gso = (self._fast6, self._gso6) if e.key.family == 6 else (self._fast4,
                                                                         self._gso4)
        f = getattr(e.active, "send_gso", None) if fk in fast else None
        if f is None:
            gso.pop(fk, None)
        else:
            gso[fk] = f

    def _unregister(self, key: FlowKey) -> None:
        super()._unregister(key)
        if key.proto == UDP:
            (self._gso6 if key.family == 6 else self._gso4).pop(_fast_key(key), None)

    def _stack_options(self, name: str) -> Mapping[str, Any]:
        opts = super()._stack_options(name)
        if name == "udp":
            opts = {**opts, "gro": True}
        return opts

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["super_packets"] = self.super_packets
        s["gso_writes"] = self.gso_writes
        s["split_packets"] = self.split_packets
        return s

    # ------------------------------------------------------------------ read path
    def _on_tun_readable(self) -> None:
        read = os.read
        fd = self._fd
        size = self._read_size
        fast4 = self._fast4
        fast6 = self._fast6
        gso4 = self._gso4
        gso6 = self._gso6
        batch = self._batch
        tap = self.tap
        n = fast = batched = supers = 0
        pend: list[memoryview] = []
        pend_f: Callable[[list[memoryview]], None] | None = None
        pend_len = pend_max = 0
        while n < batch:
            try:
                buf = read(fd, size)
            except BlockingIOError:
                break
            except OSError as e:
                self._tun_failed(e)
                break
            n += 1
            try:
                if tap is not None:
                    tap(buf[_HL:], time.time(), "app->net")
                gso = buf[1]
                b0 = buf[10]
                f = None
                ln = len(buf)
                if b0 == 0x45:
                    # UDP, not a fragment; a plain datagram's UDP length must match
                    if (buf[19] == UDP and not (buf[16] & 0x3F or buf[17])
                            and (gso == _GSO_UDP_L4
                                 or (buf[34] << 8 | buf[35]) == ln - 30 >= 8)):
                        fk = buf[22:34]
                        f = fast4.get(fk)
                        off = 38
                elif (b0 >> 4 == 6 and buf[16] == UDP
                      and (gso == _GSO_UDP_L4 or (buf[54] << 8 | buf[55]) == ln - 50 >= 8)):
                    fk = buf[18:54]
                    f = fast6.get(fk)
                    off = 58
                if f is not None:
                    plen = ln - off
                    if gso == _GSO_UDP_L4:
                        gs = (buf[4] | buf[5] << 8) if _LITTLE else (buf[4] << 8 | buf[5])
                        if 0 < gs < plen:
                            if pend_f is not None:
                                flush, pend_f = pend_f, None
                                if len(pend) > 1:
                                    batched += 1
                                flush(pend)
                            mv = memoryview(buf)
                            supers += 1
                            count = -(-plen // gs)
                            fast += count
                            g = (gso4 if off == 38 else gso6).get(fk)
                            if g is not None and count <= MAX_SEGMENTS:
                                g(mv[off:], gs)  # one sendmsg, one buffer, UDP_SEGMENT
                                continue
                            segs = [mv[i:i + gs] for i in range(off, ln, gs)]
                            step = max(1, min(MAX_SEGMENTS, GSO_BYTES // gs))
                            if len(segs) <= step:
                                f(segs)
                            else:
                                for j in range(0, len(segs), step):
                                    f(segs[j:j + step])
                            continue
                    fast += 1
                    if f is pend_f and plen == pend_len and len(pend) < pend_max:
                        pend.append(memoryview(buf)[off:])
                        continue
                    if pend_f is not None:
                        flush, pend_f = pend_f, None
                        if len(pend) > 1:
                            batched += 1
                        flush(pend)
                    pend = [memoryview(buf)[off:]]
                    pend_f = f
                    pend_len = plen
                    pend_max = min(MAX_SEGMENTS, GSO_BYTES // plen) if plen else 1
                    continue
                if pend_f is not None:
                    flush, pend_f = pend_f, None
                    if len(pend) > 1:
                        batched += 1
                    flush(pend)
                self._slow_vnet(buf)
            except IndexError:
                self.malformed += 1
            except Exception as e:
                self._count_error(e)
        self.super_packets += supers
        # as Datapath: the last run, the counters, the NAPI-like pause
        self._end_wakeup(n, fast, batched, pend_f, pend)

    def _slow_vnet(self, buf: bytes) -> None:
        try:
            hdr = vnet.parse_hdr(buf)
            pkts = to_datagrams(buf[_HL:], hdr)
        except vnet.VnetError:
            self.malformed += 1
            self.slow_packets += 1
            return
        if len(pkts) > 1:
            self.split_packets += 1
        for p in pkts:
            self._slow(p)

"""Monitoring event sources: the netlink monitor (links, addresses, routes)."""

from vstack.monitor.netlink import NetlinkMonitor, NetlinkTranslator

__all__ = ["NetlinkMonitor", "NetlinkTranslator"]

"""The authenticated management interface for the core network (HMAC-signed JSON over
UDP): ``auth`` is the sans-IO verifier, ``server`` the asyncio UDP adapter."""

from vstack.management.auth import Accepted, NonceCache, Rejected, Verifier, sign
from vstack.management.server import ManagementServer, parse_listen

__all__ = ["Accepted", "ManagementServer", "NonceCache", "Rejected", "Verifier", "parse_listen",
           "sign"]

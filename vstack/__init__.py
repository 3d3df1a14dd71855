"""vstack: protocol stack virtualization at the edge (VirtualStack, in Python).

The package layout follows the paper's architecture figure:

- ``vstack.vnic``        the virtual NIC (a Linux TUN device) and its routing
- ``vstack.analysis``    classifier and ID extractor (sans-IO packet parsing)
- ``vstack.decision``    the event-condition-action rule engine (``.rules`` files)
- ``vstack.execution``   flow manager, per-flow stack engines and the stacks
- ``vstack.dccp``        a user-space DCCP (RFC 4340, CCID2 RFC 4341), sans-IO
- ``vstack.management``  the authenticated management interface for the core network
- ``vstack.monitor``     netlink monitoring (links, addresses, routes)
- ``vstack.log``         the decision log writer (SQLite through SQLAlchemy)
- ``vstack.datapath``    the event loop: the packet path, top-down, in one place
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

if not ((3, 11) <= sys.version_info[:2] < (3, 13)):  # pragma: no cover - checked at import
    raise ImportError(
        f"vstack needs Python 3.11 or 3.12 (found {sys.version.split()[0]}): "
        "its rule engine, durable-rules, does not import on Python 3.13 or newer."
    )

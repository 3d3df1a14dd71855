"""(not yet written)"""

from __future__ import annotations

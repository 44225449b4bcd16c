"""Names the proxy keeps for itself in the backend: S3 clients never read, list or change them."""

from __future__ import annotations

from typing import Final

RESERVED_PREFIX: Final = ".cmek-proxy/"
"""Keys under this prefix hold the proxy's own state in the backend; clients never see them."""

"""Comparing JSON-ready records (configurations, intervention descriptions) the way they read back from a store.

Zarr attributes go through JSON, so tuples come back as lists; two records are the same when their canonical JSON
forms are, which is how saved head scores and finished intervention groups are recognised for re-use.
"""

from __future__ import annotations

import json
from typing import Any


def same_record(a: Any, b: Any) -> bool:
    """Whether two records are equal once written as JSON (key order and tuple/list differences ignored)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

"""The interactive editing page (`cxredit serve`): a FastAPI app + static files.

`engine.py` holds the model logic (no web dependencies); `app.py` the HTTP layer, which needs
the optional `[web]` extra (fastapi, uvicorn, python-multipart).
"""

from __future__ import annotations

import importlib.util

WEB_EXTRA_MISSING = "cxredit serve needs the web extra: pip install 'cxredit[web]'"
_WEB_MODULES = ("fastapi", "uvicorn")


def web_available() -> bool:
    """True when the web extra's packages can be imported."""
    multipart = any(importlib.util.find_spec(m) is not None  # python-multipart, new or old name
                    for m in ("python_multipart", "multipart"))
    return multipart and all(importlib.util.find_spec(m) is not None for m in _WEB_MODULES)

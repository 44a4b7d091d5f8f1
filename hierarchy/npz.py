"""Reading ``.npz`` archives from several threads at once (numpy only).

numpy parses every array's header with ``ast.literal_eval``. CPython 3.11 keeps the AST
constructor's recursion depth in state shared by the whole interpreter, so two threads parsing
at the same moment can fail with ``SystemError: AST constructor recursion depth mismatch``
(python/cpython#106905). It happened in CI, where four ``sync`` devices run as threads of one
process and read their data together; a FastAPI thread pool or Flower's thread-backed clients
could meet it the same way. Every ``.npz`` read that may run beside another goes through here,
one at a time (reading headers is quick; the arrays' bytes are read under the same lock).
"""

from __future__ import annotations

import os
import threading

import numpy as np

_LOCK = threading.Lock()


def read_npz(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the archive at ``path`` (no pickles). Raises KeyError for a
    missing array, and ValueError or OSError for a file that is not an .npz archive."""
    with _LOCK, np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in keys}

"""Supernode tests.

``tests/`` is on ``sys.path`` (pytest's rootdir conftest), so the directory ``tests/dfagent``
would be importable as a namespace package named ``dfagent`` — and since the project is installed
editable through an import hook that runs after the path finder, that namespace would shadow
the real ``dfagent`` package. Putting the repository root on ``sys.path`` lets the real
(regular) package win. ``pythonpath = ["."]`` in pytest's config would make this unnecessary.
"""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[3])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

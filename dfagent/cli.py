"""The ``dfagent`` command line (supernode, peer, get).

The P2P layer is tracked in issue 5; until it lands this entry point says so and exits 2
rather than pretending to run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    print("dfagent: the P2P agent is not implemented yet (see issue 5)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

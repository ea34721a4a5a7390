"""dfagent: the peer-to-peer chunk distribution layer (supernode scheduler and peer agent).

Built on ``nydusfs.format`` and ``nydusfs.storage``; nydusfs never imports dfagent.
"""

__version__ = "0.1.0"

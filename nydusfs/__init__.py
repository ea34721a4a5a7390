"""nydusfs: the lazy, verifying container image format, its builder and its filesystem.

Layers (dependencies point down): ``cli`` → ``builder`` → ``format``. ``format`` is pure bytes;
nothing here imports ``dfagent``.
"""

__version__ = "0.1.0"

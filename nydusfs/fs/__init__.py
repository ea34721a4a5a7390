"""The read-only nydusfs filesystem: ``model`` (testable semantics) + ``fuse`` (pyfuse3 adapter).

Only ``fuse.py`` imports pyfuse3; import it lazily so tools that never mount do not need it.
"""

from nydusfs.fs.model import Attr, FsError, FsStats, ImageFS

__all__ = ["Attr", "FsError", "FsStats", "ImageFS"]

"""The nydusfs image format: bootstrap layout, Merkle digests and the chunk codec.

Pure bytes in, bytes out: this package imports no network, FUSE or builder code, so every
other layer (builder, filesystem, storage, the P2P agent) can depend on it.
"""

from nydusfs.format.chunk import chunk_digest, decode, encode
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import (
    BlobRecord,
    ChunkRecord,
    ChunkRef,
    Dirent,
    Header,
    Inode,
    Xattr,
)
from nydusfs.format.writer import BootstrapParams, ChunkPlacement, InodeSpec, write_bootstrap

__all__ = [
    "BlobRecord",
    "Bootstrap",
    "BootstrapParams",
    "ChunkPlacement",
    "ChunkRecord",
    "ChunkRef",
    "Dirent",
    "Header",
    "Inode",
    "InodeSpec",
    "Xattr",
    "chunk_digest",
    "decode",
    "encode",
    "write_bootstrap",
]

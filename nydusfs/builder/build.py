"""``nydusfs build``: sources → tree → chunks → blob + bootstrap.

The orchestration layer of the builder. Steps, each a pure function of the input so that builds
are reproducible byte for byte:

1. Read the source into a ``Node`` tree: a directory (metadata only), or tar layers / an OCI
   layout / layer streams a caller supplies (``build_layers``: ``nydusfs convert`` feeds the
   layers of a registry image as they download), applied lowest first; file data is chunked
   into the spool as it streams past.
2. Resolve the prefetch list and fix the blob layout order (prefetch files first, then each
   directory's files together).
3. For a directory source, read file data in layout order through the chunk pipeline.
4. Assemble the blob from the spool in layout order (chunks found in ``--chunk-dict`` are
   referenced, not stored), name it by its sha256, and write the bootstrap.

Output goes to ``OUT/bootstrap`` and ``OUT/blobs/<sha256>``; temporary files live in ``OUT``
and are removed on failure, so an interrupted build leaves no half-written image behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from nydusfs.builder.chunker import make_chunker
from nydusfs.builder.dirsource import open_file, scan_directory
from nydusfs.builder.ocisource import open_oci_layout, parse_oci_ref
from nydusfs.builder.pipeline import AssembledBlobs, ChunkPipeline, Spool
from nydusfs.builder.tarsource import TarLayers
from nydusfs.builder.tree import Node, inode_order, layout_order, resolve
from nydusfs.errors import BuildError, SourceError
from nydusfs.format import layout as L
from nydusfs.format.chunk import DEFAULT_ZSTD_LEVEL
from nydusfs.format.reader import Bootstrap
from nydusfs.format.writer import BootstrapParams, InodeSpec, write_bootstrap

__all__ = ["BuildOptions", "BuildResult", "LayerInput", "build", "build_layers",
           "read_prefetch_file"]


@dataclass(slots=True)
class BuildOptions:
    chunk_size: int = 1 << 20
    chunker: str = "fixed"  # fixed | cdc
    compression: str = "zstd"  # zstd | none
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    chunk_dict: Path | None = None
    prefetch: list[bytes] = field(default_factory=list)  # paths in the image
    workers: int = max(1, os.cpu_count() or 1)
    progress: bool = False
    # Where the blobs of ``chunk_dict`` are: True = beside it (``DICT_DIR/blobs/``; they are
    # hardlinked into OUT/blobs), False = elsewhere, e.g. in a registry (``nydusfs convert``),
    # so they are neither looked for nor warned about. They stay in the blob table either way.
    dict_blobs_local: bool = True
    progress_desc: str = "build"


@dataclass(frozen=True, slots=True)
class LayerInput:
    """One tar layer a caller supplies to :func:`build_layers`.

    ``open()`` returns a context manager giving a readable stream of the layer's bytes
    (compressed or not, as an OCI layer is). The caller vouches for the bytes: the stream (or the
    context manager's exit) must raise ``IntegrityError`` when they do not match the layer's
    digest, which is why a missing end-of-archive marker is tolerated, as for OCI layouts.
    """

    label: str  # names the layer in errors, e.g. "layer sha256:0123abcd"
    open: Callable[[], AbstractContextManager[BinaryIO]]


@dataclass(slots=True)
class BuildResult:
    root_digest: str
    bootstrap: Path
    bootstrap_sha256: str
    blobs: list[dict[str, Any]]
    inodes: int
    files: int
    directories: int
    symlinks: int
    hardlinked_files: int
    chunks: int  # unique chunks referenced by the image
    chunks_new: int  # stored in the new blob
    chunks_from_dict: int  # referenced from --chunk-dict blobs
    bytes_in: int  # file data read (incl. overwritten/deleted tar data)
    bytes_out: int  # size of the new blob
    dedup_saved_bytes: int  # uncompressed bytes not stored again (duplicates + dictionary)
    prefetch_files: int
    warnings: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["bootstrap"] = str(self.bootstrap)
        return d


def read_prefetch_file(path: Path) -> list[bytes]:
    """Prefetch list: one image path per line; blank lines and ``#`` comments ignored."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise BuildError(f"--prefetch {path}: {exc.strerror}") from exc
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(b"#")]


class _Progress:
    """A byte counter on stderr when it is a terminal (tqdm); silent otherwise."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             leave=False, file=sys.stderr)

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _prefetch_nodes(root: Node, paths: Sequence[bytes], warn: Callable[[str], None]) -> list[Node]:
    out: list[Node] = []
    for p in paths:
        try:
            node = resolve(root, p.split(b"/"))
        except SourceError:  # a symlink loop: as unusable as a missing path
            node = None
        if node is None:
            warn(f"prefetch: {p.decode('utf-8', 'backslashreplace')} not in the image, skipped")
        elif node.is_reg():
            out.append(node)
        elif node.is_dir():
            out.extend(layout_order(node, []))
    return out


def build(sources: Sequence[str], out: Path, options: BuildOptions) -> BuildResult:
    """Build an image from ``sources`` into ``out``; see the module docstring."""
    if not sources:
        raise BuildError("no source given")
    return _build(sources, None, out, options)


def build_layers(layers: Iterable[LayerInput], out: Path, options: BuildOptions) -> BuildResult:
    """Build an image from tar layers supplied as streams, lowest first, into ``out``.

    The same build as ``nydusfs build oci:LAYOUT`` (identical layers give an identical image),
    but the layers can come from anywhere: each is opened, applied and closed in turn, so a
    caller can produce layer ``n + 1`` (download it) while layer ``n`` is applied. ``layers``
    is iterated lazily, on the calling thread.
    """
    return _build((), layers, out, options)


def _build(sources: Sequence[str], layers: Iterable[LayerInput] | None, out: Path,
           options: BuildOptions) -> BuildResult:
    t0 = time.monotonic()
    chunker = make_chunker(options.chunker, options.chunk_size)
    if options.compression not in ("zstd", "none"):
        raise BuildError(f"unknown compression {options.compression!r} (known: zstd, none)")
    if not 1 <= options.zstd_level <= 22:
        raise BuildError("--zstd-level must be 1..22")
    level = options.zstd_level if options.compression == "zstd" else None

    chunk_dict = Bootstrap.open(options.chunk_dict) if options.chunk_dict else None
    blob_dir = out / "blobs"
    created = [d for d in (out, blob_dir) if not d.exists()]
    assembled: AssembledBlobs | None = None
    try:
        blob_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if chunk_dict is not None:
            chunk_dict.close()
        raise BuildError(f"{out}: cannot create output directory: {exc.strerror}") from exc
    warnings: list[str] = []
    spool = Spool(out / f".spool-{os.getpid()}", chunk_dict)
    tmp_boot = out / f".bootstrap-{os.getpid()}.tmp"
    pipeline: ChunkPipeline | None = None
    progress: _Progress | None = None
    try:
        kind = "layers" if layers is not None else _classify(sources)
        if kind == "dir" and os.path.samefile(sources[0], out):
            raise BuildError("the output directory must not be the source directory")
        progress = _Progress(options.progress, options.progress_desc)
        pipeline = ChunkPipeline(spool, chunker, level, options.workers, progress.update,
                                 options.chunk_size)
        if kind == "dir":
            out_st = out.stat()
            root, excluded = scan_directory(sources[0], {(out_st.st_dev, out_st.st_ino)})
            warnings.extend(f"output directory {os.fsdecode(p)} inside the source: left out"
                            for p in excluded)
        else:
            root = _apply_layers(kind, sources, layers, pipeline, warnings)
        first = _prefetch_nodes(root, options.prefetch, warnings.append)
        order = layout_order(root, first)
        if kind == "dir":
            src_root = os.fsencode(os.path.abspath(sources[0]))
            progress.set_total(sum(n.size for n in order))
            for node in order:
                assert node.data is not None
                pipeline.add_file(node, _SourceFile(src_root, node.data))  # type: ignore[arg-type]
        pipeline.flush()
        assembled = spool.assemble((d for n in order for d in (n.chunks or ())), blob_dir)
        specs, ino_of = _inode_specs(root)
        prefetch_inos = [ino_of[id(n)] for n in dict.fromkeys(first)]
        buf = io.BytesIO()
        root_digest = write_bootstrap(
            buf, specs, assembled.placements, assembled.blobs, prefetch_inos,
            BootstrapParams(options.chunk_size, options.chunker == "cdc",
                            L.COMPRESSION_ZSTD if level else L.COMPRESSION_NONE),
        )
        data = buf.getvalue()
        blobs_info = _link_dict_blobs(
            assembled.blobs, len(assembled.dict_blob_indexes),
            options.chunk_dict if options.dict_blobs_local else None, blob_dir, warnings)
        # The bootstrap goes last: once it is in place, everything it references is too.
        with open(tmp_boot, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_boot, out / "bootstrap")
    except BaseException:
        for p in (spool.path, tmp_boot):
            p.unlink(missing_ok=True)
        for p in blob_dir.glob(".blob-*.tmp"):
            p.unlink(missing_ok=True)
        if assembled is not None and assembled.new_blob and assembled.new_blob_created:
            assembled.new_blob.unlink(missing_ok=True)
        for d in reversed(created):  # leave OUT as we found it
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        if pipeline is not None:
            pipeline.close()
        if progress is not None:
            progress.close()
        spool.close()
        if chunk_dict is not None:
            chunk_dict.close()

    counts = {"files": 0, "directories": 0, "symlinks": 0, "hardlinked": 0}
    for spec in specs:
        fmt = stat.S_IFMT(spec.mode)
        counts["files"] += fmt == stat.S_IFREG
        counts["directories"] += fmt == stat.S_IFDIR
        counts["symlinks"] += fmt == stat.S_IFLNK
    counts["hardlinked"] = _count_hardlinked(specs)
    return BuildResult(
        root_digest=root_digest.hex(),
        bootstrap=out / "bootstrap",
        bootstrap_sha256=hashlib.sha256(data).hexdigest(),
        blobs=blobs_info,
        inodes=len(specs),
        files=counts["files"],
        directories=counts["directories"],
        symlinks=counts["symlinks"],
        hardlinked_files=counts["hardlinked"],
        chunks=len(assembled.placements),
        chunks_new=assembled.chunks_new,
        chunks_from_dict=assembled.chunks_from_dict,
        bytes_in=pipeline.bytes_in,
        bytes_out=assembled.blobs[0][1] if assembled.new_blob else 0,
        dedup_saved_bytes=pipeline.bytes_deduped,
        prefetch_files=len(prefetch_inos),
        warnings=warnings,
        seconds=round(time.monotonic() - t0, 3),
    )


def _classify(sources: Sequence[str]) -> str:
    """'dir', 'tar' or 'oci'."""
    if any(parse_oci_ref(s) for s in sources):
        if len(sources) != 1:
            raise BuildError("an oci: source must be the only source")
        return "oci"
    for s in sources:
        if not os.path.exists(s):
            raise SourceError(f"{s}: no such file or directory")
    if len(sources) == 1 and os.path.isdir(sources[0]):
        return "dir"
    if any(os.path.isdir(s) for s in sources):
        raise BuildError("a directory source must be the only source")
    return "tar"


def _apply_layers(
    kind: str, sources: Sequence[str], inputs: Iterable[LayerInput] | None,
    pipeline: ChunkPipeline, warnings: list[str]
) -> Node:
    layers = TarLayers(pipeline)
    if kind == "tar":
        for s in sources:
            try:
                f = open(s, "rb")  # noqa: SIM115
            except OSError as exc:
                raise SourceError(f"{s}: {exc.strerror}") from exc
            with f:
                layers.apply(f, s)
    elif kind == "layers":
        assert inputs is not None
        for layer in inputs:
            with layer.open() as stream:
                layers.apply(stream, layer.label, verified=True)
    else:
        ref = parse_oci_ref(sources[0])
        assert ref is not None
        image = open_oci_layout(*ref)
        for desc in image.layers:
            with image.open_layer(desc) as reader:
                layers.apply(reader, f"layer {desc.digest[:19]}", verified=True)  # type: ignore[arg-type]
    warnings.extend(f"skipped {s}" for s in layers.skipped)
    root = layers.root
    root.mode = stat.S_IFDIR | (root.mode & 0o7777)
    return root


class _SourceFile:
    """Opens and reads one source file; OS errors become ``SourceError`` naming the file.

    Runs in worker threads for small files, so it must not touch shared state.
    """

    def __init__(self, src_root: bytes, rel: bytes) -> None:
        self._root = src_root
        self._rel = rel
        self._f: BinaryIO | None = None

    def __call__(self) -> _SourceFile:
        try:
            self._f = os.fdopen(open_file(self._root, self._rel), "rb", buffering=0)
        except OSError as exc:
            raise SourceError(f"{os.fsdecode(self._rel)}: cannot open: {exc.strerror}") from exc
        return self

    def read(self, n: int = -1) -> bytes:
        assert self._f is not None
        try:
            return self._f.read(n)
        except OSError as exc:
            raise SourceError(f"{os.fsdecode(self._rel)}: read failed: {exc.strerror}") from exc

    def __enter__(self) -> _SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()


def _inode_specs(root: Node) -> tuple[list[InodeSpec], dict[int, int]]:
    ino_of: dict[int, int] = {}
    specs: list[InodeSpec] = []
    for node, parent, _name in inode_order(root):
        ino_of[id(node)] = len(specs) + 1
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        specs.append(InodeSpec(
            mode=node.mode, uid=node.uid, gid=node.gid, mtime_sec=sec, mtime_nsec=nsec,
            rdev=node.rdev, size=node.size, parent=ino_of[id(parent)], xattrs=node.xattrs,
            target=node.target, chunks=node.chunks or [],
        ))
    for node, _parent, _name in inode_order(root):
        if node.is_dir():
            specs[ino_of[id(node)] - 1].children = [
                (name, ino_of[id(child)]) for name, child in node.kids().items()
            ]
    return specs, ino_of


def _count_hardlinked(specs: list[InodeSpec]) -> int:
    refs: dict[int, int] = {}
    for spec in specs:
        for _name, ino in spec.children:
            refs[ino] = refs.get(ino, 0) + 1
    return sum(1 for ino, n in refs.items()
               if n > 1 and not stat.S_ISDIR(specs[ino - 1].mode))


def _link_dict_blobs(
    blobs: list[tuple[bytes, int]],
    n_dict: int,
    dict_path: Path | None,
    blob_dir: Path,
    warnings: list[str],
) -> list[dict[str, Any]]:
    """Describe the blob table; hardlink (or copy) dictionary blobs into OUT/blobs when found."""
    n_new = len(blobs) - n_dict
    info: list[dict[str, Any]] = []
    for i, (sha, size) in enumerate(blobs):
        entry: dict[str, Any] = {"digest": "sha256:" + sha.hex(), "size": size, "new": i < n_new}
        if i >= n_new and dict_path is not None:
            src = dict_path.parent / "blobs" / sha.hex()
            dst = blob_dir / sha.hex()
            if not dst.exists():
                if src.exists():
                    try:
                        os.link(src, dst)
                    except OSError:  # another filesystem
                        shutil.copyfile(src, dst)
                else:
                    warnings.append(f"chunk-dict blob {sha.hex()} not found beside the dictionary;"
                                    " it must be available to readers")
        info.append(entry)
    return info

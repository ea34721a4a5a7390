"""Shared fixtures: the full test tree (built once per session, needs root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from treegen import FullTreeInfo, build_full_tree


@pytest.fixture(scope="session")
def full_tree_info(tmp_path_factory: pytest.TempPathFactory) -> FullTreeInfo:
    """The tree from ``treegen.build_full_tree`` and what was put in it (see ``FullTreeInfo``)."""
    if os.geteuid() != 0:
        pytest.skip("the full tree needs root: mknod, chown, trusted.* and security.* xattrs")
    return build_full_tree(tmp_path_factory.mktemp("full_tree") / "rootfs")


@pytest.fixture(scope="session")
def full_tree(full_tree_info: FullTreeInfo) -> Path:
    """Root of a tree with every inode type a container rootfs has; treat it as read-only."""
    return full_tree_info.root

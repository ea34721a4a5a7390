"""The nydusfs builder: directory / tar layers / OCI layout → bootstrap + blob.

Depends on ``format`` only. See ``build.py`` for the steps and the reproducibility contract.
"""

from nydusfs.builder.build import BuildOptions, BuildResult, build, read_prefetch_file

__all__ = ["BuildOptions", "BuildResult", "build", "read_prefetch_file"]

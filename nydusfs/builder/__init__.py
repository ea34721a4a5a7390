"""The nydusfs builder: directory / tar layers / OCI layout → bootstrap + blob.

Depends on ``format`` only. See ``build.py`` for the steps and the reproducibility contract.
"""

from nydusfs.builder.build import (
    BuildOptions,
    BuildResult,
    LayerInput,
    build,
    build_layers,
    read_prefetch_file,
)

__all__ = ["BuildOptions", "BuildResult", "LayerInput", "build", "build_layers",
           "read_prefetch_file"]

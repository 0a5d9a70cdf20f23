"""adaptr: a catalog, merge engine and exporter for LoRA adapters, with lineage.

The public Python API is the service layer; the CLI and the REST API call the same
functions. Heavy libraries (torch) are imported only by operations that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptr.errors import AdaptrError

__version__ = "0.1.0"

__all__ = ["AdaptrError", "Catalog", "__version__", "hookimpl", "merge"]

if TYPE_CHECKING:
    from adaptr.hookspecs import hookimpl
    from adaptr.services.catalog import Catalog


def __getattr__(name: str) -> Any:
    # lazy: `import adaptr.ops` needs torch alone (the GPU kernels and their benchmark import it)
    if name == "hookimpl":
        from adaptr.hookspecs import hookimpl

        return hookimpl
    if name == "Catalog":
        from adaptr.services.catalog import Catalog

        return Catalog
    if name == "merge":
        from adaptr.services.merge import merge

        return merge
    raise AttributeError(name)

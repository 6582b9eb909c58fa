"""Model weights: where they come from (`sources`), how keys map (`spec`), reading and
loading them sharded (`loader`), seeded random weights (`dummy`), and materialising a
module built on the meta device on its own device (`materialize`); a URL source's file is
downloaded by `download`; hub snapshots live in the shared cache (`cache`: pulls, leases,
verification) with its SQLite index (`index`) and eviction plan (`eviction`)."""

from mstar.weights.dummy import init_dummy_weights
from mstar.weights.loader import (
    LoadReport,
    StoredTensor,
    UnsafeCheckpointError,
    WeightLoadError,
    iter_checkpoint,
    load_weights,
)
from mstar.weights.materialize import UninitializedError, materialize
from mstar.weights.sources import (
    WeightSourceError,
    checkpoint_files,
    read_checkpoint_config,
    resolve_source,
)
from mstar.weights.spec import WeightSpec

__all__ = [
    "LoadReport",
    "StoredTensor",
    "UninitializedError",
    "UnsafeCheckpointError",
    "WeightLoadError",
    "WeightSourceError",
    "WeightSpec",
    "checkpoint_files",
    "init_dummy_weights",
    "iter_checkpoint",
    "load_weights",
    "materialize",
    "read_checkpoint_config",
    "resolve_source",
]

"""Computation-graph primitives: nodes, sequences, parallel branches, loops and edges."""

from mstar.graph.primitives import (
    ChunkPolicy,
    GraphEdge,
    GraphNode,
    Join,
    Loop,
    Parallel,
    Partition,
    Sequential,
    StreamingGraphEdge,
    Walk,
    WalkItem,
    walk_nodes,
)

__all__ = [
    "ChunkPolicy",
    "GraphEdge",
    "GraphNode",
    "Join",
    "Loop",
    "Parallel",
    "Partition",
    "Sequential",
    "StreamingGraphEdge",
    "Walk",
    "WalkItem",
    "walk_nodes",
]

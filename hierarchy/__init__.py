"""Class hierarchies, information metrics and decoding (numpy only)."""

from hierarchy.decode import Decoded, beam, decode, greedy, leaf_rule, majority_rule, node_probs, threshold
from hierarchy.metrics import correct, exact, info_f1, info_precision, info_recall, summarize
from hierarchy.taxonomies import TAXONOMIES, build_taxonomy, load_taxonomy
from hierarchy.tree import Hierarchy, HierarchyError

__all__ = [
    "Decoded", "Hierarchy", "HierarchyError", "TAXONOMIES", "beam", "build_taxonomy", "correct",
    "decode", "exact", "greedy", "info_f1", "info_precision", "info_recall", "leaf_rule",
    "load_taxonomy", "majority_rule", "node_probs", "summarize", "threshold",
]

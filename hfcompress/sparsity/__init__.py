"""Sparsity building blocks: exact keep-masks (unstructured and N:M), N:M index coding, per-layer allocation."""

from .masks import check_sparsity, nm_mask, prune_count, split_count, unstructured_mask, validate_nm

__all__ = ["check_sparsity", "nm_mask", "prune_count", "split_count", "unstructured_mask", "validate_nm"]

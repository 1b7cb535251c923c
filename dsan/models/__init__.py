"""DSAN models; importing this package registers `dsan_t`, `dsan_t2` and `dsan_s` with timm."""
from .dsan import (
    DSA,
    DSAN,
    Block,
    CheckpointError,
    DSCNPair,
    Mlp,
    OverlapPatchEmbed,
    checkpoint_filter_fn,
    dsan_s,
    dsan_t,
    dsan_t2,
    extract_state_dict,
    infer_groups,
    load_checkpoint,
    read_checkpoint,
)

__all__ = [
    'DSA', 'DSAN', 'Block', 'CheckpointError', 'DSCNPair', 'Mlp', 'OverlapPatchEmbed', 'checkpoint_filter_fn',
    'dsan_s', 'dsan_t', 'dsan_t2', 'extract_state_dict', 'infer_groups', 'load_checkpoint', 'read_checkpoint',
]

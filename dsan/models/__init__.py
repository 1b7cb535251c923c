"""DSAN models; importing this package registers `dsan_t`, `dsan_t2` and `dsan_s` with timm."""
from ._checkpoint import (
    CheckpointError,
    NoPretrainedWeightsError,
    check_state_dict,
    extract_state_dict,
    read_checkpoint,
)
from .dsan import (
    DSA,
    DSAN,
    Block,
    DSCNPair,
    Mlp,
    OverlapPatchEmbed,
    checkpoint_filter_fn,
    describe_state_dict,
    dsan_s,
    dsan_t,
    dsan_t2,
    infer_groups,
    load_checkpoint,
)

__all__ = [
    'DSA', 'DSAN', 'Block', 'CheckpointError', 'DSCNPair', 'Mlp', 'NoPretrainedWeightsError', 'OverlapPatchEmbed',
    'check_state_dict', 'checkpoint_filter_fn', 'describe_state_dict', 'dsan_s', 'dsan_t', 'dsan_t2',
    'extract_state_dict', 'infer_groups', 'load_checkpoint', 'read_checkpoint',
]

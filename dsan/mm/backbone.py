"""DSAN as an OpenMMLab backbone, for mmsegmentation 1.x and mmdetection 3.x alike.

A thin adapter over the one model definition, :class:`dsan.models.dsan.DSAN`: it subclasses it, so module and
parameter names are exactly the original's (`backbone.patch_embed1.proj.weight`, ...) and released segmentor
and detector checkpoints load strictly. It is registered once, in mmengine's root ``MODELS`` registry, which
the mmseg and mmdet registries fall back to; configs enable it with
``custom_imports = dict(imports=['dsan.mm'], allow_failed_imports=False)`` and ``backbone=dict(type='DSAN', ...)``.
"""
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import PretrainedInit
from mmengine.registry import MODELS
from mmengine.runner import CheckpointLoader
from timm.models import adapt_input_conv

from dsan.models.dsan import (
    DSAN,
    CheckpointError,
    check_strip_geometry,
    checkpoint_filter_fn,
    extract_state_dict,
    infer_groups,
)

from .checkpoint import load_checkpoint_file

__all__ = ['DSANBackbone', 'sync_bn_available']

_SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN')


def sync_bn_available() -> bool:
    """Whether SyncBN can synchronise here: a distributed run of more than one process, on CUDA."""
    return (torch.cuda.is_available() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def _build_norm(cfg: dict, num_features: int) -> nn.Module:
    return build_norm_layer(cfg, num_features)[1]


@MODELS.register_module(name='DSAN')
class DSANBackbone(DSAN, BaseModule):
    """DSAN backbone returning the normalised NCHW maps of its stages (strides 4, 8, 16, 32).

    Takes the constructor arguments of the original mm backbone, so its configs read the same, plus
    `out_indices` and `frozen_stages`. `paddings`, `strides` and `dilations` are accepted for those configs but
    must be what every DSAN uses: 'same' padding (K - 1) / 2, stride 1, dilation 1.
    """

    def __init__(
            self,
            in_chans: int = 3,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            kernel_sizes: Sequence[int] = (11, 11, 7, 5),
            dw_kernel_sizes: Sequence[int] = (11, 11, 7, 5),
            paddings: Sequence[int] | None = None,
            strides: Sequence[int] | None = None,
            dilations: Sequence[int] | None = None,
            groups: Sequence[int] = (4, 4, 4, 4),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            depths: Sequence[int] = (3, 4, 6, 3),
            num_stages: int = 4,
            linear: bool = False,
            out_indices: int | Sequence[int] | None = None,
            frozen_stages: int = -1,
            norm_cfg: Mapping[str, Any] | None = None,
            norm_eps: float = 1e-5,
            backend: str = 'auto',
            pretrained: str | None = None,
            init_cfg: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ):
        """
        Args:
            in_chans: Input image channels.
            embed_dims: Channels of the stages.
            mlp_ratios: MLP expansion per stage.
            kernel_sizes: DSCN taps per stage (odd).
            dw_kernel_sizes: Depthwise strip conv kernel of the DSCN offset branches per stage.
            paddings: DSCN padding per stage; must be (K - 1) / 2 (None: that).
            strides: DSCN stride per stage; must be 1 (None: that).
            dilations: DSCN dilation per stage; must be 1 (None: that).
            groups: DSCN groups per stage.
            drop_rate: Dropout rate inside the MLPs.
            drop_path_rate: Stochastic depth rate, linear from 0 over all blocks.
            depths: Blocks per stage.
            num_stages: Stages to build (the first `num_stages` entries of the per-stage lists). The drop-path
                rates stay those of all the listed stages' blocks, as in the original.
            linear: The original's argument; must be False (as in every DSAN config).
            out_indices: Stages (0-based) whose normalised output `forward` returns, in order (an int: one stage;
                None: every stage built, as the original).
            frozen_stages: Stages 1..frozen_stages are frozen (no gradients, norms in eval mode); -1 none.
            norm_cfg: mmcv norm config of the BatchNorms (default SyncBN): a norm over NCHW maps (BN, SyncBN, GN,
                IN; not LN, which normalises the last axis). SyncBN becomes plain BN where it cannot synchronise: a
                single process, or no CUDA (a gloo run on CPU).
            norm_eps: Epsilon of the stage LayerNorms (1e-5, as the original mm backbones).
            backend: DSCN operator backend: 'auto', 'cpp' or 'pytorch'.
            pretrained: Deprecated: checkpoint path, same as `init_cfg=dict(type='Pretrained', checkpoint=...)`.
            init_cfg: mmengine init config; `dict(type='Pretrained', checkpoint=PATH[, prefix=...])` loads an
                original encoder file, any classification checkpoint format `dsan.models.load_checkpoint`
                reads (the classifier is dropped), or the `backbone.*` part of a segmentor/detector file;
                `checkpoint=None` keeps the random initialisation (with a warning). In a list of init configs, the
                `Pretrained` entry is loaded so too, after mmengine ran the others.
        """
        if init_cfg is not None and pretrained is not None:
            raise ValueError('init_cfg and pretrained cannot be set at the same time: use init_cfg.')
        if isinstance(pretrained, str):
            # A FutureWarning as mmseg's backbones warn: a DeprecationWarning raised inside the registry's build is
            # hidden by Python's default filters, so configs would never hear of it.
            warnings.warn("DSAN: 'pretrained' is deprecated, use init_cfg=dict(type='Pretrained', checkpoint=...)",
                          FutureWarning, stacklevel=2)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        elif pretrained is not None:
            raise TypeError(f'pretrained must be a str or None, got {type(pretrained).__name__}.')
        if not (init_cfg is None or isinstance(init_cfg, Mapping) or (
                isinstance(init_cfg, (list, tuple)) and all(isinstance(c, Mapping) for c in init_cfg))):
            raise TypeError(f'init_cfg must be a dict (e.g. dict(type=\'Pretrained\', checkpoint=PATH)), a list of '
                            f'dicts or None, got {type(init_cfg).__name__} {init_cfg!r}.')
        per_stage = dict(embed_dims=embed_dims, mlp_ratios=mlp_ratios, kernel_sizes=kernel_sizes,
                         dw_kernel_sizes=dw_kernel_sizes, groups=groups, depths=depths)
        if not 1 <= num_stages <= min(len(v) for v in per_stage.values()):
            raise ValueError(f'num_stages must be in [1, {min(len(v) for v in per_stage.values())}] (the length of '
                             f'the per-stage lists), got {num_stages}.')
        all_blocks = sum(depths)
        per_stage = {k: list(v)[:num_stages] for k, v in per_stage.items()}
        # The original spaced the drop-path rates over the blocks of every listed stage, also when it built fewer:
        # the first n of linspace(0, r, N) are linspace(0, r * (n - 1) / (N - 1), n).
        if sum(per_stage['depths']) < all_blocks:
            drop_path_rate = drop_path_rate * (sum(per_stage['depths']) - 1) / (all_blocks - 1)
        check_strip_geometry(per_stage['kernel_sizes'], paddings, strides, dilations)
        if linear:
            raise ValueError("linear=True (the original's ReLU after each MLP's fc1, a PVTv2 option no DSAN config "
                             'sets) is not supported; leave it False.')
        if out_indices is None:
            out_indices = tuple(range(num_stages))
        elif isinstance(out_indices, int):  # mmseg's backbones take a single stage as an int too
            out_indices = (out_indices,)
        if not isinstance(out_indices, Sequence) or not all(isinstance(i, int) for i in out_indices):
            raise TypeError(f'out_indices must be an int or a sequence of ints (stage indices), got '
                            f'{type(out_indices).__name__} {out_indices!r}.')
        out_indices = tuple(out_indices)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must be non-empty stage indices in [0, {num_stages - 1}], '
                             f'got {list(out_indices)}.')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {num_stages}], got {frozen_stages}.')

        norm_cfg = dict(norm_cfg if norm_cfg is not None else dict(type='SyncBN', requires_grad=True))
        if norm_cfg.get('type') in _SYNC_BN_TYPES and not sync_bn_available():
            print_log(f"DSAN: norm_cfg type {norm_cfg['type']} -> BN (no multi-process CUDA run to synchronise).",
                      logger='current', level=logging.INFO)
            norm_cfg['type'] = 'BN'
        if isinstance(_build_norm(norm_cfg, embed_dims[0]), nn.LayerNorm):  # (a GN's groups divide the widths)
            raise ValueError(f"norm_cfg {norm_cfg!r} builds a LayerNorm, which normalises the last axis: DSAN's "
                             "BatchNorms need a norm over NCHW maps (type 'BN', 'SyncBN', 'GN' or 'IN'). The stage "
                             'LayerNorms are built anyway; `norm_eps` sets their epsilon.')
        super().__init__(
            in_chans=in_chans, num_classes=0, global_pool='', drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            norm_eps=norm_eps, backend=backend, norm_layer=partial(_build_norm, norm_cfg), **per_stage)
        # DSAN.__init__ reached BaseModule.__init__ through super() with no init_cfg: set it now.
        self.init_cfg = dict(init_cfg) if isinstance(init_cfg, Mapping) else init_cfg
        self.norm_cfg = norm_cfg
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages):
            for name in (f'patch_embed{i + 1}', f'block{i + 1}', f'norm{i + 1}'):
                module = getattr(self, name)
                module.eval()
                for p in module.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> 'DSANBackbone':
        """Set the training mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        """Load the `Pretrained` checkpoint of `init_cfg` (strictly, head dropped), or keep DSAN's own init.

        DSAN's constructor already initialises every layer as the original does when no checkpoint is given.
        Other `init_cfg` types go to mmengine's initialisers; in a list of configs they run first and the
        `Pretrained` entry (at most one) is loaded last, as mmengine orders them.

        Raises:
            ValueError: A list `init_cfg` has more than one `Pretrained` entry.
        """
        cfg = self.init_cfg
        if cfg is None or self.is_init:
            return
        cfgs = [cfg] if isinstance(cfg, Mapping) else list(cfg)
        pretrained = [c for c in cfgs if c.get('type') in ('Pretrained', PretrainedInit)]
        others = [c for c in cfgs if c.get('type') not in ('Pretrained', PretrainedInit)]
        if len(pretrained) > 1:
            raise ValueError(f'init_cfg has {len(pretrained)} Pretrained entries, expected at most one: {cfg!r}.')
        if others:
            # mmengine's PretrainedInit would load non-strictly, without the prefix handling and the groups check:
            # hand mmengine only the other entries, and load the checkpoint here.
            self.init_cfg = others
            try:
                BaseModule.init_weights(self)
            finally:
                self.init_cfg = cfg
        if not pretrained:
            return
        cfg = pretrained[0]
        if cfg.get('checkpoint') is None:
            # Lets a config name the Pretrained init and leave the file to --cfg-options (the demos do).
            print_log('DSAN: init_cfg Pretrained has checkpoint=None: the backbone keeps its random initialisation.',
                      logger='current', level=logging.WARNING)
        else:
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
        self._is_init = True

    def load_pretrained(self, checkpoint: str | os.PathLike | Mapping[str, Any], prefix: str | None = None) -> None:
        """Load backbone weights from a checkpoint file (or a loaded checkpoint) and check that they fit.

        Args:
            checkpoint: Local path, a URL / `scheme://` path that mmengine can read, or a loaded checkpoint.
            prefix: Only take the keys under this prefix (e.g. 'backbone.'), with it stripped.

        Raises:
            CheckpointError: The DSCN groups of a stage differ from the config's (the message names the stage
                and both values), or the weights do not fit (missing, unexpected, mismatched keys listed).
        """
        name = checkpoint if not isinstance(checkpoint, Mapping) else '<checkpoint dict>'
        if isinstance(checkpoint, Mapping):
            ckpt = checkpoint
        elif os.path.isfile(os.fspath(checkpoint)) or '://' not in str(checkpoint):
            ckpt = load_checkpoint_file(checkpoint)
        else:
            ckpt = CheckpointLoader.load_checkpoint(str(checkpoint), map_location='cpu')
        if prefix:
            if not prefix.endswith('.'):  # as mmengine's Pretrained init: 'backbone' means 'backbone.'
                prefix += '.'
            inner = ckpt.get('state_dict', ckpt.get('model', ckpt)) if isinstance(ckpt, Mapping) else ckpt
            ckpt = {k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix)}
            if not ckpt:
                raise CheckpointError(f'{name}: no key starts with prefix {prefix!r}.')
        state_dict = extract_state_dict(ckpt)
        # A file of more stages than this backbone builds (num_stages < 4): keep the stages that exist.
        state_dict = {k: v for k, v in state_dict.items()
                      if not k.startswith(tuple(f'{m}{i + 1}' for i in range(self.num_stages, 8)
                                                for m in ('patch_embed', 'block', 'norm')))}
        stem = state_dict.get('patch_embed1.proj.weight')
        in_chans = self.patch_embed1.proj.in_channels
        if isinstance(stem, torch.Tensor) and stem.ndim == 4 and stem.shape[1] != in_chans:
            if stem.shape[1] != 3:
                raise CheckpointError(f'{name}: its stem (patch_embed1.proj) takes {stem.shape[1]} input channels, '
                                      f'in_chans is {in_chans}; only an RGB (3-channel) stem is adapted to another '
                                      'in_chans.')
            # As timm's pretrained loading: an RGB stem summed (1 channel) or tiled and rescaled (more channels).
            state_dict = dict(state_dict, **{'patch_embed1.proj.weight': adapt_input_conv(in_chans, stem)})
            print_log(f'DSAN: the checkpoint\'s stem takes {stem.shape[1]} input channels, in_chans is {in_chans}: '
                      'adapted as timm does.', logger='current', level=logging.WARNING)
        file_groups = infer_groups(state_dict, self.kernel_sizes)
        for stage, (got, want) in enumerate(zip(file_groups, self.groups)):
            if got != want:
                raise CheckpointError(
                    f'{name}: stage {stage + 1} has DSCN groups {got} in the checkpoint but {want} in the config '
                    f'(checkpoint groups {file_groups}, config groups {self.groups}); set backbone groups='
                    f'{file_groups} to load it.')
        self.load_state_dict(checkpoint_filter_fn(state_dict, self, source=str(name)), strict=True)
        print_log(f'DSAN: loaded backbone weights from {name} (groups {file_groups}).', logger='current',
                  level=logging.INFO)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, 3, H, W) -> the `out_indices` maps, each (N, C_i, H / 2^(i+2), W / 2^(i+2)), NCHW-contiguous."""
        outs = self.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                          intermediates_only=True)
        # forward_intermediates keeps stage order; return in out_indices order, contiguous NCHW as the original.
        by_stage = dict(zip(sorted(set(self.out_indices)), outs))
        return tuple(by_stage[i].contiguous() for i in self.out_indices)

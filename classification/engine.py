"""One training epoch and one evaluation pass (the loops of ``train.py`` and ``validate.py``)."""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from timm.data.distributed_sampler import OrderedDistributedSampler
from tqdm import tqdm
from train_utils import GracefulStop, NonFiniteError, TrainingInterrupted, is_distributed, unwrap_model

_logger = logging.getLogger(__name__)


def _lr_of(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g['lr'] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def _read_window(window: list[tuple[int, int, torch.Tensor]]) -> tuple[int, float, tuple[int, float] | None]:
    """Read a log window's losses from the device in one transfer.

    Returns:
        ``(images, sum of loss x batch size, (step, loss) of the first NaN/Inf loss or None)``.
    """
    losses = torch.stack([loss.float() for _, _, loss in window]).tolist()
    images = sum(n for _, n, _ in window)
    bad = next(((step, v) for (step, _, _), v in zip(window, losses) if not math.isfinite(v)), None)
    return images, sum(v * n for (_, n, _), v in zip(window, losses)), bad


def train_one_epoch(
        epoch: int,
        model: torch.nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        *,
        device: torch.device,
        stop: GracefulStop,
        lr_scheduler: Any = None,
        mixup_fn: Callable | None = None,
        amp_autocast: Callable = nullcontext,
        loss_scaler: Any = None,
        model_ema: Any = None,
        clip_grad: float | None = None,
        clip_mode: str = 'norm',
        num_updates: int = 0,
        log_interval: int = 50,
        progress: bool = True,
        channels_last: bool = False,
        grad_accum_steps: int = 1,
) -> dict[str, float]:
    """Train ``model`` for one epoch.

    The host waits for the device only at log steps (every ``log_interval`` optimizer updates and at the last
    batch), as timm's ``train_one_epoch`` does: the losses stay on the device until a log step, where they are
    read in one transfer, checked for NaN/Inf, and the stop flag is agreed across ranks (one small all-reduce), all
    before that step's backward pass. Consequences:

    * A NaN/Inf loss stops training at the next log step (the error names the step where it first appeared).
      Steps between the two may have been applied with non-finite gradients; no checkpoint is written with them
      (checkpoints are written only at the end of an epoch and only with finite weights). With
      ``log_interval=1`` every loss is checked before its backward pass, so nothing non-finite is ever stepped.
    * SIGTERM/SIGINT stops a single-process run at the next step (reading the flag needs no device sync);
      distributed runs agree on it at the next log step, so every rank leaves the loop at the same step.

    With ``grad_accum_steps`` N > 1 (timm's semantics) each loss is divided by N, gradients accumulate over N
    batches (without DDP gradient sync on the first N-1) and the optimizer, EMA and ``lr_scheduler.step_update``
    step once per N batches; ``num_updates`` counts optimizer updates. A last group of fewer than N batches is
    averaged over its own size.

    Args:
        epoch: 0-based epoch index.
        model: The (possibly DDP-wrapped or compiled) model.
        loader: Training loader yielding ``(input, target)``.
        optimizer: Optimizer.
        loss_fn: Training loss.
        device: Device of the model.
        stop: Signal flag (see above for when it is polled).
        lr_scheduler: timm scheduler; ``step_update`` is called after every optimizer step.
        mixup_fn: timm ``Mixup`` applied to each batch, or None.
        amp_autocast: Context-manager factory for mixed precision.
        loss_scaler: timm ``NativeScaler`` (float16 AMP) or None.
        model_ema: timm ``ModelEmaV3`` or None.
        clip_grad: Gradient clipping value, or None.
        clip_mode: 'norm', 'value' or 'agc'.
        num_updates: Optimizer steps done before this epoch.
        log_interval: Log (and sync with the device) every this many optimizer updates.
        progress: Show a tqdm progress bar.
        channels_last: Feed channels-last inputs.
        grad_accum_steps: Batches per optimizer update.

    Returns:
        ``loss`` (mean over the epoch), ``lr`` (at the end), ``img_per_sec`` (training throughput of all ranks,
        from this rank's timing) and ``num_updates`` (optimizer steps done, this epoch included).

    Raises:
        NonFiniteError: the loss became NaN/Inf on any rank.
        TrainingInterrupted: a SIGTERM/SIGINT arrived; the epoch is incomplete.
    """
    model.train()
    accum = max(1, int(grad_accum_steps))
    log_interval = max(1, int(log_interval))
    num_batches = len(loader)
    world_size = dist.get_world_size() if is_distributed() else 1
    # the last group of batches may be shorter than `accum`: its losses are averaged over its own size
    last_accum = num_batches % accum
    last_group_start = num_batches - last_accum if last_accum else num_batches
    has_no_sync = hasattr(model, 'no_sync')

    # The losses of the current log window stay on the device (a list of 0-dim tensors: no work per step) and are
    # read in one transfer at the log step.
    window: list[tuple[int, int, torch.Tensor]] = []  # (step, batch size, loss)
    epoch_sum, epoch_n = 0., 0
    loss_now = loss_avg = float('nan')

    bar = tqdm(total=num_batches, desc=f'train {epoch}', disable=not progress, leave=False, dynamic_ncols=True)
    start = window_start = last_sync = time.perf_counter()
    img_per_sec = 0.
    batches = iter(loader)
    for step in range(num_batches):
        if stop.signum and world_size == 1:  # a host-side flag: reading it needs no device sync
            signum, _ = stop.check(device)
            raise TrainingInterrupted(signum, f'interrupted at epoch {epoch} after {step}/{num_batches} steps')
        try:
            inputs, target = next(batches)
        except StopIteration:
            break
        except Exception:
            if stop.signum:  # Ctrl-C also reaches the loader's worker processes, which then exit
                raise TrainingInterrupted(stop.signum,
                                          f'interrupted at epoch {epoch} after {step}/{num_batches} steps') from None
            raise
        need_update = (step + 1) % accum == 0 or step + 1 == num_batches
        divisor = last_accum if step >= last_group_start else accum
        log_step = need_update and ((step // accum + 1) % log_interval == 0 or step + 1 == num_batches)

        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            inputs, target = mixup_fn(inputs, target)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        n = inputs.size(0)

        # DDP: no gradient all-reduce on the batches that only accumulate (forward and backward inside no_sync)
        sync_ctx = model.no_sync() if has_no_sync and not need_update else nullcontext()
        with sync_ctx:
            with amp_autocast():
                output = model(inputs)
                loss = loss_fn(output, target)

            window.append((step, n, loss.detach()))

            if log_step:  # the one host <-> device sync of the log interval, before this step's backward
                window_n, w_sum, bad = _read_window(window)
                signum, nonfinite = stop.check(device, nonfinite=bad is not None)
                if nonfinite:
                    where = (f'loss is {bad[1]} at epoch {epoch} step {bad[0] + 1}/{num_batches}'
                             if bad is not None else f'loss is NaN/Inf on another rank at epoch {epoch}')
                    raise NonFiniteError(
                        f'{where} (detected at the log step {step + 1}; NaN/Inf on at least one rank); stopping '
                        'without writing a checkpoint. Try a lower --lr, --clip-grad 1.0 or no --amp, and resume '
                        'from the last good checkpoint (--log-interval 1 checks every step).')
                if signum:
                    raise TrainingInterrupted(signum, f'interrupted at epoch {epoch} after {step}/{num_batches} steps')
                last_sync = time.perf_counter()
                img_per_sec = window_n * world_size / max(last_sync - window_start, 1e-9)
                epoch_sum, epoch_n = epoch_sum + w_sum, epoch_n + window_n
                loss_now, loss_avg = w_sum / max(window_n, 1), epoch_sum / max(epoch_n, 1)
                window.clear()
                window_start = last_sync

            if step % accum == 0:  # the first batch of an update (here rather than after the step: faster on CPU)
                optimizer.zero_grad(set_to_none=True)
            if divisor > 1:
                loss = loss / divisor
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=model.parameters(),
                            need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if clip_grad is not None:
                        from timm.utils import dispatch_clip_grad
                        dispatch_clip_grad(model.parameters(), value=clip_grad, mode=clip_mode)
                    optimizer.step()

        if need_update:
            num_updates += 1
            if model_ema is not None:
                model_ema.update(unwrap_model(model), step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates, metric=None if epoch_n == 0 else loss_avg)
        bar.update()
        if log_step:
            lr = _lr_of(optimizer)
            bar.set_postfix(loss=f'{loss_now:.4f}', lr=f'{lr:.3g}', img_s=f'{img_per_sec:.1f}', refresh=False)
            _logger.info('Train: %d [%d/%d]  loss %.4f (%.4f)  lr %.3e  %.1f img/s', epoch, step + 1, num_batches,
                         loss_now, loss_avg, lr, img_per_sec)
    bar.close()
    if window:  # the loader ended early (fewer batches than len(loader)): read what no log step read
        window_n, w_sum, bad = _read_window(window)
        _, nonfinite = stop.check(device, nonfinite=bad is not None)
        if nonfinite:
            where = f'at step {bad[0] + 1}' if bad is not None else 'on another rank'
            raise NonFiniteError(f'loss became NaN/Inf at epoch {epoch} ({where}); stopping without writing a '
                                 'checkpoint')
        epoch_sum, epoch_n, last_sync = epoch_sum + w_sum, epoch_n + window_n, time.perf_counter()
        loss_avg = epoch_sum / epoch_n
    return OrderedDict(loss=loss_avg, lr=_lr_of(optimizer),
                       img_per_sec=epoch_n * world_size / max(last_sync - start, 1e-9), num_updates=num_updates)


@torch.no_grad()
def padded_repeats(rank: int, world_size: int, start: int, n: int, total: int) -> torch.Tensor:
    """Which of a rank's samples ``start .. start + n - 1`` are the repeats timm's OrderedDistributedSampler adds.

    The sampler hands rank r the indices r, r + W, r + 2W, ... of the dataset's indices padded to a multiple of W
    (the padding repeats the first ones), so local sample p is a repeat when r + p * W >= len(dataset).

    Returns:
        (n,) bool, True for a repeat.
    """
    return rank + torch.arange(start, start + n) * world_size >= total


def evaluate(
        model: torch.nn.Module,
        loader,
        *,
        device: torch.device,
        amp_autocast: Callable = nullcontext,
        progress: bool = True,
        desc: str = 'eval',
        collect: bool = False,
        topk: int = 5,
        channels_last: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy and cross-entropy of ``model`` on ``loader``.

    In distributed runs the sums are all-reduced. timm's ordered distributed sampler pads the last batches with
    repeated images so that every rank gets as many; those repeats are left out (:func:`padded_repeats`), so the
    numbers are those of one process (validate.py) over the same images.

    Args:
        model: Model in any wrapper.
        loader: Loader yielding ``(input, target)``.
        device: Device.
        amp_autocast: Context-manager factory for mixed precision.
        progress: Show a tqdm progress bar.
        desc: Progress-bar label.
        collect: Also return per-sample ``indices``, ``targets``, ``topk_idx`` and ``topk_prob`` lists.
        topk: How many predictions to collect per sample.
        channels_last: Feed channels-last inputs.

    Returns:
        ``top1``, ``top5`` (percent), ``loss`` and ``count``; plus the per-sample lists when ``collect``.
    """
    model.eval()
    loss_fn = torch.nn.CrossEntropyLoss(reduction='none')
    sampler = getattr(loader, 'sampler', None)
    ordered = is_distributed() and isinstance(sampler, OrderedDistributedSampler)
    # loss, correct@1, correct@5 summed on the device and read once at the end (no sync per batch)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    count = seen = 0  # samples counted, samples this rank was given
    rows: dict[str, list] = {'targets': [], 'topk_idx': [], 'topk_prob': []}
    bar = tqdm(total=len(loader), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for inputs, target in loader:
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(inputs)
        output = output.float()
        k5 = min(5, output.shape[1])
        correct = output.topk(k5, dim=1).indices.eq(target[:, None]).double()
        per_sample = torch.stack([loss_fn(output, target).double(), correct[:, 0], correct.sum(1)], 1)
        if ordered:
            keep = ~padded_repeats(sampler.rank, sampler.num_replicas, seen, inputs.size(0), len(sampler.dataset))
            per_sample = per_sample[keep.to(device)]
        sums += per_sample.sum(0)
        seen += inputs.size(0)
        count += inputs.size(0) if not ordered else int(keep.sum())
        if collect:
            prob, idx = output.softmax(-1).topk(min(topk, output.shape[1]), dim=-1)
            rows['targets'].extend(target.cpu().tolist())
            rows['topk_idx'].extend(idx.cpu().tolist())
            rows['topk_prob'].extend(prob.cpu().tolist())
        bar.update()
    bar.close()
    sums = torch.cat([sums, torch.tensor([count], dtype=torch.float64).to(device)])
    if is_distributed():
        dist.all_reduce(sums)
    loss_sum, c1, c5, count = sums.tolist()
    count = max(count, 1)
    out: dict[str, Any] = OrderedDict(top1=100 * c1 / count, top5=100 * c5 / count, loss=loss_sum / count,
                                      count=int(count))
    if not math.isfinite(out['loss']):
        _logger.warning('evaluation loss is not finite (%s)', out['loss'])
    if collect:
        out.update(rows)
    return out

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
from timm.utils import AverageMeter, accuracy
from tqdm import tqdm
from train_utils import GracefulStop, NonFiniteError, TrainingInterrupted, is_distributed, unwrap_model

_logger = logging.getLogger(__name__)


def _lr_of(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g['lr'] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


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
) -> dict[str, float]:
    """Train ``model`` for one epoch.

    Before each backward pass the loss is checked for NaN/Inf and the SIGTERM/SIGINT flag is polled; both are
    agreed across ranks with one small all-reduce so every rank leaves the loop at the same step.

    Args:
        epoch: 0-based epoch index.
        model: The (possibly DDP-wrapped) model.
        loader: Training loader yielding ``(input, target)``.
        optimizer: Optimizer.
        loss_fn: Training loss.
        device: Device of the model.
        stop: Signal flag polled at every step.
        lr_scheduler: timm scheduler; ``step_update`` is called after every optimizer step.
        mixup_fn: timm ``Mixup`` applied to each batch, or None.
        amp_autocast: Context-manager factory for mixed precision.
        loss_scaler: timm ``NativeScaler`` (float16 AMP) or None.
        model_ema: timm ``ModelEmaV3`` or None.
        clip_grad: Gradient clipping value, or None.
        clip_mode: 'norm', 'value' or 'agc'.
        num_updates: Optimizer steps done before this epoch.
        log_interval: Log every this many steps.
        progress: Show a tqdm progress bar.
        channels_last: Feed channels-last inputs.

    Returns:
        ``loss`` (mean over the epoch), ``lr`` (at the end) and ``img_per_sec`` (this rank's training throughput).

    Raises:
        NonFiniteError: the loss became NaN/Inf on any rank (nothing was stepped with it).
        TrainingInterrupted: a SIGTERM/SIGINT arrived; the epoch is incomplete.
    """
    model.train()
    losses_m, time_m = AverageMeter(), AverageMeter()
    num_batches = len(loader)
    world_size = dist.get_world_size() if is_distributed() else 1
    bar = tqdm(total=num_batches, desc=f'train {epoch}', disable=not progress, leave=False, dynamic_ncols=True)
    end = time.perf_counter()
    batches = iter(loader)
    for step in range(num_batches):
        try:
            inputs, target = next(batches)
        except StopIteration:
            break
        except Exception:
            if stop.signum:  # Ctrl-C also reaches the loader's worker processes, which then exit
                raise TrainingInterrupted(stop.signum, f'interrupted at epoch {epoch} step {step}/{num_batches}') \
                    from None
            raise
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            inputs, target = mixup_fn(inputs, target)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)

        with amp_autocast():
            output = model(inputs)
            loss = loss_fn(output, target)

        signum, nonfinite = stop.check(device, nonfinite=not bool(torch.isfinite(loss.detach())))
        if nonfinite:
            raise NonFiniteError(
                f'loss is {loss.item()} (NaN/Inf on at least one rank) at epoch {epoch} step {step}/{num_batches}; '
                'stopping without writing a checkpoint. Try a lower --lr, --clip-grad 1.0 or no --amp, and resume '
                'from the last good checkpoint.')
        if signum:
            raise TrainingInterrupted(signum, f'interrupted at epoch {epoch} step {step}/{num_batches}')

        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=model.parameters())
        else:
            loss.backward()
            if clip_grad is not None:
                from timm.utils import dispatch_clip_grad
                dispatch_clip_grad(model.parameters(), value=clip_grad, mode=clip_mode)
            optimizer.step()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)

        losses_m.update(loss.item(), inputs.size(0))
        now = time.perf_counter()
        time_m.update(now - end)
        end = now
        img_per_sec = inputs.size(0) * world_size / max(time_m.avg, 1e-9)
        lr = _lr_of(optimizer)
        bar.set_postfix(loss=f'{losses_m.val:.4f}', lr=f'{lr:.3g}', img_s=f'{img_per_sec:.1f}', refresh=False)
        bar.update()
        if (step + 1) % log_interval == 0 or step + 1 == num_batches:
            _logger.info('Train: %d [%d/%d]  loss %.4f (%.4f)  lr %.3e  %.1f img/s', epoch, step + 1, num_batches,
                         losses_m.val, losses_m.avg, lr, img_per_sec)
    bar.close()
    return OrderedDict(loss=losses_m.avg, lr=_lr_of(optimizer),
                       img_per_sec=losses_m.count * world_size / max(time_m.sum, 1e-9), num_updates=num_updates)


@torch.no_grad()
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

    In distributed runs the sums are all-reduced (timm's ordered distributed sampler pads the last batch
    with repeated samples, so a handful of images may count twice; validate on one process for exact numbers).

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
    loss_fn = torch.nn.CrossEntropyLoss(reduction='sum')
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct@1, correct@5, count
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
        acc1, acc5 = accuracy(output, target, topk=(1, k5))
        n = inputs.size(0)
        sums += torch.tensor([loss_fn(output, target).item(), acc1.item() * n / 100, acc5.item() * n / 100, n],
                             dtype=torch.float64)
        if collect:
            prob, idx = output.softmax(-1).topk(min(topk, output.shape[1]), dim=-1)
            rows['targets'].extend(target.cpu().tolist())
            rows['topk_idx'].extend(idx.cpu().tolist())
            rows['topk_prob'].extend(prob.cpu().tolist())
        bar.update()
    bar.close()
    if is_distributed():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    loss_sum, c1, c5, count = sums.tolist()
    count = max(count, 1)
    out: dict[str, Any] = OrderedDict(top1=100 * c1 / count, top5=100 * c5 / count, loss=loss_sum / count,
                                      count=int(count))
    if not math.isfinite(out['loss']):
        _logger.warning('evaluation loss is not finite (%s)', out['loss'])
    if collect:
        out.update(rows)
    return out

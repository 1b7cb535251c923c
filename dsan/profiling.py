"""torch.profiler operator tables for the speed tools (``classification/tools/get_inf_speed.py --profile`` for
inference, ``train_throughput.py --profile`` for training steps).

On the CPU, code compiled by inductor runs its generated kernels inside one ``## Call CompiledFxGraph`` entry unless
it was compiled with inductor's ``cpp.enable_kernel_profile`` (:func:`kernel_names`): then each generated kernel is
a row of its own (``graph_0_cpp_fused_...``), which is what shows where a compiled step's time goes.
"""
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ['kernel_names', 'op_table']


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def op_table(run: Callable[[], Any], device: torch.device | str, row_limit: int = 20, calls: int = 1) -> str:
    """torch.profiler's operator table of `calls` calls of `run` (after one untimed call).

    Args:
        run: What is profiled: a forward, a training step, ... (no arguments; its result is ignored).
        device: The device `run` computes on; on CUDA its kernels are profiled too.
        row_limit: Rows of the table.
        calls: Profiled calls.

    Returns:
        ``key_averages().table(...)``: `row_limit` rows sorted by self CPU time, or by self device time on CUDA.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(device)
    if row_limit < 1 or calls < 1:
        raise ValueError(f'op_table: row_limit and calls must be >= 1; got {row_limit} and {calls}')
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run()
    _sync(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        _sync(device)
    sort_by = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    # Names up to 90 characters: inductor's kernels are named after the operators they fuse.
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=90)


@contextlib.contextmanager
def kernel_names(enabled: bool = True) -> Iterator[None]:
    """While active (and `enabled`), inductor compiles CPU kernels that name themselves to torch.profiler.

    Compilation is what reads the setting, so the model must be compiled (its first calls run) inside the block; code
    that dynamo compiled before in the process (the same model, or one of the same structure) is reused as it was.
    Each generated kernel then records a profiler event per call, a small cost in the timed runs as well.
    """
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch({'cpp.enable_kernel_profile': True}):
        yield

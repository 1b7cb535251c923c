"""ONNX export of DSAN, run in onnxruntime.

While an exporter records the model (`ops_dscn.recording_aten`), every fused CPU kernel steps aside for the aten
operators it fuses and the DSCN op for its pure-PyTorch twin, so the file holds standard ONNX operators only and
any runtime can run it.
"""
import pytest
import timm
import torch
from test_fusion import SMALL, make_model

import ops_dscn

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')


def small_model() -> torch.nn.Module:
    """A one-block-per-stage dsan_t with non-trivial BNs, layer scales, biases and offsets."""
    model = make_model(**SMALL)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('offset.weight'):  # offsets that vary with the input, a few pixels wide
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def check_file(path, model, sizes) -> None:
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {'', 'ai.onnx'}, f'non-standard operators in the file: {domains}'
    for size in sizes:
        x = torch.randn(*size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            expected = model(x)
        got = run_onnx(path, x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('reparameterize', [False, True], ids=['plain', 'reparameterized'])
def test_torchscript_exporter_with_dynamic_batch_and_size(tmp_path, reparameterize):
    model = small_model()
    if reparameterize:
        model = timm.utils.reparameterize_model(model)
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / 'dsan.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=['input'],
                          output_names=['logits'],
                          dynamic_axes={'input': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch'}})
    check_file(path, model, [(2, 3, 64, 64), (1, 3, 96, 64), (3, 3, 64, 80)])


def test_timm_onnx_export_helper(tmp_path):
    """timm's own `onnx_export` (with its check of the exported forward), traced with gradients on."""
    from timm.utils.onnx import onnx_export

    model = small_model()
    path = tmp_path / 'dsan.onnx'
    onnx_export(model, str(path), input_size=(3, 64, 64), batch_size=2, opset=17, check=True, check_forward=True,
                dynamic_size=True)
    check_file(path, model, [(2, 3, 64, 64), (2, 3, 96, 64)])


def test_tracing_for_flop_counts_keeps_the_dscn_op_and_exports_do_not():
    """A bare jit trace (the FLOP counters: the op counts 0, as in the paper's figures) keeps ops_dscn::dscn; the
    exports above record the twin instead (`check_file` finds no custom-domain operator)."""
    model = small_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    assert any(n.kind() == 'ops_dscn::dscn' for n in traced.inlined_graph.nodes())
    assert not ops_dscn.recording_aten()


@pytest.mark.slow  # the dynamo-based exporter takes a minute or more on two cores
def test_dynamo_exporter_with_dynamic_shapes(tmp_path):
    pytest.importorskip('onnxscript')
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    batch, height, width = (torch.export.Dim.DYNAMIC,) * 3
    path = tmp_path / 'dsan.onnx'
    for grad in (False, True):  # timm's helper exports with gradients on: other kernels' gates then
        with torch.set_grad_enabled(grad):
            program = torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                        dynamic_shapes=({0: batch, 2: height, 3: width},))
        program.save(str(path))
        check_file(path, model, [(2, 3, 64, 64), (1, 3, 96, 64)])

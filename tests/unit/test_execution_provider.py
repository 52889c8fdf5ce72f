"""Execution provider choice (components/bundle/runtime.session): CPU by default, CUDA only where it runs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest


def _identity_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_cpu_is_the_default_and_cuda_falls_back_to_it_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    from components.bundle.runtime import session

    path = _identity_model(tmp_path / "relu.onnx")
    feed = {"x": np.asarray([[-1.0, 0.5, 2.0]], np.float32)}
    cpu = session(path)
    assert cpu.get_providers() == ["CPUExecutionProvider"]
    expected = cpu.run(None, feed)[0]
    with caplog.at_level(logging.WARNING, logger="components.bundle.runtime"):
        cuda = session(path, provider="cuda")
    np.testing.assert_array_equal(cuda.run(None, feed)[0], expected)
    if cuda.get_providers()[0] == "CUDAExecutionProvider":  # a machine with a GPU: no warning owed
        assert "CUDAExecutionProvider" in ort.get_available_providers()
    else:
        assert "CUDA execution provider unavailable here; running on the CPU" in caplog.text
    with pytest.raises(ValueError, match="execution provider must be one of cpu, cuda"):
        session(path, provider="tpu")

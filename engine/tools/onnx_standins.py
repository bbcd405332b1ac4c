"""Small random ONNX stand-ins for ``campplus.onnx`` and ``speech_tokenizer_v2.onnx``.

They have the official signatures (inputs/outputs taken positionally, as upstream does), run in
onnxruntime, and are deterministic functions of their input, so prompt processing and voice storage
can be tested without the released models. Their outputs are meaningless.

* campplus: input ``[1, T, 80]`` float32 fbank -> output ``[1, 192]`` float32
  (``mean_t tanh(x @ W)``).
* speech tokenizer: inputs ``[1, 128, T]`` float32 log-mel and int32 ``[1]`` length -> int64 tokens
  ``[1, ceil(ceil(T/2)/2)]`` in 0..6560: two stride-2 convolutions (the real model's 4x downsampling)
  to 8 channels and the real FSQ read-out (``round(0.999 tanh) + 1`` digits, base 3).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 17


def _tensor(name: str, arr: np.ndarray):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _save(graph, path: str | Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cosyvoice-ws onnx_standins")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_campplus(path: str | Path, seed: int = 0) -> Path:
    """Write a CAM++ stand-in: float32 [1, T, 80] -> float32 [1, 192]. Returns ``path``."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w = (3.0 * rng.standard_normal((80, 192)) / np.sqrt(80)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["act"]),
        helper.make_node("ReduceMean", ["act"], ["output"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 192])],
        initializer=[_tensor("w", w)])
    return _save(graph, path)


def write_speech_tokenizer(path: str | Path, seed: int = 0) -> Path:
    """Write a speech-tokenizer stand-in: (float32 [1, 128, T], int32 [1]) -> int64 [1, T'],
    T' = ceil(ceil(T / 2) / 2), values in 0..6560. Returns ``path``."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed + 1000)
    w1 = (2.0 * rng.standard_normal((32, 128, 3)) / np.sqrt(128 * 3)).astype(np.float32)
    b1 = (0.5 * rng.standard_normal(32)).astype(np.float32)
    w2 = (4.0 * rng.standard_normal((8, 32, 3)) / np.sqrt(32 * 3)).astype(np.float32)
    b2 = (0.5 * rng.standard_normal(8)).astype(np.float32)
    powers = (3.0 ** np.arange(8)).astype(np.float32).reshape(8, 1)
    conv = dict(kernel_shape=[3], strides=[2], pads=[1, 1])
    nodes = [
        helper.make_node("Conv", ["feats", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Tanh", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], **conv),
        helper.make_node("Tanh", ["c2"], ["a2"]),
        # The length input only enters as "+ 0 * length" so that the graph consumes it.
        helper.make_node("Cast", ["feats_length"], ["len_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["len_f", "zero"], ["len_zero"]),
        helper.make_node("Add", ["a2", "len_zero"], ["a2z"]),
        helper.make_node("Mul", ["a2z", "fsq_scale"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Add", ["rounded", "one"], ["digits"]),
        helper.make_node("Transpose", ["digits"], ["digits_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["digits_t", "powers"], ["code"]),
        helper.make_node("Squeeze", ["code", "last_axis"], ["code2"]),
        helper.make_node("Cast", ["code2"], ["indices"], to=TensorProto.INT64),
    ]
    inits = [_tensor("w1", w1), _tensor("b1", b1), _tensor("w2", w2), _tensor("b2", b2),
             _tensor("zero", np.zeros(1, np.float32)), _tensor("fsq_scale", np.array([0.999], np.float32)),
             _tensor("one", np.ones(1, np.float32)), _tensor("powers", powers),
             _tensor("last_axis", np.array([2], np.int64))]
    graph = helper.make_graph(
        nodes, "speech_tokenizer_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "T4"])],
        initializer=inits)
    return _save(graph, path)

"""ONNX graphs: checked with onnx.checker, one float32 observation in and one tensor out, a fixed batch size
turned into a symbolic one."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bitrl_compile.frontends.specs import _check_finite, _config_obs_shape
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


def _load_onnx(path: Path, cfg: dict) -> LoadedPolicy:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - DecodeError, ValidationError, ...
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else 'truncated?'}); export it again") from None
    g = model.graph
    _check_finite({t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in g.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)},
                  path)
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelLoadError(f"{path}: the ONNX graph has {len(inputs)} inputs and {len(g.output)} outputs; a "
                             "policy takes one observation and returns one tensor")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelLoadError(f"{path}: the ONNX input must be float32; export with a float32 example input")
    dims = inputs[0].type.tensor_type.shape.dim
    if cfg.get("obs_shape"):
        obs_shape = _config_obs_shape(cfg, path)
    elif len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
        obs_shape = [d.dim_value for d in dims[1:]]
    else:
        raise ModelLoadError(f"{path}: the ONNX input shape is not [batch, fixed dims]; pass "
                             "config={\"obs_shape\": [...]}")
    for value in (inputs[0], g.output[0]):
        d0 = value.type.tensor_type.shape.dim
        if d0 and d0[0].HasField("dim_value"):
            warnings.warn(f"{path}: {value.name} has a fixed batch size {d0[0].dim_value}; treating it as dynamic",
                          stacklevel=4)
            d0[0].dim_param = "batch"
    return LoadedPolicy(None, model, {"shape": obs_shape, "preprocess": "none"}, {}, "onnx",
                        f"ONNX graph (opset {model.opset_import[0].version if model.opset_import else '?'}), "
                        f"obs {obs_shape}")


def _onnx_out_dim(model, path: Path) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ModelLoadError(f"{path}: the ONNX output must have shape [batch, out_dim] with a fixed out_dim")
    return int(dims[1].dim_value)

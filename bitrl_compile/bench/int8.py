"""ONNX Runtime's int8 versions of an ONNX model, the baselines the benchmarks compare with: dynamic quantization
(MatMulInteger / ConvInteger) and static (QOperator: QLinearConv / QLinearMatMul, ORT's fast path for convolutions;
bench/conv.py measures both, docs/kernels.md)."""

from __future__ import annotations

import logging
from pathlib import Path


class _Frames:
    """onnxruntime.quantization.CalibrationDataReader (duck-typed) over a list of feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantize_int8(fp32: Path, kind: str, calibration=None, out: Path | None = None) -> Path:
    """An int8 copy of an ONNX model: kind "dynamic" (ConvInteger / MatMulInteger) or "static" (QOperator:
    QLinearConv / QLinearMatMul, u8 activations calibrated on `calibration` (arrays for the model's one input),
    s8 per-channel weights)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    out = out or fp32.with_name(fp32.stem + f".int8-{kind}.onnx")
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # "consider pre-processing" advice, calibration progress
    try:
        if kind == "dynamic":
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
        else:
            import onnx

            name = onnx.load(str(fp32)).graph.input[0].name
            quantize_static(str(fp32), str(out), _Frames([{name: c} for c in calibration]), quant_format=QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    return out

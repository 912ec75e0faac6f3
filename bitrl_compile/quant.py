"""BitNet b1.58 quantization math: the one source of truth.

Weights (per tensor, or per output channel):
    gamma = max(mean(|W|), EPS)        W_t = clip(round(W / gamma), -1, 1)        W ~ gamma * W_t
Activations (per token, i.e. per row of a [batch, K] input):
    s = 127 / max(max(|x|), EPS)       x_q = clip(round(x * s), -128, 127)        (int8)
BitLinear epilogue, in float32, with a fused multiply-add (one rounding):
    acc = x_q . W_t^T  (int32)         c = gamma / s        y = fma(float32(acc), c, bias)
BitConv2d (NCHW): the same per sample, one absmax scale over each batch element's whole C x H x W input, the
weights [O, C, kh, kw] ternarized as the [O, C*kh*kw] matrix they flatten to; acc is the int32 convolution of the
zero-padded x_q (`bitconv2d_reference`) and the epilogue is BitLinear's per output channel.

`round` is round-half-to-even everywhere (numpy, torch and TVM's `round` agree).
The compiled kernels compute exactly these float32 operations in this order, so the
numpy functions below are the bit-exact reference for them. The torch functions
(`*_ste`) are the same math for quantization-aware training, with the straight-through
estimator x + (q(x) - x).detach().
"""

from __future__ import annotations

import numpy as np

EPS = np.float32(1e-5)
QMAX = np.float32(127.0)

# The activations a BitLinear kernel applies in its epilogue (fuse_bitlinear matches them, targets/kernels.py
# emits them, apply_activation is their numpy meaning).
FUSABLE_ACTIVATIONS = ("none", "relu", "tanh", "sigmoid")


def apply_activation(y: np.ndarray, activation: str) -> np.ndarray:
    """The numpy meaning of a fused activation, in float32 (the kernels' reference)."""
    if activation == "relu":
        return np.maximum(y, np.float32(0))
    if activation == "tanh":
        return np.tanh(y)
    if activation == "sigmoid":
        return (1 / (1 + np.exp(-y))).astype(np.float32)
    if activation != "none":
        raise ValueError(f"activation {activation!r} not fusable; expected one of {FUSABLE_ACTIVATIONS}")
    return y


def ternarize_weight(w: np.ndarray, per_channel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a float [N, K] weight to ternary int8 trits and float32 scales.

    Returns (w_t int8 [N, K] in {-1, 0, 1}, gamma float32 [N] if per_channel else [1]).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"ternarize_weight expects a 2-D [out, in] weight, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or Inf; fix or retrain the model before compiling")
    absw = np.abs(w)
    if per_channel:
        gamma = np.maximum(absw.mean(axis=1, dtype=np.float64).astype(np.float32), EPS)
        w_t = np.clip(np.round(w / gamma[:, None]), -1, 1)
    else:
        gamma = np.maximum(np.float32(absw.mean(dtype=np.float64)), EPS).reshape(1)
        w_t = np.clip(np.round(w / gamma[0]), -1, 1)
    return w_t.astype(np.int8), gamma.astype(np.float32)


def quantize_weight_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel absmax int8 weights (for int8 heads): scale = max(max|W_row|, EPS) / 127.

    Returns (w_q int8 [N, K] in [-127, 127], scale float32 [N]) with W ~ scale[:, None] * w_q.
    """
    w = np.asarray(w, dtype=np.float32)
    scale = (np.maximum(np.abs(w).max(axis=1), EPS) / QMAX).astype(np.float32)
    return np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8), scale


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax int8 quantization of a [B, K] float32 input.

    Returns (x_q int8 [B, K], s float32 [B]) with x ~ x_q / s.
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1)
    s = (QMAX / np.maximum(amax, EPS)).astype(np.float32)
    x_q = np.clip(np.round(x * s[..., None]), -128, 127).astype(np.int8)
    return x_q, s


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 fused multiply-add, a * b + c with a single rounding.

    a*b is exact in float64 (24+24 < 53 bits). The sum is formed in float64 rounded
    *to odd* (TwoSum gives the exact error; a non-zero error on an even mantissa moves
    the result one ulp towards it), and rounding-to-odd in a format of >= 2*24+2 bits
    followed by rounding to float32 is a correct rounding (Boldo & Melquiond, 2008).
    """
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c64 = np.asarray(c, np.float32).astype(np.float64)
    p, c64 = np.broadcast_arrays(p, c64)
    s = p + c64
    bp = s - c64
    err = (p - bp) + (c64 - (s - bp))
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even & np.isfinite(s)
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def int_matmul(x_q: np.ndarray, w_t: np.ndarray) -> np.ndarray:
    """x_q [..., K] int8 times w_t [N, K] int8 transposed, exactly, as int32. In float32 BLAS when every partial
    sum is an integer below 2^24 in magnitude (|x_q| <= 128, so 128 * max|w| * K < 2^24: any summation order, FMA
    or not, is then exact; ternary weights up to K = 131,071), which is 10-15x faster than numpy's int32 matmul;
    else in int32."""
    w_max = int(np.abs(w_t.astype(np.int16)).max()) if w_t.size else 0
    if 128 * w_max * x_q.shape[-1] < 2**24:
        return (x_q.astype(np.float32) @ w_t.astype(np.float32).T).astype(np.int32)
    return x_q.astype(np.int32) @ w_t.astype(np.int32).T


def bitlinear_reference(
    x: np.ndarray,
    w_t: np.ndarray,
    gamma: np.ndarray,
    bias: np.ndarray | None = None,
    return_int: bool = False,
):
    """The BitLinear op on a [B, K] input: act-quant, integer matmul (int32), rescale, bias.

    The one reference of both weight precisions: ternary trits with gamma (`ternarize_weight`), and int8
    weights in [-127, 127] with their per-channel scales as gamma (`quantize_weight_int8`: the mixed-precision
    layers, targets/int8_kernels.py); the activations and the epilogue are the same.
    Activation functions are applied by the caller. With return_int=True also returns
    (x_q, s, acc) for bit-exact checks of the integer path.
    """
    x_q, s = quantize_activations(x)
    acc = int_matmul(x_q, w_t)
    c = (np.asarray(gamma, np.float32)[None, :] / s[:, None]).astype(np.float32)
    b = np.zeros(w_t.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    y = fma_f32(acc.astype(np.float32), c, np.broadcast_to(b[None, :], acc.shape))
    if return_int:
        return y, (x_q, s, acc)
    return y


def conv_output_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    """One spatial output size of a convolution (dilation 1)."""
    return (size + pad_lo + pad_hi - kernel) // stride + 1


def im2col(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int, int, int]):
    """The patches of an NCHW x, zero-padded (top, left, bottom, right), as [B * OH * OW, C * KH * KW] rows in (c, i, j)
    order (how an OIHW weight flattens), and (OH, OW)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, stride, padding
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw), (oh, ow)


CONV_LAYOUTS = ("nchw", "nhwc")  # how a BitConv2d reads its input (a folded NHWC -> NCHW transpose: "nhwc")
PRESCALES = ("div", "mul")       # a folded elementwise scale of a BitConv2d's input: x / c or x * c


def conv_input(x: np.ndarray, layout: str = "nchw", prescale: tuple[str, float] | None = None) -> np.ndarray:
    """A BitConv2d's input as the NCHW float32 it convolves: `x` is [B, C, H, W], or [B, H, W, C] for layout "nhwc"
    (read transposed); `prescale` ("div" or "mul", c) first computes x / c or x * c in float32, exactly the graph's
    op that passes/fuse_bitlinear.py folded into the convolution (or the "image" /255 of passes/entry_points.py):
    the values quantized are the same, so folding keeps every result bit for bit. (The kernels read x once in its
    layout and apply the scale inside their quantization step; the absmax commutes with it: |x| / c is monotone.)"""
    x = np.asarray(x, np.float32)
    if prescale is not None:
        op, c = prescale
        if op not in PRESCALES:
            raise ValueError(f"unknown BitConv2d input prescale {op!r}; expected one of {PRESCALES}")
        x = x / np.float32(c) if op == "div" else x * np.float32(c)
    if layout not in CONV_LAYOUTS:
        raise ValueError(f"unknown BitConv2d input layout {layout!r}; expected one of {CONV_LAYOUTS}")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nhwc" else x


def bitconv2d_reference(x: np.ndarray, w_t: np.ndarray, gamma: np.ndarray, bias: np.ndarray | None = None,
                        stride: tuple[int, int] = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                        return_int: bool = False, layout: str = "nchw", prescale: tuple[str, float] | None = None):
    """The BitConv2d op on an NCHW float32 input [B, C, H, W] (or what `conv_input` makes one of: `layout`,
    `prescale`), weights [O, C, kh, kw] as integers (ternary trits,
    or int8 in [-127, 127] for an int8 layer), gamma [1] or [O], padding (top, left, bottom, right), dilation 1,
    groups 1. Activations are quantized per sample (`quantize_activations` on the [B, C*H*W] flattening: one
    absmax scale s[b]), zero-padded after quantization (a padded zero is 0 in int8, the scale is the input's),
    convolved exactly in int32, then y[b, o] = fma(float32(acc[b, o]), gamma[o] / s[b], bias[o]) (the BitLinear
    epilogue per output channel). Activation functions are applied by the caller."""
    x = conv_input(x, layout, prescale)
    b, c, h, w = x.shape
    o, _, kh, kw = w_t.shape
    pt, pl, pb, pr = padding
    x_q, s = quantize_activations(x.reshape(b, -1))
    patches, (oh, ow) = im2col(x_q.reshape(b, c, h, w), (kh, kw), stride, padding)
    acc = int_matmul(patches, w_t.reshape(o, -1)).reshape(b, oh, ow, o).transpose(0, 3, 1, 2)
    x_q = np.pad(x_q.reshape(b, c, h, w), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    g = np.broadcast_to(np.asarray(gamma, np.float32).reshape(-1), (o,))
    scale = (g[None, :] / s[:, None]).astype(np.float32)[:, :, None, None]
    bias = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32)
    y = fma_f32(acc.astype(np.float32), np.broadcast_to(scale, acc.shape), np.broadcast_to(
        bias[None, :, None, None], acc.shape))
    if return_int:
        return y, (x_q, s, acc)
    return y


# ---------------------------------------------------------------- torch (training, STE)

def ternarize_weight_ste(w, per_channel: bool = False):
    """Fake-quantized ternary weight gamma * W_t with a straight-through gradient.

    gamma is the float64 mean rounded to float32, as in `ternarize_weight`: QAT leaves many weights within an ulp
    of +-gamma/2 (they oscillate across the threshold), so a float32 mean one ulp off flips trits against the
    compiled model."""
    absw = w.detach().abs().double()
    gamma = (absw.mean(dim=1, keepdim=True) if per_channel else absw.mean()).to(w.dtype).clamp(min=float(EPS))
    q = (w / gamma).round().clamp(-1, 1) * gamma
    return w + (q - w).detach()


def quantize_activations_ste(x):
    """Fake-quantized per-row absmax int8 activations with a straight-through gradient."""
    import torch

    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=float(EPS))
    s = torch.full_like(amax, 127.0) / amax  # a true division, as the reference's (127.0 / t is t.reciprocal() * 127)
    q = (x * s).round().clamp(-128, 127) / s
    return x + (q - x).detach()


def bitlinear_ste(x, weight, bias=None, per_channel: bool = False):
    """The compiler's BitLinear for training: int8 absmax activations times ternary weights, both fake-quantized
    with straight-through gradients (what QAT, frozen BitNet backbones and distillation all train through)."""
    import torch.nn.functional as F

    return F.linear(quantize_activations_ste(x), ternarize_weight_ste(weight, per_channel), bias)


def bitconv2d_ste(x, weight, bias=None, stride=(1, 1), padding=(0, 0), per_channel: bool = False,
                  int8: bool = False):
    """The compiler's BitConv2d for training (`bitconv2d_reference`'s math on an NCHW x, symmetric `padding`
    (ph, pw) as nn.Conv2d's): one absmax int8 scale s per sample over its C x H x W, the weights as the
    [O, C*kh*kw] matrix they flatten to, ternary (absmean gamma per tensor or per output channel) or int8 (per
    output channel absmax). The convolution runs on the integer values themselves (exact in float32: every partial
    sum is an integer below 2^24 for the kernels' K), the epilogue acc * gamma / s + bias in float64 (one rounding
    to float64, then float32: the reference's fused multiply-add but in the rare double-rounding case). Gradients
    are straight-through: d/dx as a convolution with the quantized weights gamma * W_q, d/dW as one of the
    quantized activations x_q / s (what `bitlinear_ste` gives a Linear)."""
    import torch
    import torch.nn.functional as F

    b, o = x.shape[0], weight.shape[0]
    amax = x.detach().reshape(b, -1).abs().amax(dim=1).clamp(min=float(EPS))
    s = torch.full_like(amax, 127.0) / amax  # [B]: a true division (torch computes 127.0 / t as t.reciprocal() * 127)
    xs = x * s.reshape(b, 1, 1, 1)
    x_int = xs + (xs.round().clamp(-128, 127) - xs).detach()
    w = weight.detach().reshape(o, -1)
    if int8:
        gamma = w.abs().amax(dim=1).clamp(min=float(EPS)) / 127.0                                # [O]
        limit = 127
    else:
        absw = w.abs().double()
        gamma = (absw.mean(dim=1) if per_channel else absw.mean().reshape(1)).to(w.dtype).clamp(min=float(EPS))
        limit = 1
    wg = weight / gamma.reshape(-1, 1, 1, 1)
    w_int = wg + (wg.round().clamp(-limit, limit) - wg).detach()
    acc = F.conv2d(x_int, w_int, None, stride, padding)
    c = (gamma.reshape(1, -1).expand(b, o) / s.reshape(b, 1)).to(torch.float64)                # float32 quotient
    y = acc.to(torch.float64) * c[:, :, None, None]
    if bias is not None:
        y = y + bias.to(torch.float64)[None, :, None, None]
    return y.to(x.dtype)


def quantize_weight_int8_ste(w):
    """Fake-quantized per-output-channel int8 weight with a straight-through gradient."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=float(EPS)) / 127.0
    q = (w / scale).round().clamp(-127, 127) * scale
    return w + (q - w).detach()

"""Run an entry point's kernels directly: no VM, no allocation per call, safe from many threads (numpy + tvm-ffi).

The manifest of an artifact lists, for each entry point (act, forward, sample, features), the kernels the
compiler lowered it to, in order (written by `passes/entry_points.py: plan_of`):

    manifest["entry_points"]["act"] = {
      "inputs":  [{"name": "obs", "dtype": "float32", "shape": ["batch", 4]}],
      "outputs": [{"name": "actions", "dtype": "int64", "shape": ["batch"]}],
      "buffers": [{"dtype": "float32", "shape": ["batch", 64]}, ...,      # intermediates
                  {"dtype": "float32", "shape": ["batch", 3136], "view": "buffer:7"}],  # a reshape: no call
      "calls":   [{"func": "bitrl_bitlinear_k4_n64_relu",
                   "args": ["input:0", "param:p0", "param:p1", "param:p2", "buffer:0"]}, ...,
                  {"func": "argmax", "args": ["buffer:2", "output:0"]}]}
    manifest["batch"] = {"min": 1, "max": 1048576}

A dimension is an int or "batch" (the call's batch size). Each call is one function of lib.so (exported as
`__tvm_ffi_<func>`, TVM's packed calling convention) taking every argument as a DLTensor: compact, on the CPU,
64-byte aligned. Arguments are "input:I" and "output:I" (the entry point's), "buffer:I" (an intermediate) or
"param:NAME" (params.safetensors, weights unpacked to their compute layout); outputs come last (destination
passing). A buffer with "view" ("input:I" or "buffer:J", J not a view itself) has no memory of its own: it is that
tensor's memory under another shape (the same dtype and number of values: a reshape between kernels, which the
compiler leaves out of the calls). The Python `Policy` and the C API (runtime/capi) both run this plan. Its structure (every argument
refers to a tensor or parameter that exists, dims in range) is checked when the artifact is read
(runtime/manifest.py); what is left here is lib.so's symbols (KeyError from `library.function`).

Each thread gets its own buffers per (entry point, batch size), reused from call to call, so one Policy may be
called from many threads at once without a lock; a thread keeps the buffers of its last few batch sizes. Buffers
whose calls do not overlap share memory (`shared_buffers`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from .tvm_runtime import aligned, to_device

BATCHES_KEPT = 4  # per thread and entry point


def to_pixels(array) -> np.ndarray:
    """`array` as uint8 pixels, for a plan whose input is an image's uint8 frame (passes/entry_points.py reads
    the frame as it is where the first convolution can): ValueError unless every value is a whole number in
    [0, 255], which converts exactly (any other value would be changed by the conversion: the kernels would
    compute with another frame than the caller's)."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    with np.errstate(invalid="ignore"):
        pixels = array.astype(np.uint8)
        exact = bool(np.array_equal(pixels, array))
    if not exact:
        raise ValueError("observation values must be whole numbers in [0, 255] (this image policy reads uint8 "
                         "pixels); pass the frame as uint8")
    return pixels


def dims(shape: list, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == "batch" else int(d) for d in shape)


def shared_buffers(plan: dict, batch: int, inputs: list[np.ndarray] | tuple = ()) -> list[np.ndarray]:
    """The intermediates of `plan` at `batch`, 64-byte aligned, where buffers whose calls do not overlap share
    memory: buffer i lives from the first call that names it to the last, and takes a block no buffer living at the
    same time holds (greedy, in order of first use; a block is as large as its largest tenant). A buffer that a call
    reads before one writes it (the destination is a call's last argument), or that no call names, has a block of
    its own. A deep network's
    intermediates then take about as much as the widest few layers', not the sum over all layers. A view
    ("view": "buffer:J" or "input:I") is J's memory (a use of the view is one of J's) or `inputs[I]` reshaped."""
    specs = plan["buffers"]
    views = {j: spec["view"] for j, spec in enumerate(specs) if "view" in spec}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, call in enumerate(plan["calls"]):
        for position, arg in enumerate(call["args"]):
            kind, _, key = views.get(int(arg[7:]), arg).partition(":") if arg.startswith("buffer:") else ("", "", "")
            if kind == "buffer":
                if int(key) not in first and position != len(call["args"]) - 1:
                    first[int(key)] = -1  # read before any call writes it (destination last): kept whole, from start
                first.setdefault(int(key), i)
                last[int(key)] = i
    for j in range(len(specs)):
        if first.get(j, -1) == -1:
            last[j] = len(plan["calls"])  # to the end: never shared
    nbytes = [math.prod(dims(spec["shape"], batch)) * np.dtype(spec["dtype"]).itemsize for spec in specs]
    blocks: list[list[int]] = []  # [size, last call of its current tenant]
    home = [0] * len(specs)
    for j in sorted((j for j in range(len(specs)) if j not in views), key=lambda j: (first.get(j, -1), j)):
        start, end = first.get(j, -1), last.get(j, -1)
        free = [b for b, (_, busy) in enumerate(blocks) if busy < start]
        if free:
            b = max(free, key=lambda b: blocks[b][0])
            blocks[b] = [max(blocks[b][0], nbytes[j]), end]
        else:
            b = len(blocks)
            blocks.append([nbytes[j], end])
        home[j] = b
    memory = [aligned(np.empty(max(size, 1), np.uint8)) for size, _ in blocks]
    out = [None if j in views else memory[home[j]][:nbytes[j]].view(spec["dtype"]).reshape(dims(spec["shape"], batch))
           for j, spec in enumerate(specs)]
    for j, ref in views.items():
        kind, _, key = ref.partition(":")
        out[j] = (out if kind == "buffer" else inputs)[int(key)].reshape(dims(specs[j]["shape"], batch))
    return out


class _Frame:
    """One thread's buffers for one entry point at one batch size, and the calls bound to them."""

    def __init__(self, plan: dict, functions: dict, params: dict, batch: int):
        def alloc(spec):
            array = aligned(np.empty(dims(spec["shape"], batch), spec["dtype"]))
            return array, to_device(array)

        self.inputs = [alloc(s) for s in plan["inputs"]]
        self.outputs = [alloc(s) for s in plan["outputs"]]
        buffers = [(array, to_device(array)) for array in shared_buffers(plan, batch, [a for a, _ in self.inputs])]
        slots = {"input": self.inputs, "output": self.outputs, "buffer": buffers}

        def tensor(ref: str):
            kind, _, key = ref.partition(":")
            return params[key] if kind == "param" else slots[kind][int(key)][1]

        self.single = self.inputs[0][0][0]  # the first row of input 0, and input 0 flat (views)
        self.flat = self.inputs[0][0].reshape(-1)
        self.calls = [(functions[c["func"]], tuple(tensor(a) for a in c["args"])) for c in plan["calls"]]


class Plan:
    """An entry point's kernel calls; `run(*arrays)` -> its outputs as numpy arrays (owned by the caller)."""

    def __init__(self, name: str, plan: dict, library, params: dict):
        """`library`: a tvm_runtime.NativeLibrary; `params`: name -> tvm-ffi tensor (aligned, kept alive)."""
        self.name = name
        self.plan = plan
        self.functions = {c["func"]: library.function(c["func"]) for c in plan["calls"]}
        self.params = params  # name -> tvm-ffi tensor over an aligned numpy array
        self._local = threading.local()

    def frame(self, batch: int) -> _Frame:
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = OrderedDict()
        frame = frames.get(batch)
        if frame is None:
            frame = frames[batch] = _Frame(self.plan, self.functions, self.params, batch)
            if len(frames) > BATCHES_KEPT:
                frames.popitem(last=False)
        return frame

    def run_frame(self, frame: _Frame) -> None:
        """Run the calls on a frame whose inputs the caller filled."""
        for function, args in frame.calls:
            function(*args)

    def run(self, *arrays: np.ndarray, check=None) -> list[np.ndarray]:
        """Copy `arrays` into this thread's inputs (converting to their dtype; a uint8 input takes whole numbers in
        [0, 255] only, `to_pixels`), `check(first input)` if given (and the first array is not of integers or
        booleans: uint8 frames are finite floats, and the check would cost as much as their conversion), run the
        calls; the outputs, copied for the caller."""
        frame = self.frame(int(arrays[0].shape[0]))
        for (buffer, _), array in zip(frame.inputs, arrays):
            np.copyto(buffer, to_pixels(array) if buffer.dtype == np.uint8 else array, casting="unsafe")
        first = frame.inputs[0][0]
        if check is not None and np.asarray(arrays[0]).dtype.kind not in "biu" and first.dtype != np.uint8:
            check(first)
        self.run_frame(frame)
        return [buffer.copy() for buffer, _ in frame.outputs]

"""Policies into Relax: a LoadedPolicy (a torch module or an ONNX graph) as a float32 IRModule, and what cannot
be imported refused by name and place (`to_relax`, `CompileError`).

    torch     torch.export with a dynamic batch (bounded: input["max_batch"]; a convolutional policy's bound is
              where its intermediates fit, passes/bitconv_op.py), then relax.frontend.torch.from_exported_program;
              a recurrent policy (input "recurrent") exports forward(obs, state, episode_start)
    ONNX      relax.frontend.onnx.from_onnx
    refused   ops TVM cannot import, convolutions the kernels do not handle (1-D, 3-D, transposed, dilated,
              grouped): one line naming the op, the module and the line of the user's code that uses it

Work layer, beside precision (pipeline.py runs it first).
"""

from __future__ import annotations

import os
import re
import sys
import warnings


class CompileError(ValueError, RuntimeError):
    """The model cannot be compiled; the message (one line) names the op or stage and what to do. A ValueError
    (bad input), and a RuntimeError as it always was."""


def to_relax(loaded):
    """A LoadedPolicy as a float32 Relax IRModule whose `main` takes a [batch, *obs_shape] input."""
    kind = loaded.input.get("preprocess")
    obs_shape = (int(loaded.input["n"]),) if kind == "onehot" else \
        (int(loaded.input["text"]["length"]),) if kind == "text" else tuple(loaded.input["shape"])
    if loaded.onnx_model is not None:
        from tvm.relax.frontend.onnx import from_onnx

        for node in loaded.onnx_model.graph.node:
            kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [0, 0])
            if node.op_type in ("ConvTranspose", "ConvInteger", "QLinearConv") or (node.op_type == "Conv"
                                                                                  and len(kernel) != 2):
                raise CompileError(f"ONNX {node.op_type} (node {node.name or node.output[0]!r}, kernel {kernel}) is "
                                   f"not supported yet: the compiled artifact would not run; {_NOT_YET}")
        try:
            mod = from_onnx(loaded.onnx_model, keep_params_in_input=False)
        except Exception as e:
            raise CompileError(f"ONNX import failed: {first_line(e)}") from e
        from bitrl_compile.passes.bitconv_op import bound_batch

        return bound_batch(mod, None)  # unbounded as imported; a convolutional policy: a bound its buffers fit
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    example = torch.zeros((2, *obs_shape), dtype=torch.float32)
    # TVM plans static buffers for the batch's upper bound; input["max_batch"] = None drops the bound (buffers sized
    # per call), for models whose intermediates at 2**20 rows exceed memory (attention scores: bad_alloc at load).
    max_batch = loaded.input.get("max_batch", 1 << 20)
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's internal deprecations
            examples = (example,)
            recurrent = loaded.input.get("recurrent")  # forward(obs, state, episode_start) -> (output, next state)
            if recurrent:
                examples += (torch.zeros((2, int(recurrent["state_size"]))), torch.zeros(2))
            ep = torch.export.export(loaded.module.eval(), examples,
                                     dynamic_shapes=tuple({0: batch} for _ in examples))
    except Exception as e:
        if "Constraints violated" in str(e):  # e.g. a program exported for batches up to some bound
            raise CompileError(f"torch.export could not capture the policy for batches 1..{max_batch or 'any'} "
                               f"({first_line(e)}); export it with Dim('batch', min=1, max=N) or set "
                               "input[\"max_batch\"]") from e
        raise CompileError(f"torch.export could not capture the policy: {first_line(e)}") from e
    _refuse_not_yet_supported(ep)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
    except Exception as e:
        msg = str(e)
        ops = re.findall(r"Unsupported function types? \[?([^\]\n]+)", msg)
        if ops:
            names = [o.strip(" '\"") for o in ops[0].split(",")]
            raise CompileError(f"cannot lower op(s) {', '.join(names)} to TVM (used {_where(ep, names)}); "
                               "replace them in the policy or file an issue") from e
        raise CompileError(f"TVM could not import the exported program: {first_line(e)}") from e
    from bitrl_compile.passes.bitconv_op import bound_batch

    return bound_batch(mod, max_batch)  # a convolutional policy: a bound its buffers fit (passes/bitconv_op.py)


_NOT_YET = "see issue 17 and the README's format table"
_CONVOLUTIONS = {"conv1d": "Conv1d", "conv3d": "Conv3d", "conv_transpose1d": "ConvTranspose1d",
                 "conv_transpose2d": "ConvTranspose2d", "conv_transpose3d": "ConvTranspose3d",
                 "convolution": "a convolution", "_convolution": "a convolution"}


def _refuse_not_yet_supported(ep) -> None:
    """Convolutions other than Conv2d (dilation 1, groups 1: passes/bitconv_op.py) import into TVM but neither the
    kernels nor the reference handle them: refused here, by name and module."""
    for node in ep.graph_module.graph.nodes:
        name = str(getattr(node.target, "__name__", node.target))
        base = name.split(".")[0]
        if node.op != "call_function":
            continue
        if base in _CONVOLUTIONS:
            raise CompileError(f"{_CONVOLUTIONS[base]} ({name}, used {_where(ep, [base])}) is not supported yet: "
                               f"the compiled artifact would not run; {_NOT_YET}")
        if base == "conv2d":  # aten.conv2d(input, weight, bias, stride, padding, dilation, groups)
            args = list(node.args) + [None] * 7
            dilation, groups = args[5] or [1, 1], args[6] or 1
            if any(int(d) != 1 for d in dilation) or int(groups) != 1:
                raise CompileError(f"Conv2d with dilation {list(dilation)} and groups {groups} (used "
                                   f"{_where(ep, [base])}) is not supported: only dilation 1 and groups 1 compile "
                                   "to ternary convolutions; replace the layer")


def _where(ep, op_names: list[str]) -> str:
    """Where in the policy's modules an op is used, from torch.export's node metadata."""
    places = []
    for node in ep.graph_module.graph.nodes:
        target = str(getattr(node.target, "__name__", node.target))
        if node.op == "call_function" and any(name in target for name in op_names):
            stack = [(p, t) for p, t in (node.meta.get("nn_module_stack") or {}).values() if p]
            module = "forward"
            if stack:
                path, kind = stack[-1]
                kind = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1].strip("'>")
                module = f"module {path} ({kind})"
            code = _user_code(node.meta.get("stack_trace") or "")
            places.append(f"in {module}: {code}" if code else f"in {module}")
    return "; ".join(dict.fromkeys(places)) or "somewhere in forward"


def _user_code(stack_trace: str) -> str:
    """The source line of the innermost frame of the user's code in a torch.export stack trace (torch's own
    frames, such as Conv2d.forward calling F.conv2d, say nothing about where the op is in the policy)."""
    frames = []  # (file, "line N, in f", its source line or "")
    for line in stack_trace.splitlines():
        if m := re.match(r'\s*File "([^"]+)", (line \d+, in \S+)', line):
            frames.append([m.group(1), m.group(2), ""])
        elif frames and not frames[-1][2]:
            frames[-1][2] = line.strip()
    torch_dir = os.path.dirname(torch.__file__) if (torch := sys.modules.get("torch")) else None
    user = [f for f in frames if not (torch_dir and f[0].startswith(torch_dir))]
    if not user:
        return ""
    file, where, code = user[-1]
    return code or f"{os.path.basename(file)} {where}"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

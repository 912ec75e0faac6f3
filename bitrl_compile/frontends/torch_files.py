"""Torch files: the weights-only torch.load, torch.export programs (.pt2), TorchScript archives, and torch.save
pickles (a state_dict, or a whole nn.Module only when trusted)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from bitrl_compile.frontends.specs import _config_obs_shape
from bitrl_compile.frontends.state_dicts import _load_state_dict
from bitrl_compile.frontends.zips import MAX_TOTAL_BYTES, check_torch_zip, first_line, read_member
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


class _PickledCode(ModelLoadError):
    """The file holds pickled Python objects that torch.load(weights_only=True) refuses."""


# What torch.load raises on a corrupt or hostile file besides UnpicklingError (pickled code): the weights-only
# unpickler pops an empty stack (IndexError), indexes a missing memo or record (KeyError), unpacks short bytes
# (struct.error), asserts on persistent ids; the zip reader raises RuntimeError.
_TORCH_LOAD_ERRORS = (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError, TypeError,
                      AttributeError, AssertionError, struct.error, OverflowError, OSError)


def _torch_load_weights(data: bytes | Path, where: str):
    """torch.load(weights_only=True): tensors and plain containers only, never user classes. A torch archive's
    zip directory is checked first (frontends/zips.py): torch allocates each record at its declared size."""
    check_torch_zip(data, where)
    try:  # a file object, not a path: torch.load hands a path ending in .safetensors to another library
        with io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb") as src, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..." on plain pickles
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _PickledCode(f"{where}: contains pickled Python objects (code) besides tensors; load it only if "
                             "you trust it, with --trust-pickle (trust_pickle=True)") from None
    except _TORCH_LOAD_ERRORS as e:
        raise ModelLoadError(f"{where}: corrupt or truncated torch file ({type(e).__name__}: {first_line(e)}); "
                             "save it again") from None


def _program_module(ep, check_guards: bool = True) -> torch.fx.GraphModule:
    """`ep.module()` with the ordinary train()/eval() back: torch makes them raise on exported modules, but the
    graph was captured in one mode already, so for a policy they only need to be harmless flags."""
    module = ep.module(check_guards=check_guards)
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


def _dynamic_batch(module: nn.Module, obs_shape: list[int], path: Path, what: str) -> nn.Module:
    """Re-export with a dynamic batch dimension; the program's module accepts any batch and re-exports."""
    x = torch.zeros(2, *obs_shape)
    try:
        ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - export raises many types; report the first line
        raise ModelLoadError(f"{path}: the {what} cannot be exported with a dynamic batch dimension "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); export it with "
                             "dynamic_shapes={0: Dim('batch')} on the batch axis") from None
    return _program_module(ep)


def _pt2_unsafe_members(zf: zipfile.ZipFile, path: Path) -> list[str]:
    """Members of a .pt2 that torch.export.load would unpickle and that are not plain tensor archives (the zip's
    directory is checked already, and so is each inner archive's before torch.load reads it)."""
    raw: set[str] = set()
    for name in zf.namelist():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            folder = name.rsplit("/", 1)[0] + "/"
            try:
                config = json.loads(read_member(zf, name, MAX_TOTAL_BYTES, str(path))).get("config", {})
                metas = list(config.values())
                for meta in metas:
                    p = meta.get("path_name", "")
                    if not meta.get("use_pickle") and not p.startswith(("custom_obj", "opaque")):
                        raw.add(folder + p)
            except (ValueError, AttributeError, TypeError, RecursionError) as e:
                if isinstance(e, ModelLoadError):
                    raise
                raise ModelLoadError(f"{path}: member {name[:80]!r} is not the JSON torch.export writes "
                                     f"({type(e).__name__}: {first_line(e)}); save the program again") from None
    unsafe = []
    for name in zf.namelist():
        base = name.rsplit("/", 1)[-1]
        if name in raw or name.endswith((".json", "/")) or base in (
                "archive_format", "archive_version", "version", "byteorder", "serialization_id", ".format_version",
                ".storage_alignment"):
            continue
        data = read_member(zf, name, MAX_TOTAL_BYTES, str(path))
        if not data.startswith(b"PK"):
            unsafe.append(name)
            continue
        try:
            _torch_load_weights(data, f"{path}:{name}")
        except _PickledCode:
            unsafe.append(name)
    return unsafe


def _load_torch_export(path: Path, zf: zipfile.ZipFile, cfg: dict, trust_pickle: bool) -> LoadedPolicy:
    if not trust_pickle:
        unsafe = _pt2_unsafe_members(zf, path)
        if unsafe:
            raise ModelLoadError(f"{path}: the exported program holds pickled objects ({', '.join(unsafe[:3])}) "
                                 "that could run code; pass --trust-pickle (trust_pickle=True) if you trust it")
    else:  # trusted code may still be a corrupt file: the inner archives' directories are checked all the same
        for name in zf.namelist():
            with zf.open(name) as f:
                inner = f.read(2) == b"PK"
            if inner:
                check_torch_zip(read_member(zf, name, MAX_TOTAL_BYTES, str(path)), f"{path}:{name}")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - deserialisation errors of many kinds
        raise ModelLoadError(f"{path}: cannot load the exported program ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}); save it again with this torch version") from None
    user_inputs = ep.graph_signature.user_inputs
    if len(user_inputs) not in (1, 3):
        raise ModelLoadError(f"{path}: the program takes {len(user_inputs)} inputs; a policy takes one observation "
                             "(or, recurrent, obs, state and episode_start)")
    shapes = [list(next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"].shape)
              for name in user_inputs]
    shape = shapes[0]
    if not shape or (not cfg.get("obs_shape") and not all(isinstance(d, int) for d in shape[1:])):
        raise ModelLoadError(f"{path}: the program's input has shape {shape}; a policy takes [batch, fixed dims]: "
                             "export it with a dynamic batch dimension only, or pass config={\"obs_shape\": [...]}")
    obs_shape = _config_obs_shape(cfg, path) or [int(d) for d in shape[1:]]
    input_spec = {"shape": obs_shape, "preprocess": "none"}
    if len(shapes) == 3:
        input_spec["recurrent"] = _recurrent_spec(shapes, cfg, path)
    if isinstance(shape[0], int) and len(shapes) == 3:
        raise ModelLoadError(f"{path}: a recurrent program exported with a fixed batch of {shape[0]}; export it with "
                             "one Dim('batch', min=1, ...) shared by obs, state and episode_start")
    if isinstance(shape[0], int):  # a fixed batch size: guards would reject other batches
        module = _dynamic_batch(_program_module(ep, check_guards=False), obs_shape, path, "program")
    else:
        lower, upper = _batch_range(ep, shape[0])
        if lower > 1:
            raise ModelLoadError(f"{path}: the program accepts batches of {lower} or more, and a policy acts on one "
                                 "observation too; export it with Dim('batch', min=1, ...)")
        if upper is not None:  # honoured by the compile (pipeline.to_relax) and recorded in manifest["batch"]
            input_spec["max_batch"] = upper
        module = _program_module(ep)
    carried = _carried_config(zf, path)  # what bitrl-compile's own programs say of themselves (distilled CNNs)
    output = carried.get("output") if isinstance(carried.get("output"), dict) else {}
    trained = carried.get("trained") if isinstance(carried.get("trained"), dict) else {}
    recovery = trained.get("recovery") if isinstance(trained.get("recovery"), str) else None
    return LoadedPolicy(module, None, input_spec, dict(output), "torch-export", f"torch.export program, obs {obs_shape}"
                        + (f", batch <= {input_spec['max_batch']}" if "max_batch" in input_spec else ""), recovery)


def _recurrent_spec(shapes: list[list], cfg: dict, path: Path) -> dict:
    """input["recurrent"] of a program forward(obs [B, ...], state [B, S], episode_start [B]) -> (output, next
    state [B, S]): the contract of sb3-contrib policies here (frontends/sb3_recurrent.py): state = h of every LSTM
    layer, then c; episode_start 1 resets a row's state first. config "recurrent" {"layers": L} says how many
    layers the state holds (default 1: the runtime needs only S = 2 L H)."""
    state, start = shapes[1], shapes[2]
    if len(state) != 2 or not isinstance(state[1], int) or len(start) != 1:
        raise ModelLoadError(f"{path}: a program of three inputs is a recurrent policy forward(obs [B, ...], state "
                             f"[B, S], episode_start [B]); its inputs have shapes {shapes[1:]} after obs")
    size = int(state[1])
    rec = cfg.get("recurrent") if isinstance(cfg.get("recurrent"), dict) else {}
    layers = rec.get("layers", 1)
    if not isinstance(layers, int) or layers < 1 or size % (2 * layers):
        raise ModelLoadError(f"{path}: the state has {size} values, not 2 x {layers} layers x hidden (h and c of "
                             "every layer); fix config \"recurrent\": {\"layers\": L}")
    return {"layers": layers, "hidden": size // (2 * layers), "state_size": size}


CARRIED_CONFIG = "extra/bitrl_config.json"  # trainers/export.save_program writes it (torch.export extra_files)
MAX_CARRIED_CONFIG = 1 << 20


def _carried_config(zf: zipfile.ZipFile, path: Path) -> dict:
    """The JSON config a program written by bitrl-compile carries (its output spec, how it was trained), or {}:
    plain JSON, read within a limit; the caller's config and --env still override it (frontends._finish)."""
    names = [n for n in zf.namelist() if n.endswith("/" + CARRIED_CONFIG)]
    if not names:
        return {}
    try:
        config = json.loads(read_member(zf, names[0], MAX_CARRIED_CONFIG, str(path)))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path}: {CARRIED_CONFIG} is not JSON ({first_line(e)[:80]}); export the policy "
                             "again") from None
    return config if isinstance(config, dict) else {}


def _batch_range(ep, batch) -> tuple[int, int | None]:
    """The batch sizes an exported program accepts (its range constraint): (lower, upper or None)."""
    expr = getattr(getattr(batch, "node", None), "expr", None)
    bound = ep.range_constraints.get(expr) if expr is not None else None
    if bound is None:
        return 0, None
    lower, upper = bound.lower, bound.upper
    finite = getattr(upper, "is_finite", True) and str(upper) not in ("oo", "int_oo")
    return int(lower), int(upper) if finite and int(upper) < (1 << 20) else None


def _infer_obs_shape(module: nn.Module, cfg: dict, path: Path) -> list[int]:
    if cfg.get("obs_shape"):
        return _config_obs_shape(cfg, path)
    for name, p in module.named_parameters():
        if name.endswith("weight"):
            if p.ndim == 2:
                return [int(p.shape[1])]
            break
    raise ModelLoadError(f"{path}: cannot infer the observation shape; pass config={{\"obs_shape\": [...]}}")


def _load_torchscript(path: Path, cfg: dict) -> LoadedPolicy:
    from torch._export.converter import TS2EPConverter

    try:
        sm = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - RuntimeError for most archive problems
        raise ModelLoadError(f"{path}: cannot load the TorchScript archive ({str(e).splitlines()[0][:160]}); "
                             "save it again") from None
    sm = sm.float().eval()
    obs_shape = _infer_obs_shape(sm, cfg, path)
    try:
        ep = TS2EPConverter(sm, (torch.zeros(2, *obs_shape),)).convert()
    except Exception as e:  # noqa: BLE001 - the converter covers most but not all TorchScript
        raise ModelLoadError(f"{path}: TorchScript cannot be converted to torch.export "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); export the original module "
                             "with torch.export.save or to ONNX instead") from None
    module = _dynamic_batch(_program_module(ep), obs_shape, path, "converted TorchScript")
    x = torch.randn(3, *obs_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            got, want = module(x), sm(x)
    except Exception as e:  # noqa: BLE001 - the user's TorchScript code can raise anything
        raise ModelLoadError(f"{path}: the TorchScript module fails on an observation of shape {obs_shape} "
                             f"({type(e).__name__}: {first_line(e)}); give the right \"obs_shape\" in the config") \
            from None
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and (  # other outputs: _check_module says
            got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6)):
        raise ModelLoadError(f"{path}: the TorchScript conversion changed the outputs; export the original "
                             "module with torch.export.save instead")
    return LoadedPolicy(module, None, {"shape": obs_shape, "preprocess": "none"}, {}, "torchscript",
                        f"TorchScript module, obs {obs_shape}")


def _load_torch_pickle(path: Path, cfg: dict, trust_pickle: bool) -> LoadedPolicy:
    try:
        obj = _torch_load_weights(path, str(path))
    except _PickledCode:
        if not trust_pickle:
            raise ModelLoadError(f"{path}: the file contains pickled code (a torch.save of a whole model or other "
                                 "Python objects) that runs when loaded; pass --trust-pickle (trust_pickle=True) "
                                 "only if you trust its source, or save model.state_dict() instead") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - unpickling trusted data can raise anything
            raise ModelLoadError(f"{path}: cannot unpickle ({type(e).__name__}: {str(e)[:160]}); make the "
                                 "model's classes importable or save a state_dict") from None
    if isinstance(obj, nn.Module):
        obs_shape = _infer_obs_shape(obj, cfg, path)
        return LoadedPolicy(obj, None, {"shape": obs_shape, "preprocess": "none"}, {}, "pickle",
                            f"pickled {type(obj).__name__}, obs {obs_shape}")
    return _load_state_dict(path, obj, cfg)

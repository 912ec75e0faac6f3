"""libbitrl.so through ctypes for the tests that call the C API in-process, every function of bitrl.h declared once.

    lib = open_libbitrl()                          # the host build: bitrl_compile.devices.capi.build("host")
    handle = lib.bitrl_load(str(path).encode())
    assert handle, lib.bitrl_last_error().decode()
    lib.bitrl_act(handle, obs.ctypes.data, len(obs), actions.ctypes.data)

Why one place: ctypes believes whatever it is told. A function without a restype returns a C int, which cuts a
policy pointer to 32 bits; a plain CDLL function takes extra arguments without a word (cdecl lets it), so a call
written against an older bitrl.h would pass garbage instead of failing. Each test declaring its own subset drifted
from the header that way. Here every BITRL_API function has its restype and argtypes (test_capi.py checks the table
against runtime/capi/bitrl.h), and the library is opened with exact arity: too few or too many arguments raise
TypeError before anything reaches C.

Arrays (obs, out, actions, state, episode_start, noise) are void*: pass `array.ctypes.data`, or None for NULL.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_P, _I64, _INT, _STR = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p

# name: (restype, argtypes), in bitrl.h's order; `bitrl_policy *` and the arrays are void*.
DECLARATIONS: dict[str, tuple[type | None, list[type]]] = {
    "bitrl_load": (_P, [_STR]),
    "bitrl_load_trusted": (_P, [_STR, ctypes.POINTER(_STR), ctypes.c_size_t]),
    "bitrl_last_error": (_STR, []),
    "bitrl_version": (_STR, []),
    "bitrl_obs_size": (_I64, [_P]),
    "bitrl_output_size": (_I64, [_P]),
    "bitrl_action_size": (_I64, [_P]),
    "bitrl_is_discrete": (_INT, [_P]),
    "bitrl_max_batch": (_I64, [_P]),
    "bitrl_act": (_INT, [_P, _P, _I64, _P]),  # policy, obs, batch, actions
    "bitrl_forward": (_INT, [_P, _P, _I64, _P]),  # policy, obs, batch, out
    "bitrl_sample": (_INT, [_P, _P, _P, _I64, _P]),  # policy, obs, noise, batch, actions
    "bitrl_state_size": (_I64, [_P]),
    # policy, obs, state, episode_start, batch, actions (or out), next_state
    "bitrl_act_recurrent": (_INT, [_P, _P, _P, _P, _I64, _P, _P]),
    "bitrl_forward_recurrent": (_INT, [_P, _P, _P, _P, _I64, _P, _P]),
    # policy, obs, state, episode_start, noise, batch, actions, next_state
    "bitrl_sample_recurrent": (_INT, [_P, _P, _P, _P, _P, _I64, _P, _P]),
    "bitrl_has_sample": (_INT, [_P]),
    "bitrl_input_keys": (_I64, [_P]),
    # policy, i, &name, &offset, &size (each may be None)
    "bitrl_input_key": (_INT, [_P, _I64, ctypes.POINTER(_STR), ctypes.POINTER(_I64), ctypes.POINTER(_I64)]),
    "bitrl_free": (None, [_P]),
}


class _ExactArityCDLL(ctypes.CDLL):
    """A CDLL whose functions refuse a call with more arguments than their argtypes: ctypes only checks the count
    exactly for functions without its cdecl flag, and on Linux (x86-64, aarch64) the flag changes nothing else,
    libffi calls with the platform's one C convention either way."""

    _func_flags_ = 0


def open_libbitrl(path: str | Path | None = None) -> ctypes.CDLL:
    """libbitrl.so at `path` (the host build, made on first use, when None) with every bitrl.h function declared."""
    if path is None:
        from bitrl_compile.devices.capi import build

        path = build("host") / "libbitrl.so"
    lib = _ExactArityCDLL(str(path))
    for name, (restype, argtypes) in DECLARATIONS.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib

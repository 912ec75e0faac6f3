"""Targets are data: a name, the device, the TVM target, the toolchain and how tests run it.

`rasp4` is built on TVM's own `arm/rasp4b64` tag (Cortex-A72, ARMv8.0-A + NEON, keys arm_cpu/cpu):
no dotprod, no fp16, no LSE atomics — such instructions SIGILL on a real Pi 4, and the tests run
every rasp4 library under `qemu-aarch64 -cpu cortex-a72` and disassemble it to make sure.

`KERNELS` is the data that picks a BitLinear kernel for a TVM target: the first entry whose LLVM
features the target has. The order is measured (bitrl-compile bench-kernels, docs/kernels.md): on x86
the dot-product kernels beat the lookup-table ones (vpshufb and the byte interleaves share one port),
on the Cortex-A76 sdot beats them, on the Cortex-A72 the lookup tables win below 8 rows and the same kernel runs
int16 `mla` register blocks from 8 rows on (targets/gemm_neon.py). Its tile shape is also the
weights' compute layout (runtime/weights.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from bitrl_compile.runtime.policy import host_arch


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    tvm: dict                      # TVM 0.27 target, dict form (or {"tag": ...} extended by "attrs")
    arch: str                      # "x86_64" | "aarch64": what `uname -m` says on the device
    cc: str | None                 # cross compiler for export_library; None = host compiler
    cc_package: str | None = None  # Debian package that provides `cc`
    qemu_cpu: str | None = None    # `qemu-aarch64 -cpu` that models the device
    cpu_features: tuple[str, ...] = field(default_factory=tuple)  # /proc/cpuinfo flags the code needs


# LLVM target features -> the /proc/cpuinfo flag that says this CPU (as the OS shows it) has them: for the kernels'
# features (KernelSpec.features: the flags an artifact needs, `cpu_flags_needed`) and for the host target. A virtual
# machine may hide some: a Zen 4 guest without AVX-512 still has LLVM's host CPU name "znver4", whose code would
# SIGILL there, so the host target switches off what /proc/cpuinfo lacks (`hidden_features`). Switching off avx512f
# switches off every AVX-512 feature and AMX with it (LLVM's implications). A feature of another ISA is never
# implied (target_has_features is False), so one table serves x86 and ARM.
CPU_FLAGS = {"amx-int8": "amx_int8", "amx-tile": "amx_tile", "avx512vnni": "avx512_vnni", "avx512bw": "avx512bw",
             "avx2": "avx2", "neon": "asimd", "dotprod": "asimddp",
             "avx512f": "avx512f", "avx512vl": "avx512vl", "avx512dq": "avx512dq", "avx512bf16": "avx512_bf16",
             "avx512fp16": "avx512_fp16", "amx-bf16": "amx_bf16", "avxvnni": "avx_vnni", "fma": "fma", "f16c": "f16c",
             "bmi2": "bmi2", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
             "fullfp16": "asimdhp", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve"}


def hidden_features(tvm_target: dict, flags: set[str]) -> list[str]:
    """The `mattr` entries ("-avx512f") that switch off what `tvm_target`'s CPU name implies but `flags` (this CPU's
    /proc/cpuinfo) lack; none when the flags are unknown (empty)."""
    if not flags:
        return []
    import tvm
    from tvm.target.codegen import target_has_features

    target = tvm.target.Target(tvm_target)
    return [f"-{feature}" for feature, flag in CPU_FLAGS.items()
            if flag not in flags and target_has_features(feature, target)]


def _host_target() -> Target:
    arch = host_arch()
    from tvm.target import codegen

    from bitrl_compile.runtime.tvm_runtime import cpu_flags

    tvm_target = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    if arch == "aarch64":
        tvm_target["mtriple"] = "aarch64-linux-gnu"
    off = hidden_features(tvm_target, cpu_flags())
    if off:
        tvm_target["mattr"] = off
    # no cpu_features: they are those of the kernel chosen for this CPU (cpu_flags_needed)
    hidden = f", without {' '.join(f[1:] for f in off)}" if off else ""
    return Target("host", f"this machine ({arch}, {tvm_target['mcpu']}{hidden})", tvm_target, arch, None)


TARGETS: dict[str, Target] = {
    "rasp4": Target(
        "rasp4", "Raspberry Pi 4 (Cortex-A72, ARMv8.0-A, NEON, no dotprod)",
        {"tag": "arm/rasp4b64", "attrs": {"num-cores": 4}}, "aarch64",
        cc="aarch64-linux-gnu-g++", cc_package="g++-aarch64-linux-gnu", qemu_cpu="cortex-a72",
        cpu_features=("asimd",)),
    "rasp5": Target(
        "rasp5", "Raspberry Pi 5 (Cortex-A76, ARMv8.2-A, +dotprod +fp16)",
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
         "mattr": ["+neon", "+dotprod", "+fullfp16"], "keys": ["arm_cpu", "cpu"], "num-cores": 4},
        "aarch64", cc="aarch64-linux-gnu-g++", cc_package="g++-aarch64-linux-gnu", qemu_cpu="cortex-a76",
        cpu_features=("asimd", "asimddp")),
    "x86-avx2": Target(
        "x86-avx2", "any Haswell-or-newer x86-64", {"kind": "llvm", "mcpu": "haswell"}, "x86_64",
        None, cpu_features=("avx2", "fma")),
    "x86-amx": Target(
        "x86-amx", "AMX servers (Sapphire Rapids, Emerald Rapids, Granite Rapids)",
        {"kind": "llvm", "mcpu": "sapphirerapids"}, "x86_64", None,
        cpu_features=("amx_tile", "amx_int8", "avx512_vnni", "avx512bw")),
    "x86-avx512": Target(
        "x86-avx512", "AVX-512 VNNI servers (Ice Lake server, Zen 4)", {"kind": "llvm", "mcpu": "icelake-server"},
        "x86_64", None, cpu_features=("avx512f", "avx512_vnni")),
}


@dataclass(frozen=True)
class KernelSpec:
    """How targets/kernels.py builds the BitLinear kernel for one instruction set.

    The weights are read as 2-bit tiles of tile_n output channels x 4 * tile_k inputs (layout
    `tiles{tile_n}x{tile_k}`, runtime/weights.py); one tile row of codes times tile_k activations is
    one dot-product instruction per lane group. `rows` batch rows share each decoded tile (GEMM).

    A "lut" kernel (T-MAC / bitnet.cpp TL1 style) reads weights as `lut{tile_n}`: per pair of inputs a
    4-bit index into a 16-entry table of the pair's partial sums, built once per row; one `tbl` /
    `vpshufb` looks up tile_n outputs at once (tile_k is 1: one index byte per output and 4 inputs).
    """

    isa: str                   # the tensor intrinsic in targets/intrinsics.py ("generic": none)
    features: tuple[str, ...]  # LLVM target features it needs (tvm.target.codegen.target_has_features)
    tile_n: int                # output channels per tile: the int32 lanes of one accumulator
    tile_k: int                # inputs per lane and per 2-bit plane: the width of one dot product
    rows: int                  # batch rows per register block in the GEMM loop
    vector: int                # float32 lanes for the activation-quantization and epilogue loops
    method: str = "dot"        # "dot": codes times activations; "lut": table lookups of pair sums
    amx_rows: int = 0          # > 0: batch rows per AMX tile, computed first with tdpbssd (intrinsics.py)

    @property
    def layout(self) -> str:
        return f"lut{self.tile_n}" if self.method == "lut" else f"tiles{self.tile_n}x{self.tile_k}"


KERNELS: tuple[KernelSpec, ...] = (  # in order of preference
    # AMX (Sapphire Rapids and later): 16-row blocks as int8 tile products, the other rows as avx512-vnni
    KernelSpec("amx", ("amx-int8", "amx-tile", "avx512vnni", "avx512bw"), tile_n=16, tile_k=4, rows=4, vector=16,
               amx_rows=16),
    KernelSpec("avx512-vnni", ("avx512vnni", "avx512bw"), tile_n=16, tile_k=4, rows=4, vector=16),  # vpdpbusd
    KernelSpec("avx2", ("avx2",), tile_n=8, tile_k=4, rows=4, vector=8),             # vpmaddubsw + vpmaddwd
    KernelSpec("neon-dotprod", ("neon", "dotprod"), tile_n=4, tile_k=4, rows=4, vector=4),  # sdot (A76)
    # A72 (rasp4): tbl lookups take 1.3-1.7x fewer instructions than smull/smlal at batch 1, about as many
    # at batch 32 from N = K = 1024 (docs/kernels.md); the A72 also issues integer multiplies on one pipe only
    KernelSpec("neon-lut", ("neon",), tile_n=16, tile_k=1, rows=2, vector=4, method="lut"),       # tbl
    KernelSpec("neon", ("neon",), tile_n=8, tile_k=2, rows=4, vector=4),             # smull/smlal + sadalp
    KernelSpec("avx512-lut", ("avx512bw",), tile_n=64, tile_k=1, rows=4, vector=16, method="lut"),  # vpshufb
    KernelSpec("avx2-lut", ("avx2",), tile_n=32, tile_k=1, rows=4, vector=8, method="lut"),       # vpshufb
    KernelSpec("generic", (), tile_n=8, tile_k=4, rows=1, vector=4),                 # plain TIR, LLVM's choice
)


def kernel_spec(tvm_target=None, isa: str | None = None, method: str | None = None) -> KernelSpec:
    """The kernel for a tvm.target.Target (None: the generic kernel), or the one named `isa`; with `method`
    ("dot" or "lut") the first of that method the target can run (None if there is none)."""
    if isa is not None:
        for spec in KERNELS:
            if spec.isa == isa:
                return spec
        raise ValueError(f"unknown kernel ISA {isa!r}; known: {', '.join(s.isa for s in KERNELS)}")
    fallback = KERNELS[-1] if method in (None, "dot") else None  # the generic kernel is a dot-product one
    if tvm_target is None or str(tvm_target.kind.name) != "llvm":
        return fallback
    from tvm.target.codegen import target_has_features

    for spec in KERNELS:
        if method in (None, spec.method) and all(target_has_features(f, tvm_target) for f in spec.features):
            return spec
    return fallback


def cpu_flags_needed(target: Target, spec: KernelSpec) -> tuple[str, ...]:
    """The /proc/cpuinfo flags an artifact's CPU must have (the manifest's, which load() checks): the target's,
    or for `host` those of the kernel chosen for this CPU."""
    return target.cpu_features or tuple(CPU_FLAGS[f] for f in spec.features if f in CPU_FLAGS)


def known_targets() -> list[str]:
    return ["host", *TARGETS]


def get_target(name: str) -> Target:
    if name == "host":
        return _host_target()
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(known_targets())}")
    return TARGETS[name]


def tvm_target(target: Target):
    """The tvm.target.Target object for a Target (built on a TVM tag where we have one)."""
    import tvm

    spec = dict(target.tvm)
    if "tag" in spec:
        base = {str(k): v for k, v in tvm.target.Target(spec["tag"]).export().items() if k not in ("tag", "host")}
        base.update(spec.get("attrs", {}))
        return tvm.target.Target(base)
    return tvm.target.Target(spec)


def check_toolchain(target: Target) -> None:
    """Raise a one-line error naming the Debian package when the target's compiler is missing."""
    cc = target.cc or "g++"
    if shutil.which(cc) is None:
        pkg = target.cc_package or "g++"
        raise RuntimeError(f"compiler {cc} for target {target.name} is not installed; "
                           f"run `apt-get install {pkg}`")

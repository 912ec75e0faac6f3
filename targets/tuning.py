"""The tuning space of the BitLinear kernels and the per-target databases that compiles apply.

The design space is the hand-written schedule with its knobs (`kernels.Knobs`): per row path (GEMV
tail rows, register-blocked GEMM rows) how many output tiles run side by side and how many K steps
are unrolled. `bitrl-compile tune` (targets/autotune.py) lets MetaSchedule sample it
(`sample_categorical`, one per knob that has a choice), measures the candidates locally or on a board
through TVM RPC, and keeps the winners in a JSON database. Every point of the space computes the same
integers, and the winner is still checked against the numpy reference before it is stored.

A workload is one kernel at one concrete batch (`workload()`: batch 1 is a policy step and tunes the
GEMV path; a batch >= spec.rows tunes the GEMM path; `kernels.row_paths` says which rows run where: with
the amx kernel, rows in AMX tiles have no knobs, so batch 32 has none and batch 12 or 28 tunes the 4-row
blocks; with the avx512-vnni kernel the register blocks are panels of a fixed width, kernels.panel_tiles,
so only gemm_unroll is sampled for them). A compile looks its kernels up in the target's
database (`targets/tuned/<target>.json`, `--db DIR` for another folder): GEMV knobs from the record at
the smallest batch with tail rows, GEMM knobs from the one at the largest batch with register blocks,
each only if the stored workload hash equals the structural hash of the kernel built now (a changed
kernel makes its records stale, and the compile falls back to the default schedule and says so).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi

from bitrl_compile.runtime.files import write_atomic
from bitrl_compile.targets import Target, kernel_spec, kernels, tvm_target
from bitrl_compile.targets.kernels import DEFAULT_KNOBS, Knobs

SPACE_VERSION = 1           # bump when the meaning of the knobs changes: older records are then ignored
CHOICES = {"tiles": (1, 2, 4, 8), "unroll": (1, 2, 4, 8)}
DB_ROOT = Path(__file__).resolve().parent / "tuned"


class TuneError(ValueError):
    """Tuning cannot run as asked; the message says what to do."""


@dataclass(frozen=True)
class KernelKey:
    """One BitLinear kernel of a model: a K -> N layer with its activation and scale kind."""

    k: int
    n: int
    activation: str = "none"
    per_channel: bool = False

    @property
    def name(self) -> str:
        return kernels.kernel_name(self.k, self.n, self.activation, self.per_channel)


def workload(key: KernelKey, spec, batch: int):
    """The PrimFunc MetaSchedule tunes: the unscheduled kernel at a concrete batch."""
    func = kernels.bitlinear_primfunc(key.k, key.n, key.activation, key.per_channel, spec, batch=batch)
    return func.with_attrs({"bitrl.batch": batch, "bitrl.space": SPACE_VERSION})


def knob_slots(func, spec) -> list[tuple[str, list[int]]]:
    """The knobs a workload samples, in order, with their options (the divisors of the extents)."""
    batch = int(func.attrs["bitrl.batch"])
    nt, kb = kernels.kernel_shape(func, spec)
    rows = kernels.row_paths(spec, int(func.attrs["bitrl.k"]), batch)
    slots = []
    for path in ("gemv", "gemm"):
        for knob, extent in (("tiles", nt), ("unroll", kb)):
            options = [c for c in CHOICES[knob] if extent % c == 0]
            if path == "gemm" and knob == "tiles" and kernels.panel_used(spec, kb):
                continue  # panels have a fixed width (kernels.panel_tiles)
            if rows[path] and len(options) > 1:
                slots.append((f"{path}_{knob}", options))
    return slots


def _spec_of(func):
    return kernel_spec(isa=str(func.attrs["bitrl.isa"]))


def design_space(sch, forced: Knobs | None = None) -> None:
    """MetaSchedule's space function: sample the knobs (or take `forced` ones), apply the schedule."""
    func = sch.mod["main"]
    spec = _spec_of(func)
    values = {}
    for name, options in knob_slots(func, spec):
        decision = None if forced is None else options.index(getattr(forced, name))
        rv = sch.sample_categorical(options, [1.0 / len(options)] * len(options), decision=decision)
        values[name] = int(sch.get(rv))
    kernels.apply_schedule(sch, spec, Knobs(**values))


def knobs_of(trace, func, spec) -> Knobs:
    """The knobs a record's trace chose for a workload (the inverse of design_space)."""
    slots = knob_slots(func, spec)
    samples = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    if len(samples) != len(slots):
        raise ValueError(f"trace samples {len(samples)} knobs, the space has {len(slots)}")
    values = {}
    for (name, options), inst in zip(slots, samples):
        if [int(c) for c in inst.attrs[0]] != options:
            raise ValueError(f"trace's options for {name} differ from the space's {options}")
        values[name] = options[int(trace.get_decision(inst))]
    return Knobs(**values)


def trace_for(func, knobs: Knobs):
    """The MetaSchedule trace of the space at the given knobs (what `ms_database` stores)."""
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    design_space(sch, forced=knobs)
    return sch.trace


# ------------------------------------------------------------------------------------ databases
#
# The repository keeps one small JSON file per target: a record per (kernel, ISA, batch) with the
# knobs and the measured times. MetaSchedule's own JSON database stores every workload as a serialized
# PrimFunc (about 150 KB per kernel), too large to review; the workloads are a deterministic function
# of the kernel's parameters, so a record stores those plus the workload's structural hash, and
# `ms_database()` rebuilds a MetaSchedule database (workloads and traces) from the file when needed.

FORMAT = "bitrl-tuning"


def database_path(target: Target, tvm_tgt=None, folder: str | os.PathLike | None = None) -> Path:
    """The database file of a target: FOLDER/<target>.json (default folder: targets/tuned in the
    repository); `host` is per CPU model (host-znver3.json)."""
    name = target.name
    if name == "host":
        tvm_tgt = tvm_tgt if tvm_tgt is not None else tvm_target(target)
        name = f"host-{tvm_tgt.attrs.get('mcpu', 'generic')}"
    return (Path(folder) if folder is not None else DB_ROOT) / f"{name}.json"


def workload_hash(func) -> str:
    return f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}"


def load_database(path: Path) -> list[dict]:
    """The records of a database file ([] when it does not exist); one clear line when it is broken."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError("not a bitrl-compile tuning database")
        records = data["records"]
        for r in records:
            Knobs(**r["knobs"])
            KernelKey(int(r["k"]), int(r["n"]), str(r["activation"]), bool(r["per_channel"]))
    except (ValueError, KeyError, TypeError) as e:
        raise TuneError(f"tuning database {path} is unreadable ({e}); fix or delete it, or pass --no-tuning") from e
    return records


def save_database(path: Path, records: list[dict]) -> None:
    """Write the records sorted, atomically (a temporary file renamed over the old one)."""
    records = sorted(records, key=lambda r: (r["isa"], r["kernel"], r["batch"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "version": 1, "records": records}, indent=1) + "\n"
    write_atomic(path, text.encode())  # the user's umask, as for every file we write


def ms_database(path: Path, work_dir: str | os.PathLike):
    """A MetaSchedule JSONDatabase in `work_dir` holding the file's records as workloads + traces."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(str(Path(work_dir) / "database_workload.json"),
                                  str(Path(work_dir) / "database_tuning_record.json"), allow_missing=True)
    for r in load_database(path):
        key = KernelKey(int(r["k"]), int(r["n"]), r["activation"], bool(r["per_channel"]))
        func = workload(key, kernel_spec(isa=r["isa"]), int(r["batch"]))
        wl = db.commit_workload(tvm.IRModule({"main": func}))
        db.commit_tuning_record(ms.database.TuningRecord(
            trace_for(func, Knobs(**r["knobs"])), wl, [r["us"] * 1e-6], tvm.target.Target(r["target"]),
            ms.arg_info.ArgInfo.from_prim_func(func)))
    return db


@dataclass
class KernelSchedule:
    """What a compile uses for one kernel: the knobs and where they came from (for the manifest)."""

    knobs: Knobs
    source: str                                  # "tuned" | "default"
    detail: dict = field(default_factory=dict)   # per path: batch, µs, database; or why default

    def manifest(self) -> dict:
        return {"schedule": self.source, "knobs": self.knobs.as_dict(), **self.detail}


class TunedSchedules:
    """The records of one database file, looked up by kernel at compile time (read-only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.records = load_database(self.path) if self.path is not None else []

    def lookup(self, key: KernelKey, spec) -> KernelSchedule:
        best: dict[str, dict] = {}
        stale = 0
        for r in self.records:
            if r["kernel"] != key.name or r["isa"] != spec.isa:
                continue
            batch = int(r["batch"])
            func = workload(key, spec, batch)
            knobs = Knobs(**r["knobs"])
            nt, kb = kernels.kernel_shape(func, spec)
            if r.get("space") != SPACE_VERSION or r.get("workload_hash") != workload_hash(func) or \
                    not knobs.fit(nt, kb):
                stale += 1
                continue
            # GEMV knobs from the smallest batch with single rows (a policy step), GEMM knobs from the
            # largest batch with register blocks (rows in AMX tiles have no knobs).
            rows = kernels.row_paths(spec, key.k, batch)
            if rows["gemv"] and ("gemv" not in best or batch < best["gemv"]["batch"]):
                best["gemv"] = r
            if rows["gemm"] and ("gemm" not in best or batch > best["gemm"]["batch"]):
                best["gemm"] = r
        if not best:
            why = f"{stale} stale record(s): the kernel changed since tuning" if stale else "no tuning record"
            where = str(self.path) if self.path is not None else "no database"
            return KernelSchedule(DEFAULT_KNOBS, "default", {"reason": f"{why} ({where})"})
        values = DEFAULT_KNOBS.as_dict()
        detail = {"database": str(self.path)}
        for path, r in sorted(best.items()):
            values.update({k: v for k, v in r["knobs"].items() if k.startswith(path)})
            detail[path] = {"batch": r["batch"], "us": r["us"], "default_us": r["default_us"]}
        return KernelSchedule(Knobs(**values), "tuned", detail)

"""BitNet prefill against llama.cpp's ternary formats, same weights, same run (issue 16, item 4).

    nice -n 10 python bench/llamacpp.py [--parts x86,rasp4] [--layers 2,4] [--formats tq2_0,tq1_0] [--reps 7]

Results: a table per part, and bench/results/llamacpp.json (one key per part; docs/bitnet.md, "Prefill vs
llama.cpp"). rasp4: guest instructions per token under qemu-aarch64 -cpu cortex-a72 (the TCG plugin of
bitrl_compile/bench), ours (the rasp4 artifact in the aarch64 runtime) against llama.cpp cross-built for armv8-a
(NEON, no dotprod) with a small C harness around llama_decode.

The work: features for a text state of 64 tokens (an 8-value observation at 1 decimal, one token per byte):
BitLinear GEMMs of 64 rows, attention, norms, at 1 thread. Both sides run the same 2B4T-shaped checkpoints with
random weights (`bench/bitnet_scale.py`'s packed folders under $BITRL_SCRATCH, /work/scratch; generated if missing).

- ours: `bitrl-compile FOLDER --encoder text --decimals 1 --env LunarLander-v3 -t host` (8 values -> 64 tokens),
  then `Policy.features(obs)` on one observation in a fresh process with TVM_NUM_THREADS=1: p50 wall and CPU time
  per call. Random weights make deep networks chaotic and the compile's reference check refuses them past ~2
  layers (docs/bitnet.md, Scale); such a depth is recompiled with the check skipped (said in the table).
- llama.cpp: built once from the `llama-cpp-python==0.3.36` sdist's vendor/llama.cpp (CPU only, cmake + make,
  2 jobs, nice 10) under ~/.cache/bitrl-compile/llamacpp. Its `convert_hf_to_gguf.py` converts an unpacked copy
  of the checkpoint whose projections are the latent weights W = W_t / (weight_scale * f) (f: share of non-zero
  trits; the converter's absmean ternarization gives back W_t and gamma = 1/weight_scale exactly) with
  llama.cpp's sub-norm names and a small SentencePiece tokenizer (the vocabulary is padded to 128,256), to TQ2_0
  and TQ1_0 (embeddings F16). `llama-bench -p 64 -n 0 -t 1 -r REPS -o json`: p50 of its samples.

Differences, stated in the output: llama.cpp's BitNet graph uses SiLU where 2B4T uses squared ReLU (timed here on
the FFN's [64, 6912] at 1 thread); its prefill ends with the tied lm_head for the last token, and its last layer
runs the FFN for that token only; ours returns features (no lm_head). The depth difference (L_b - L_a) removes
both ends: per-layer time = (t(L_b) - t(L_a)) / (L_b - L_a), and a 30-layer time is extrapolated as
t(L_a) + (30 - L_a) * per-layer (labelled as extrapolated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bitrl_compile.bench import machine

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path(os.environ.get("BITRL_SCRATCH", "/work/scratch"))
CACHE = Path(os.environ.get("BITRL_LLAMACPP_CACHE", Path.home() / ".cache" / "bitrl-compile" / "llamacpp"))
SDIST = "llama-cpp-python==0.3.36"
RESULTS = ROOT / "bench" / "results" / "llamacpp.json"
OBS_DIM, DECIMALS, ENV = 8, 1, "LunarLander-v3"  # 8 values x (7 + 1) bytes = 64 tokens
TOKENS = 64


class BuildFailed(RuntimeError):
    pass


def _run(cmd, log: Path, cwd=None, env=None) -> None:
    with open(log, "w") as f:
        r = subprocess.run(["nice", "-n", "10", *map(str, cmd)], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                           check=False)
    if r.returncode:
        text = log.read_text(errors="replace").strip().splitlines() or ["?"]
        why = next((line for line in text if "error" in line.lower()), text[-1]).strip()
        raise BuildFailed(f"{Path(str(cmd[0])).name} exited {r.returncode} ({why[:160]}); log: {log}")


def llamacpp_source() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and extracted once under CACHE."""
    src = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    tgz = CACHE / "llama_cpp_python-0.3.36.tar.gz"
    if not tgz.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST, "-d", CACHE],
             CACHE / "download.log")
    try:
        with tarfile.open(tgz) as t:
            t.extractall(CACHE, filter="data")
    except (tarfile.TarError, OSError) as e:
        why = " ".join(str(e).split())[:160]
        raise BuildFailed(f"cannot extract {tgz} ({why}); delete it to download it again") from None
    if not (src / "CMakeLists.txt").is_file():
        raise BuildFailed(f"{tgz} has no vendor/llama.cpp")
    return src


def build_llamacpp(log=print) -> Path:
    """llama-bench for the host (CPU only, GGML_NATIVE), built once; returns the binary."""
    src = llamacpp_source()
    build = src / "build-x86"
    binary = build / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    log(f"building llama.cpp in {build} (2 jobs, nice 10; several minutes) ...")
    _run(["cmake", "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
          "-DBUILD_SHARED_LIBS=OFF", "-G", "Unix Makefiles"], src / "build-x86.cmake.log", cwd=src)
    _run(["make", "-C", build, "-j2", "llama-bench"], src / "build-x86.make.log", cwd=src)
    if not binary.is_file():
        raise BuildFailed(f"make finished without {binary}")
    return binary


def converter_env() -> dict:
    """The converter needs sentencepiece (installed once into CACHE/pydeps, not into the project's environment)."""
    deps = CACHE / "pydeps"
    if not (deps / "sentencepiece").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)  # its log lives there; a fresh machine has no cache yet
        _run([sys.executable, "-m", "pip", "install", "--target", deps, "sentencepiece"], CACHE / "pydeps.log")
    return {**os.environ, "PYTHONPATH": str(deps), "OMP_NUM_THREADS": "1"}


# --- the checkpoints ---------------------------------------------------------------------------------------------

def packed_checkpoint(layers: int, log=print) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from bitnet_scale import checkpoint  # generates SCRATCH/bitnet-2b4t-L{layers} if missing

    return checkpoint(layers, log=log)


_LLAMACPP_NAMES = {"self_attn.attn_sub_norm": "self_attn.inner_attn_ln", "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}


def _bf16(x) -> bytes:
    import numpy as np

    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def latent_checkpoint(packed: Path, env: dict, log=print) -> Path:
    """An unpacked bf16 copy of `packed` for llama.cpp's converter, written tensor by tensor: projections as the
    latent weights W_t / (weight_scale * f), norms renamed to llama.cpp's names, no quantization_config, plus a
    SentencePiece tokenizer.model (byte fallback, 512 pieces; the converter pads the vocabulary to 128,256)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from bitrl_compile import layouts

    out = packed.with_name(packed.name + "-latent")
    if (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((packed / "config.json").read_text())
    with safe_open(packed / "model.safetensors", "pt") as f:
        stored = f.keys()  # safe_open is not iterable
        names = [n for n in stored if not n.endswith("weight_scale")]
        plan = []
        for n in names:
            shape = list(f.get_slice(n).get_shape())
            if n.endswith("_proj.weight"):
                shape[0] = _rows(n, cfg)
            new = n
            for a, b in _LLAMACPP_NAMES.items():
                new = new.replace(a, b)
            plan.append((n, new, shape))
        header, offset = {}, 0
        for _, new, shape in plan:
            size = 2 * math.prod(shape)
            header[new] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps({**header, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        partial = out / "model.safetensors.partial"
        with open(partial, "wb") as w:
            w.write(struct.pack("<Q", len(raw)) + raw)
            for n, new, shape in plan:
                t = f.get_tensor(n)
                if n.endswith("_proj.weight"):
                    trits = layouts.unpack_hf_bitnet(t.numpy(), shape[0]).astype(np.float32)
                    scale = float(f.get_tensor(n + "_scale").float().item())
                    frac = np.count_nonzero(trits) / trits.size
                    data = _bf16(trits / np.float32(scale * frac))
                else:
                    data = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
                assert len(data) == header[new]["data_offsets"][1] - header[new]["data_offsets"][0], n
                w.write(data)
        os.replace(partial, out / "model.safetensors")
    latent_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(latent_cfg, indent=2) + "\n")
    code = ("import io, sentencepiece as spm, sys\n"
            "text = [('the state %d is %.2f ; ' % (i, i * 0.37)) * 3 for i in range(2000)]\n"
            "m = io.BytesIO()\n"
            "spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=m, vocab_size=512, "
            "model_type='bpe', byte_fallback=True, character_coverage=1.0, minloglevel=2)\n"
            "open(sys.argv[1], 'wb').write(m.getvalue())\n")
    subprocess.run([sys.executable, "-c", code, str(out / "tokenizer.model")], env=env, check=True)
    log(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 2**30:.2f} GiB)")
    return out


def _rows(name: str, cfg: dict) -> int:
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"q_proj": d, "k_proj": cfg["num_key_value_heads"] * hd, "v_proj": cfg["num_key_value_heads"] * hd,
            "o_proj": d, "gate_proj": cfg["intermediate_size"], "up_proj": cfg["intermediate_size"],
            "down_proj": d}[name.split(".")[-2]]


def gguf(latent: Path, fmt: str, src: Path, env: dict, log=print) -> Path:
    out = latent.with_name(f"{latent.name.removesuffix('-latent')}-{fmt}.gguf")
    if out.is_file():
        return out
    log(f"converting {latent.name} to {fmt} ...")
    tmp = out.with_suffix(".gguf.partial")
    _run([sys.executable, src / "convert_hf_to_gguf.py", latent, "--outtype", fmt, "--outfile", tmp],
         out.with_suffix(".convert.log"), env=env)
    os.replace(tmp, out)
    return out


# --- measurements --------------------------------------------------------------------------------------------------

def _llama_bench_once(binary: Path, model: Path, reps: int) -> tuple[dict, float]:
    """One llama-bench run of `reps` prefills (plus its warm-up): its JSON record and the CPU seconds it used."""
    before = os.times()
    r = subprocess.run([binary, "-m", model, "-p", str(TOKENS), "-n", "0", "-t", "1", "-r", str(reps), "-o", "json"],
                       capture_output=True, text=True, check=False)
    after = os.times()
    if r.returncode:
        raise RuntimeError(f"llama-bench failed on {model}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return json.loads(r.stdout)[0], cpu


def llama_bench(binary: Path, model: Path, reps: int) -> dict:
    """p50 wall of llama-bench's own samples (-r reps), and CPU seconds per prefill: the difference between a run
    of 1 + reps prefills and a run of 1 (model load, warm-up and exit cancel), divided by reps."""
    run, cpu_long = _llama_bench_once(binary, model, 1 + reps)
    _, cpu_short = _llama_bench_once(binary, model, 1)
    samples = [ns / 1e9 for ns in run["samples_ns"]]
    return {"p50_s": statistics.median(samples), "cpu_s": (cpu_long - cpu_short) / reps, "samples_s": samples,
            "flash_attn": run.get("flash_attn"), "type_k": run.get("type_k"), "cpu_info": run.get("cpu_info"),
            "model_type": run.get("model_type"), "build_commit": run.get("build_commit")}


def compile_ours(folder: Path, target: str = "host", log=print) -> tuple[Path, str]:
    """`bitrl-compile FOLDER --encoder text --decimals 1 --env LunarLander-v3 -t TARGET` (64 tokens a state):
    (artifact, what the compile's reference check said). The host compile checks the artifact (random deep weights
    layer by layer: `reference.check_layers`); a rasp4 artifact is checked under qemu by the tests, not here."""
    out = SCRATCH / f"{folder.name}-text64-{target}.bitrl"
    status = out.with_suffix(".check")
    if out.is_file() and status.is_file():
        return out, status.read_text().strip()
    args = [str(folder), "--encoder", "text", "--decimals", str(DECIMALS), "--env", ENV, "-t", target, "-o", str(out),
            "--force"]
    env = {**os.environ, "BITRL_MEM_AVAILABLE": os.environ.get("BITRL_MEM_AVAILABLE", str(64 << 30))}
    log(f"compiling {folder.name} (text, {TOKENS} tokens) for {target} ...")
    r = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "bitrl_compile.cli", *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"compile of {folder} failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    checked = [line.split("] ", 1)[-1] for line in r.stderr.splitlines() if "numpy reference" in line]
    result = checked[-1] if checked else "no check line"
    status.write_text(result + "\n")
    return out, result


_OURS = r"""
import json, statistics, sys, time
import numpy as np
from bitrl_compile.runtime import load
p = load(sys.argv[1])
obs = np.random.default_rng(0).standard_normal((1, int(sys.argv[3]))).astype(np.float32)
for _ in range(2):
    f = p.features(obs)
walls, cpus = [], []
for _ in range(int(sys.argv[2])):
    w0, c0 = time.perf_counter(), time.process_time()
    p.features(obs)
    walls.append(time.perf_counter() - w0); cpus.append(time.process_time() - c0)
print(json.dumps({"p50_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "samples_s": walls,
                  "features_dim": int(f.shape[-1]), "tokens": p.manifest.get("text", {}).get("length")}))
"""


def measure_ours(artifact: Path, reps: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _OURS, str(artifact), str(reps), str(OBS_DIM)], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"running {artifact} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def activation_cost(reps: int = 200) -> dict:
    """SiLU(gate) * up against relu(gate)^2 * up on the FFN's [64, 6912] at 1 thread (torch, float32)."""
    import torch

    torch.set_num_threads(1)
    g, u = torch.randn(TOKENS, 6912), torch.randn(TOKENS, 6912)
    out = {}
    for name, fn in (("silu", lambda: torch.nn.functional.silu(g) * u),
                     ("relu2", lambda: torch.relu(g).square() * u)):
        for _ in range(10):
            fn()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        out[name + "_s"] = statistics.median(t)
    return out


# --- rasp4: instructions under qemu-aarch64 -cpu cortex-a72 -------------------------------------------------------

MARKER = 0xB17  # bitrl_compile/bench/qemu_insn_plugin.c: syscall(MARKER, 2, label, 0) writes the counts so far
HARNESS_C = r"""
/* One prefill of N tokens with libllama, REPS times after a warm-up, between two plugin markers. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "llama.h"
#define MARK(label) syscall(0xB17, 2L, (long)(label), 0L)
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s MODEL.gguf N REPS\n", argv[0]); return 2; }
    int n = atoi(argv[2]), reps = atoi(argv[3]);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n; cp.n_batch = n; cp.n_ubatch = n; cp.n_threads = 1; cp.n_threads_batch = 1;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_token *tokens = malloc(sizeof(llama_token) * n);
    for (int i = 0; i < n; i++) tokens[i] = (llama_token)((i * 7919L + 13) % n_vocab);
    for (int r = 0; r <= reps; r++) {
        if (r == 1) MARK(0);
        llama_memory_clear(llama_get_memory(ctx), true);
        if (llama_decode(ctx, llama_batch_get_one(tokens, n))) return 1;
        llama_synchronize(ctx);
    }
    MARK(1);
    printf("ok\n");
    return 0;
}
"""


def build_llamacpp_aarch64(log=print) -> Path:
    """libllama cross-built for aarch64 (armv8-a: NEON, no dotprod; no OpenMP) and a static prefill harness."""
    src = llamacpp_source()
    build = src / "build-aarch64"
    harness = build / "bin" / "llamacpp-prefill"
    if harness.is_file():
        return harness
    log(f"cross-building llama.cpp for aarch64 (armv8-a, no dotprod) in {build} ...")
    _run(["cmake", "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_SYSTEM_NAME=Linux",
          "-DCMAKE_SYSTEM_PROCESSOR=aarch64", "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
          "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", "-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a",
          "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_COMMON=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DLLAMA_BUILD_APP=OFF", "-G", "Unix Makefiles"], src / "build-aarch64.cmake.log", cwd=src)
    _run(["make", "-C", build, "-j2", "llama"], src / "build-aarch64.make.log", cwd=src)
    libs = [build / "src" / "libllama.a", *sorted((build / "ggml" / "src").rglob("libggml*.a"), reverse=True)]
    c = build / "llamacpp-prefill.c"
    c.write_text(HARNESS_C)
    harness.parent.mkdir(parents=True, exist_ok=True)
    _run(["aarch64-linux-gnu-g++", "-O2", "-static", "-x", "c", c, "-x", "none", "-I", src / "include", "-I",
          src / "ggml" / "include", "-o", harness, "-Wl,--start-group", *libs, "-Wl,--end-group", "-lpthread", "-lm"],
         src / "build-aarch64.harness.log")
    return harness


def count_llamacpp(harness: Path, model: Path, reps: int, workdir: Path) -> float:
    """Guest instructions per prefill of llama.cpp's harness under qemu-aarch64 -cpu cortex-a72."""
    from bitrl_compile.bench.machine import build_plugin

    counts = workdir / f"{model.stem}.counts"
    env = {**os.environ, "QEMU_PLUGIN": f"file={build_plugin()},out={counts}"}
    r = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a72", harness, model, str(TOKENS), str(reps)],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"llama.cpp under qemu failed on {model}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return _per_call(counts, reps)


_OURS_COUNT = r"""
import ctypes, sys
import numpy as np
from bitrl_compile.runtime import load
libc = ctypes.CDLL(None, use_errno=True)
p = load(sys.argv[1])
obs = np.random.default_rng(0).standard_normal((1, int(sys.argv[3]))).astype(np.float32)
p.features(obs)
reps = int(sys.argv[2])
libc.syscall(0xB17, ctypes.c_long(2), ctypes.c_long(0), ctypes.c_long(0))
for _ in range(reps):
    p.features(obs)
libc.syscall(0xB17, ctypes.c_long(2), ctypes.c_long(1), ctypes.c_long(0))
print("ok")
"""


def count_ours(artifact: Path, reps: int, workdir: Path) -> float:
    """Guest instructions per `features` call of the rasp4 artifact in the aarch64 runtime under qemu."""
    from bitrl_compile.bench.machine import build_plugin
    from bitrl_compile.devices import qemu_python_command

    counts = workdir / f"{artifact.stem}.counts"
    command = qemu_python_command("cortex-a72")
    command = [*command[:-1], "-E", "TVM_NUM_THREADS=1", "-E", "OMP_NUM_THREADS=1", command[-1]]
    env = {**os.environ, "QEMU_PLUGIN": f"file={build_plugin()},out={counts}"}
    r = subprocess.run([*command, "-c", _OURS_COUNT, str(artifact), str(reps), str(OBS_DIM)], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"{artifact} under qemu failed: {r.stderr[-1500:]}")
    return _per_call(counts, reps)


def _per_call(counts: Path, reps: int) -> float:
    by_label = {int(line.split()[0]): int(line.split()[1]) for line in counts.read_text().splitlines() if line.strip()}
    return (by_label[1] - by_label[0]) / reps


# --- report --------------------------------------------------------------------------------------------------------

def per_layer(times: dict, layers: list[int]) -> dict | None:
    """Per-layer time from the shallowest and deepest depth, the fixed rest, and t(30) extrapolated from them."""
    if len(layers) < 2:
        return None
    a, b = layers[0], layers[-1]
    slope = (times[b] - times[a]) / (b - a)
    return {"per_layer_s": slope, "fixed_s": times[a] - a * slope, "t30_s": times[a] + (30 - a) * slope}


OURS = "ours (bitrl-compile, host)"


def report(res: dict) -> str:
    layers, sides = res["layers"], res["sides"]
    base = "llama.cpp TQ2_0" if "llama.cpp TQ2_0" in sides else next(iter(sides))
    fits = any(s.get("fit_cpu") for s in sides.values())
    head = "| side | " + " | ".join(f"{n} layers: CPU ms (tokens/s)" for n in layers)
    head += " | per layer: CPU ms | 30 layers, extrapolated: tokens/s | ours vs this, per layer" if fits else ""
    head += " | wall p50 ms (" + ", ".join(f"{n} L" for n in layers) + ") |"
    lines = [(f"Prefill of a {TOKENS}-token text state at the 2B4T width (d 2560, FFN 6912, 20/5 heads), random "
              "weights, 1 thread, both sides in the same run. CPU time per prefill (the machine is shared: wall "
              "times wait for the core)."), "", head, "|---|" + "---:|" * (len(layers) + (3 if fits else 0) + 1)]
    for name, s in sides.items():
        cells = [f"{s[str(n)]['cpu_s'] * 1e3:.1f} ({TOKENS / s[str(n)]['cpu_s']:.1f})" for n in layers]
        if fits:
            fit, ours = s["fit_cpu"], sides[OURS]["fit_cpu"]
            cells += [f"{fit['per_layer_s'] * 1e3:.1f}", f"{TOKENS / fit['t30_s']:.2f}",
                      "-" if name == OURS else f"**{fit['per_layer_s'] / ours['per_layer_s']:.2f}x**"]
        cells.append(", ".join(f"{s[str(n)]['p50_s'] * 1e3:.0f}" for n in layers))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ours = sides[OURS]
    lines.append("")
    for name, s in sides.items():
        if name != OURS:
            lines.append(f"- whole prefill vs {name}: ours " + ", ".join(
                f"{s[str(n)]['cpu_s'] / ours[str(n)]['cpu_s']:.2f}x ({n} layers)" for n in layers)
                + ("; goal >= 2x" if name == base else "") + ".")
    lines.append("- ours, reference check at compile: " + ", ".join(f"{n} layers {ours[str(n)]['check']}"
                                                                    for n in layers) + ".")
    if act := res.get("activation"):
        lines.append(f"- FFN activation on [{TOKENS}, 6912] (torch, 1 thread): SiLU(gate)*up {act['silu_s'] * 1e6:.0f} "
                     f"us, relu(gate)^2*up {act['relu2_s'] * 1e6:.0f} us per layer.")
    return "\n".join(lines)


def report_rasp4(res: dict) -> str:
    layers, sides = res["layers"], res["sides"]
    fits = len(layers) > 1
    head = "| side | " + " | ".join(f"{n} layers: instructions per token" for n in layers)
    head += (" | per layer per token | 30 layers, extrapolated: per token | ours: fewer instructions per layer |"
             if fits else " |")
    lines = [(f"Guest instructions per token of a {TOKENS}-token prefill under qemu-aarch64 -cpu cortex-a72 (1 "
              "thread; the bench's TCG plugin, markers around the calls after a warm-up one)."), "", head,
             "|---|" + "---:|" * (len(layers) + (3 if fits else 0))]
    ours = sides[OURS_RASP4]
    for name, s in sides.items():
        cells = [f"{s[str(n)]['instructions'] / TOKENS / 1e6:.1f} M" for n in layers]
        if fits:  # per_layer() names its keys for times; here they hold instructions
            cells += [f"{s['fit']['per_layer_s'] / TOKENS / 1e6:.2f} M", f"{s['fit']['t30_s'] / TOKENS / 1e6:.0f} M",
                      "-" if name == OURS_RASP4 else f"**{s['fit']['per_layer_s'] / ours['fit']['per_layer_s']:.2f}x**"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, s in sides.items():
        if name != OURS_RASP4:
            lines.append(f"- whole prefill, {name}'s instructions / ours: " + ", ".join(
                f"{s[str(n)]['instructions'] / ours[str(n)]['instructions']:.2f} ({n} layers)" for n in layers)
                + ("; goal >= 1.5" if name == "llama.cpp TQ2_0" else "") + ".")
    return "\n".join(lines)


OURS_RASP4 = "ours (bitrl-compile, rasp4)"


def run_x86(layers, formats, reps, env) -> dict:
    binary = build_llamacpp()
    src = binary.parent.parent.parent
    sides: dict[str, dict] = {OURS: {}, **{f"llama.cpp {f.upper()}": {} for f in formats}}
    meta = {}
    for n in layers:
        packed = packed_checkpoint(n)
        latent = latent_checkpoint(packed, env)
        models = {f: gguf(latent, f, src, env) for f in formats}
        artifact, check = compile_ours(packed, "host")
        print(f"x86: measuring {n} layers ...", flush=True)
        sides[OURS][str(n)] = {**measure_ours(artifact, reps), "check": check, "artifact_bytes": artifact.stat().st_size}
        for f, model in models.items():
            r = llama_bench(binary, model, reps)
            meta = {k: r.pop(k) for k in ("flash_attn", "type_k", "cpu_info", "build_commit")}
            sides[f"llama.cpp {f.upper()}"][str(n)] = {**r, "gguf_bytes": model.stat().st_size}
    for s in sides.values():
        s["fit_cpu"] = per_layer({n: s[str(n)]["cpu_s"] for n in layers}, layers)
        s["fit_wall"] = per_layer({n: s[str(n)]["p50_s"] for n in layers}, layers)
    res = {"tokens": TOKENS, "layers": layers, "threads": 1, "sides": sides, "activation": activation_cost(),
           "llamacpp": {"sdist": SDIST, "build": "cmake Release, GGML_NATIVE=ON, CPU only", **meta},
           "machine": machine.cpu_name()}
    res["table"] = report(res)
    return res


def run_rasp4(layers, formats, reps, env) -> dict:
    harness = build_llamacpp_aarch64()
    src = harness.parent.parent.parent
    sides: dict[str, dict] = {OURS_RASP4: {}, **{f"llama.cpp {f.upper()}": {} for f in formats}}
    workdir = SCRATCH / "llamacpp-counts"
    workdir.mkdir(parents=True, exist_ok=True)
    for n in layers:
        packed = packed_checkpoint(n)
        latent = latent_checkpoint(packed, env)
        models = {f: gguf(latent, f, src, env) for f in formats}
        artifact, check = compile_ours(packed, "rasp4")
        print(f"rasp4: counting {n} layers under qemu ...", flush=True)
        sides[OURS_RASP4][str(n)] = {"instructions": count_ours(artifact, reps, workdir), "check": check}
        for f, model in models.items():
            sides[f"llama.cpp {f.upper()}"][str(n)] = {"instructions": count_llamacpp(harness, model, reps, workdir)}
    for s in sides.values():
        s["fit"] = per_layer({n: s[str(n)]["instructions"] for n in layers}, layers)  # "_s" keys hold instructions
    qemu = subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True, check=False).stdout
    res = {"tokens": TOKENS, "layers": layers, "threads": 1, "cpu": "cortex-a72", "qemu": qemu.split("\n")[0],
           "sides": sides, "llamacpp": {"sdist": SDIST, "build": "aarch64-linux-gnu-gcc, -march=armv8-a (NEON, no "
                                        "dotprod), no OpenMP, static; a C harness calling llama_decode on 64 tokens"}}
    res["table"] = report_rasp4(res)
    return res




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--layers", default="2,4", help="depths, comma-separated (the same on both sides) [2,4]")
    ap.add_argument("--formats", default="tq2_0,tq1_0", help="llama.cpp formats, comma-separated [tq2_0,tq1_0]")
    ap.add_argument("--parts", default="x86", help="x86 (llama-bench on this CPU), rasp4 (instructions under qemu "
                    "cortex-a72, llama.cpp cross-built), or x86,rasp4 [x86]")
    ap.add_argument("--reps", type=int, default=7, help="calls (llama-bench repetitions) per x86 measurement [7]")
    ap.add_argument("--qemu-reps", type=int, default=1, help="counted calls per rasp4 measurement (deterministic) [1]")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"results, one key per part [{RESULTS.relative_to(ROOT)}]")
    args = ap.parse_args(argv)
    try:
        layers = sorted({int(x) for x in args.layers.split(",")})
    except ValueError:
        ap.error(f"--layers {args.layers!r}: comma-separated integers, e.g. 2,4")
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [f for f in formats if f not in ("tq1_0", "tq2_0")]:
        ap.error(f"--formats: {bad[0]!r} is not tq1_0 or tq2_0")
    if bad := [p for p in parts if p not in ("x86", "rasp4")]:
        ap.error(f"--parts: {bad[0]!r} is not x86 or rasp4")
    if not layers or layers[0] < 1 or args.reps < 1 or args.qemu_reps < 1:
        ap.error("--layers, --reps and --qemu-reps must be >= 1")
    out = json.loads(args.json.read_text()) if args.json.is_file() else {}
    try:
        env = converter_env()
        for part in parts:
            res = (run_x86 if part == "x86" else run_rasp4)(layers, formats,
                                                          args.reps if part == "x86" else args.qemu_reps, env)
            res["command"] = "python bench/llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:])
            print("\n" + res["table"] + "\n", flush=True)
            out[part] = res
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".json.partial")
            tmp.write_text(json.dumps(out, indent=1) + "\n")
            os.replace(tmp, args.json)
            print(f"wrote {args.json} ({part})")
    except BuildFailed as e:
        print(f"bench/llamacpp.py: llama.cpp build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

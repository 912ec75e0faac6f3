"""bench-kernels: a tiny run measures every implementation, checks ours bit-exact, and reports the machine."""

from bitrl_compile.bench import kernels as bench_kernels


def test_a_tiny_kernel_benchmark_reports_every_implementation():
    result = bench_kernels.run(sizes=(64,), batches=(1, 3), rounds=1, block_ms=1, arm=False, log=lambda s: None)
    assert [(r["n"], r["batch"]) for r in result["rows"]] == [(64, 1), (64, 3)]
    for row in result["rows"]:
        assert set(row["us"]) == set(bench_kernels.IMPLS) and all(t > 0 for t in row["us"].values())
        assert row["bits_per_weight"] == {"compute": 2.0, "storage": 8 * 13 / 64}
        assert row["fp32_over_ours_weight_bytes"]["storage"] > 19
    text = bench_kernels.report(result, "bitrl-compile bench-kernels --sizes 64")
    assert "bench-kernels --sizes 64" in text and result["machine"]["cpu"] in text and "load average" in text


def test_inner_loops_are_found_in_a_disassembly():
    insns = [(0x10, "ldr", "q0, [x1]"), (0x14, "sdot", "v1.4s, v0.16b, v2.16b"), (0x18, "sdot", "v1.4s, v0.16b, v3.16b"),
             (0x1c, "subs", "x2, x2, #1"), (0x20, "b.ne", "10 <k+0x10>"), (0x24, "ret", "")]
    assert bench_kernels.inner_loops(insns) == [{"instructions": 5, "macs": 32, "per_1000_macs": 156.2,
                                                 "dot_instructions": ["sdot"], "stores": 0}]


def test_conv_benchmark_times_every_implementation_on_a_nature_cnn_layer():
    from bitrl_compile.bench import conv as bench_conv

    layer = bench_conv.NATURE_CNN[2]  # 3x3/1 64 -> 64 at 9x9: the smallest
    rows = bench_conv.run_conv(batches=(2,), rounds=1, block_ms=1, layers=(layer,), log=lambda s: None)
    assert [(r["layer"], r["batch"]) for r in rows] == [(layer[0], 2)]
    assert set(rows[0]["us"]) == set(bench_conv.CONV_IMPLS) and all(t > 0 for t in rows[0]["us"].values())
    assert rows[0]["macs"] == 64 * 9 * 64 * 7 * 7 * 2 and layer[0] in bench_conv.format_conv_row(rows[0])


def test_convolutional_policies_get_statically_quantized_int8_baselines(tmp_path):
    import numpy as np
    import onnx

    from bitrl_compile.bench import conv as bench_conv
    from bitrl_compile.bench.report import quantize_convolutions_static

    g = bench_conv.geometry((4, 3, 3, 1, 1, 1, 1, 1, 1))
    rng = np.random.default_rng(0)
    fp32 = bench_conv.onnx_conv(rng.standard_normal((16, 4, 3, 3)).astype(np.float32),
                                np.zeros(16, np.float32), g, (6, 6), tmp_path)
    files = {"onnx_fp32": fp32, "onnx_int8": tmp_path / "int8.onnx"}
    spec = {"input": {"shape": [4, 6, 6], "dtype": "float32", "preprocess": "image", "normalize": None}}
    obs = rng.integers(0, 256, (4, 4, 6, 6)).astype(np.float32)
    assert quantize_convolutions_static(files, spec, obs) == "static"
    ops = {node.op_type for node in onnx.load(str(files["onnx_int8"])).graph.node}
    assert "QLinearConv" in ops and "ConvInteger" not in ops

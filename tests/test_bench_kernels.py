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

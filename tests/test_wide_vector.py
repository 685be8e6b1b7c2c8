"""The x86 target's tuning space (targets/tuning_ms.space): MetaSchedule's tiling rule replaced by
MultiLevelTilingWideVector at the CPU's full vector width (the `wide_vector` option, on by
default). TVM's own rule samples the innermost tile freely: on this AVX-512 CPU 20 of the 33
kernels of a 20-minute EfficientNet-Lite0 tuning ran on 256- or 128-bit FMAs (docs/compiler.md)."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from conftest import matmul_model

pytest.importorskip("tvm")

from graphopt.targets import tuning_ms  # noqa: E402
from graphopt.targets.rpi4 import Rpi4Target  # noqa: E402
from graphopt.targets.x86 import X86Target  # noqa: E402

pytestmark = pytest.mark.tvm


def _ms():
    from graphopt.targets import tvm_common as tc

    tc.load_tvm(1)
    import tvm.s_tir.meta_schedule as ms

    return ms


def test_vector_bits_follow_the_cpus_features():
    assert X86Target(threads=1, mcpu="skylake-avx512").vector_bits == 512
    assert X86Target(threads=1, mcpu="haswell").vector_bits == 256
    assert X86Target(threads=1, mcpu="x86-64").vector_bits == 0  # SSE2 only: TVM's space
    assert X86Target(threads=1, mcpu="skylake-avx512", wide_vector=0).vector_bits == 0
    assert Rpi4Target(threads=1).vector_bits == 0  # aarch64: not measured there, TVM's space
    t = X86Target(threads=1, mcpu="skylake-avx512", trials=2)
    assert t.describe()["tuning"]["vector_bits"] == 512


def test_the_space_swaps_only_the_tiling_rule():
    ms = _ms()
    tvm_rules = [type(r).__name__ for r in ms.ScheduleRule.create("llvm")]
    assert [type(r).__name__ for r in tuning_ms.llvm_rules(ms, 0)] == tvm_rules
    wide = [type(r).__name__ for r in tuning_ms.llvm_rules(ms, 512)]
    assert wide == [("MultiLevelTilingWideVector" if n == "MultiLevelTiling" else n) for n in tvm_rules]
    assert "MultiLevelTiling" in tvm_rules  # else the swap above changed nothing
    x86 = X86Target(threads=1, mcpu="skylake-avx512").target
    names = [type(r).__name__ for r in tuning_ms.space(ms, x86, 512).sch_rules]
    assert "MultiLevelTilingWideVector" in names and "MultiLevelTiling" not in names
    assert "MultiLevelTilingWithIntrin" not in names
    # a task with x86_int8's packed matmul keeps that space: its intrinsics first, then TVM's tiling
    for space in (tuning_ms.space(ms, x86, 512, int8=True), tuning_ms.space(ms, x86, 0)):
        names = [type(r).__name__ for r in space.sch_rules]
        assert names.index("MultiLevelTilingWithIntrin") < names.index("MultiLevelTiling"), names
        assert "MultiLevelTilingWideVector" not in names
    assert tuning_ms.space(ms, Rpi4Target(threads=1).target, 0) == "post-order-apply"


def _packed_fma_widths(asm: str) -> dict[str, int]:
    """Packed float FMAs in `asm` by register width (AT&T syntax: the registers are %zmm/%ymm/%xmm)."""
    fmas = re.findall(r"\bvfn?m(?:add|sub)\w*ps\b[^\n]*", asm)
    return {w: sum(1 for f in fmas if f"%{w}" in f) for w in ("zmm", "ymm", "xmm")}


@pytest.mark.slow  # ~30-60 s of tuning on a quiet 2-core machine
def test_a_tuned_matmul_runs_on_full_width_fmas_and_matches_onnxruntime(tmp_path):
    """48 output columns: TVM's own space, tuned the same way (wide_vector=0), gave this kernel
    128-bit FMAs only (checked by hand, 2026-11-28; a 128x128 matmul got 512-bit ones either way,
    so it would not tell the two spaces apart)."""
    target = X86Target(threads=2, trials=4, tuning_db=str(tmp_path / "db"))
    if target.vector_bits != 512:
        pytest.skip(f"this CPU's widest vector is {target.vector_bits} bits; the check is written for AVX-512")
    model = matmul_model(k=64, n=48, rows=7)
    try:
        art = target.compile(model, tmp_path)
        assert art.info["tuning"]["workloads_tuned"] == art.info["tuning"]["workloads_seen"] == 1
        x = np.random.default_rng(1).standard_normal((1, 7, 64)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(target.run_once(art, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
        asm = "\n".join(m.inspect_source("asm") for m in art.handle.mod.imports if m.kind == "llvm")
        widths = _packed_fma_widths(asm)
        assert widths["zmm"] > 0 and widths["ymm"] == widths["xmm"] == 0, widths
    finally:
        target.close()

"""Integer matmul kernels for x86 CPUs: TVM tensor intrinsics on `vpmaddwd` (AVX2) and `vpdpbusd`
(AVX-512 VNNI), the packed-weight matmul they tensorize, and the MetaSchedule search space that uses them.

Why: TVM 0.27 ships x86 int8 intrinsics only for VNNI (`vpdpbusd`) and AVX-512. On an AVX2 CPU
MetaSchedule vectorizes an int8 x int8 -> int32 matmul as 32-bit multiplies, no cheaper than
fp32 FMAs, so lowered int8 code was not faster than fp32 after tuning. `vpmaddwd` multiplies 16
pairs of int16 and adds adjacent products into 8 int32 lanes: 16 multiply-adds per instruction,
exact (no saturation, unlike `vpmaddubsw`), against 8 for an fp32 FMA.

The kernel computes C[i, j] = sum_k int32(A[i, k]) * int32(Bp[j // 8, k // 2, j % 8, k % 2]):
A is the quantized activation (uint8 or int8, as it is; the intrinsic widens a pair of it),
Bp the constant int8 weight widened to int16 and packed so that the 8 output columns x 2
reduction steps one instruction needs are 16 adjacent int16. `MultiLevelTilingWithIntrin`
tiles the rest of the loops and tensorizes the 8 x 2 tile (as TVM does for VNNI).

On a CPU with AVX-512 VNNI, a uint8 activation times int8 weights (onnxruntime's default for
static and dynamic quantization) runs on `vpdpbusd` instead: 16 int32 lanes, each the exact sum
of 4 uint8 x int8 products, 64 multiply-adds per instruction (4x vpmaddwd's 16). Its weight is
packed int8, Bp[j // 16, k // 4, j % 16, k % 4] (`pack_weight(w, VNNI)`); the same TE compute
(`packed_matmul_te`) reads the tile shape from the packed weight. TVM ships a VNNI intrinsic
(`dot_16x4_vnni`) but it loads A's 4 bytes as one vector, so it cannot tensorize an activation
read through an inlined transpose; this one reads them as scalars, as the AVX2 one does.

Importing this module does not import tvm; `register()` does, once per process (the
intrinsics must exist before MetaSchedule tunes or replays a schedule that names them).
"""

from __future__ import annotations

import numpy as np

LANES = 8  # int32 outputs per instruction (one 256-bit register)
PAIR = 2  # int16 products summed per lane
INTRINS = {"uint8": "graphopt_avx2_dot_8x2_u8", "int8": "graphopt_avx2_dot_8x2_s8"}
AVX2 = (LANES, PAIR, "int16")  # pack_weight's tile: output lanes, reduction group, weight dtype
VNNI = (16, 4, "int8")
VNNI_INTRIN = "graphopt_vnni_dot_16x4_u8"
_registered = False


def available(target) -> bool:
    """True for an llvm x86 target whose features include AVX2 (the intrinsic's instruction)."""
    try:
        from tvm.target import codegen

        if str(target.kind.name) != "llvm":
            return False
        triple = str(target.attrs.get("mtriple", "") or "")
        if triple and not triple.startswith(("x86_64", "i686")):
            return False
        return "avx2" in {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 - an unknown target simply does not get the kernels
        return False


def vnni_available(target) -> bool:
    """True for an llvm x86 target whose features include AVX-512 VNNI (`vpdpbusd` on 512 bits)."""
    try:
        from tvm.target import codegen

        return available(target) and "avx512vnni" in {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001
        return False


def register() -> None:
    """Register the two intrinsics (activation uint8 or int8) with TVM, once per process."""
    global _registered
    if _registered:
        return
    from .tvm_load import load_tvm

    tvm = load_tvm()
    from tvm.s_tir import TensorIntrin

    for dtype, name in INTRINS.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_intrin_funcs(tvm, dtype))
    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_INTRIN, *_vnni_intrin_funcs(tvm))
    _registered = True


def _desc(a_dtype: str, tile: tuple):
    """The description PrimFunc both intrinsics share: C[L] += A[G] . B[L, G] in int32, A `a_dtype`
    (strided: it may be read through an inlined transpose), B the tile's weight dtype."""
    from tvm.script import tirx as T

    lanes, group, b_dtype = tile

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        A = T.match_buffer(a, (group,), a_dtype, offset_factor=1, strides=[sa])
        B = T.match_buffer(b, (lanes, group), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _intrin_funcs(tvm, a_dtype: str):
    """(desc, impl) PrimFuncs for C[8] += A[2] . B[8, 2] with A `a_dtype`, B int16, C int32.

    A is read as two scalars (it may be strided: an inlined transpose of the activation), widened
    to int16 and packed into one int32, broadcast to 8 lanes and viewed as 16 int16: the pair
    (a0, a1) in every lane. B's 16 int16 are one aligned-free vector load."""
    from tvm.script import tirx as T

    desc = _desc(a_dtype, AVX2)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        A = T.match_buffer(a, (PAIR,), a_dtype, offset_factor=1, strides=[sa])
        B = T.match_buffer(b, (LANES, PAIR), "int16", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:PAIR], B[0:LANES, 0:PAIR])
            T.writes(C[0:LANES])
            pair = T.bitwise_or(
                T.bitwise_and(T.cast(A[0], "int32"), T.int32(0xFFFF)),
                T.shift_left(T.cast(A[1], "int32"), T.int32(16)),
            )
            C[T.ramp(T.int32(0), 1, LANES)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(pair, LANES), dtype="int16x16"),
                B.vload([0, 0], dtype="int16x16"),
                dtype="int32x8",
            )

    return desc, impl


def _vnni_intrin_funcs(tvm):
    """(desc, impl) PrimFuncs for C[16] += A[4] . B[16, 4] with A uint8, B int8, C int32 (vpdpbusd).
    A's 4 bytes are read as scalars (A may be strided), packed into one int32 and broadcast."""
    from tvm.script import tirx as T

    lanes, group, _ = VNNI

    desc = _desc("uint8", VNNI)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        A = T.match_buffer(a, (group,), "uint8", offset_factor=1, strides=[sa])
        B = T.match_buffer(b, (lanes, group), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            quad = T.bitwise_or(
                T.bitwise_or(T.cast(A[0], "int32"), T.shift_left(T.cast(A[1], "int32"), T.int32(8))),
                T.bitwise_or(T.shift_left(T.cast(A[2], "int32"), T.int32(16)),
                             T.shift_left(T.cast(A[3], "int32"), T.int32(24))),
            )
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(quad, lanes), dtype="int8x64"),  # LLVM 17+: <64 x i8> operands
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return desc, impl


def pack_weight(w_kn: np.ndarray, tile: tuple = AVX2) -> np.ndarray:
    """Integer weight [K, N] -> [ceil(N/L), ceil(K/G), L, G] of the tile's dtype (zero padded), Bp[j//L, k//G, j%L, k%G] = W[k, j].

    tile = (L, G, dtype): AVX2 (8, 2, int16; any values within int16) or VNNI (16, 4, int8; values within int8)."""
    lanes, group, dtype = tile
    k, n = w_kn.shape
    kp, np_ = -(-k // group) * group, -(-n // lanes) * lanes
    w = np.zeros((kp, np_), dtype)
    w[:k, :n] = w_kn
    return np.ascontiguousarray(w.reshape(kp // group, group, np_ // lanes, lanes).transpose(2, 0, 3, 1))


def packed_matmul_te(a, bp):
    """TE: A [..., Kp] (uint8/int8) x Bp [Np/L, Kp/G, L, G] (pack_weight's) -> C [..., Np] int32.

    Leading dims of A stay (no reshape around the kernel), so the elementwise epilogue that
    follows (zero-point correction, scale, bias, activation, requantize) fuses into its PrimFunc.
    """
    from tvm import te

    *lead, kp = a.shape
    nb, lanes, group = bp.shape[0], int(bp.shape[2]), int(bp.shape[3])
    k = te.reduce_axis((0, kp), name="k")
    return te.compute(
        (*lead, nb * lanes),
        lambda *idx: te.sum(
            a[(*idx[:-1], k)].astype("int32")
            * bp[idx[-1] // lanes, k // group, idx[-1] % lanes, k % group].astype("int32"),
            axis=k),
        name="packed_int8_matmul",
    )


def space(target):
    """MetaSchedule space for `target`: the default llvm rules with MultiLevelTilingWithIntrin for
    each intrinsic before the generic MultiLevelTiling, and RewriteTensorize among the postprocs
    (TVM's own x86 VNNI space, with these intrinsics). Blocks that do not match an intrinsic are
    scheduled as with the default space."""
    register()
    import tvm.s_tir.meta_schedule as ms

    reuse = ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")
    rules = []
    for r in ms.ScheduleRule.create("llvm"):
        if type(r).__name__ == "MultiLevelTiling":
            names = [*INTRINS.values(), *([VNNI_INTRIN] if vnni_available(target) else [])]
            rules += [ms.schedule_rule.MultiLevelTilingWithIntrin(name, "SSRSRS", max_innermost_factor=64,
                                                                  reuse_write=reuse) for name in names]
        rules.append(r)
    posts = list(ms.Postproc.create("llvm"))
    at = next(i for i, p in enumerate(posts) if type(p).__name__ == "RewriteReductionBlock") + 1
    posts.insert(at, ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    posts.append(_parallel_postproc(ms)())
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=posts, mutator_probs="llvm")


_PARALLEL_POSTPROC = None


def _parallel_postproc(ms):
    """A postproc that rejects a schedule whose packed int8 matmul runs on one thread (on a
    target with several cores), or sits inside a vectorized loop. MetaSchedule parallelizes only
    the outer tile loops, and at a handful of trials its search often keeps outer tiles of 1 (seen
    on MiniLM: every int8 matmul single-threaded); a vectorized loop around the intrinsic fails
    to build ("Cannot broadcast lanes=16 to 48"). Rejected samples are redrawn, not measured."""
    global _PARALLEL_POSTPROC
    if _PARALLEL_POSTPROC is not None:
        return _PARALLEL_POSTPROC
    from tvm.ir.utils import derived_object
    from tvm.tirx import ForKind

    @derived_object
    class RequireParallelPackedInt8(ms.postproc.PyPostproc):
        def __init__(self, cores: int = 0) -> None:
            super().__init__()
            self.cores = cores

        def _initialize_with_tune_context(self, context) -> None:
            cores = context.target.attrs.get("num-cores", 1) if context.target is not None else 1
            self.cores = max(1, int(cores))

        def apply(self, sch) -> bool:
            for block in _packed_blocks(sch):
                width = 1
                for loop in sch.get_loops(block):
                    node = sch.get(loop)
                    if node.kind == ForKind.PARALLEL:
                        width *= int(node.extent)
                    elif node.kind == ForKind.VECTORIZED:  # around the intrinsic: fails to build
                        return False
                if width < min(self.cores, 2):
                    return False
            return True

        def clone(self):
            return RequireParallelPackedInt8(self.cores)

    _PARALLEL_POSTPROC = RequireParallelPackedInt8
    return _PARALLEL_POSTPROC


def has_packed_matmul(mod) -> bool:
    """True for a task's kernel (a one-function IRModule) that holds the packed int8 matmul."""
    from tvm import s_tir

    return bool(_packed_blocks(s_tir.Schedule(mod)))


def _packed_blocks(sch) -> list:
    """The block RV of the packed int8 matmul's reduction in a task's schedule (at the stage the
    postprocs leave it: blockized and decomposed, or not), or [] for other tasks."""
    for name in ("packed_int8_matmul_o_update", "packed_int8_matmul_o", "packed_int8_matmul_update",
                 "packed_int8_matmul"):
        try:
            return [sch.get_sblock(name)]
        except Exception:  # noqa: BLE001 - not in this task (or not at this stage)
            continue
    return []

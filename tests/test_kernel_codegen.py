"""The Triton kernels compile for a real GPU target (sm_90) even on a machine without a GPU.

The interpreter (used by the other kernel tests on CPU) accepts code that the Triton compiler
rejects, so every kernel branch is compiled here down to a cubin with Triton's own ``ptxas``.
The compile runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter the kernels
are plain Python functions).
"""

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mskd_fast.kernels import graph, mbd, relation

    TARGET = GPUTarget("cuda", 90, 32)


    def build(kernel, signature, constexprs, num_warps):
        sig = dict(signature, **{name: "constexpr" for name in constexprs})
        consts = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=TARGET,
                                  options={"num_warps": num_warps})
        assert compiled.asm["cubin"], kernel.fn.__name__
        print("compiled", kernel.fn.__name__, constexprs)


    ptr = lambda t: "*" + t
    mbd_sig = dict(s_ptr=ptr("bf16"), t_ptr=ptr("fp32"), y_ptr=ptr("u8"), g_ptr=ptr("bf16"), out_ptr=ptr("fp32"),
                   B="i32", C="i32", stride_s="i32", stride_t="i32", stride_y="i32", stride_g="i32",
                   temperature="fp32", out_scale="fp32", grad_scale="fp32", omega="fp32", gamma_pos="fp32",
                   gamma_neg="fp32")
    for b, c in [(128, 80), (2, 20000)]:
        rows, block_c, single, warps = mbd._launch_config(b, c)
        build(mbd._mbd_fwd_kernel, mbd_sig, dict(WEIGHT_GRAD=True, DIVERGENCE=True, PER_ROW=False, COMPUTE_GRAD=True,
                                                 ROWS=rows, BLOCK_C=block_c, SINGLE=single), warps)
    build(mbd._mbd_fwd_kernel, mbd_sig, dict(WEIGHT_GRAD=False, DIVERGENCE=False, PER_ROW=True, COMPUTE_GRAD=False,
                                             ROWS=2, BLOCK_C=1024, SINGLE=True), 8)

    b, s, c = 128, 4, 80
    sp, block_c = relation._image_blocks(s, c)
    bj, block_cb = relation._batch_blocks(b, c)
    build(relation._distances_kernel,
          dict(r_ptr=ptr("bf16"), o_ptr=ptr("fp32"), dpr_ptr=ptr("fp32"), dpo_ptr=ptr("fp32"), dbr_ptr=ptr("fp32"),
               dbo_ptr=ptr("fp32"), mean_ptr=ptr("fp32"), part_ptr=ptr("fp32"), B="i32", S="i32", C="i32",
               r_sb="i32", r_ss="i32", o_sb="i32", o_ss="i32", n_tiles="i32"),
          dict(SP=sp, BLOCK_C=block_c, BJ=bj, BLOCK_CB=block_cb), 8)
    for has_p, has_b in [(True, True), (False, False)]:
        build(relation._finalize_kernel,
              dict(dpr_ptr=ptr("fp32"), dpo_ptr=ptr("fp32"), dbr_ptr=ptr("fp32"), dbo_ptr=ptr("fp32"),
                   part_ptr=ptr("fp32"), loss_ptr=ptr("bf16"), coef_ptr=ptr("fp32"), B="i32", S="i32",
                   n_parts="i32", delta="fp32"),
              dict(HAS_P=has_p, HAS_B=has_b, BLOCK=1024), 4)
    build(relation._backward_kernel,
          dict(grad_ptr=ptr("fp32"), r_ptr=ptr("bf16"), dr_ptr=ptr("bf16"), dpr_ptr=ptr("fp32"), dpo_ptr=ptr("fp32"),
               dbr_ptr=ptr("fp32"), dbo_ptr=ptr("fp32"), mean_ptr=ptr("fp32"), coef_ptr=ptr("fp32"), B="i32",
               S="i32", C="i32", r_sb="i32", r_ss="i32", d_sb="i32", d_ss="i32", delta="fp32",
               inv_count_p="fp32", inv_count_b="fp32"),
          dict(HAS_P=True, HAS_B=True, SP=sp, BLOCK_C=block_c, BK=16), 8)

    build(graph._delta_kernel,
          dict(o_ptr=ptr("bf16"), q_ptr=ptr("fp32"), y_ptr=ptr("u8"), delta_ptr=ptr("fp32"), count_ptr=ptr("i32"),
               B="i32", S="i32", C="i32", o_sb="i32", o_ss="i32", q_sb="i32", y_sb="i32"),
          dict(COUNT=True, BLOCK=1024), 4)
    for mode in (0, 1, 2):
        build(graph._sign_kernel,
              dict(order_ptr=ptr("i64"), u_ptr=ptr("i8"), k_ptr=ptr("i64"), count_ptr=ptr("i32"), k_value="i32",
                   n_counts="i32", S="i32", N="i32"),
              dict(K_MODE=mode, BLOCK=1024), 4)
    build(graph._graph_kernel,
          dict(o_ptr=ptr("bf16"), u_ptr=ptr("i8"), z_ptr=ptr("bf16"), S="i32", C="i32", o_sb="i32", o_ss="i32",
               layers="i32"),
          dict(SP=16, BLOCK_C=16), 8)
    """
)


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton build has no NVIDIA backend to compile for")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("compiled") == 12, proc.stdout

"""Minimal reproducer: two chained tensor-core dots whose first K block is wider than the second's N.

    S = Q K^T   (BLOCK_M x BLOCK_N, summed over BLOCK_DQK)
    O = S V     (BLOCK_M x BLOCK_DV, summed over BLOCK_N), S cast to the input dtype

This is the shape of attention's inner loop without the softmax. On an H200 with
Triton 3.6.0, the fused attention kernel gave wrong outputs for 16-bit inputs with
Dqk=40, Dv=24 (BLOCK_DQK=64 > BLOCK_DV=32) and right ones for every other pair
(benchmarks/results/2026-11-30-h200/README.md); perceiver_kernels launches with
equal blocks on tensor cores since (triton/tiling.head_dim_blocks). On the same
H200 and Triton this kernel computes right (benchmarks/results/2026-12-01-h200-run1,
repro.log) while the op's own kernels launched without the workaround still go
wrong (--full-kernel, run2's repro-kernels.log): the bug needs more of the attention
kernel than two chained dots, so this is not yet a reproducer to report upstream.
Run it on a GPU to see what an installed Triton does:

    python -m tests.repro_chained_dots        # exit status 1 if any case is wrong
    python -m tests.repro_chained_dots --full-kernel   # the op's kernels without the workaround

Head dims that are not multiples of 16 are masked as in the attention kernel, which
changes the layouts Triton picks; the cases pair each with its equal-block control.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def chained_dots_kernel(Q, K, V, OUT, num_rows, num_keys, head_dim_qk, head_dim_v,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + rows[:, None] * head_dim_qk + dqk[None, :],
                mask=(rows[:, None] < num_rows) & (dqk[None, :] < head_dim_qk), other=0.0)
    k_t = tl.load(K + keys[None, :] * head_dim_qk + dqk[:, None],
                  mask=(keys[None, :] < num_keys) & (dqk[:, None] < head_dim_qk), other=0.0)
    v = tl.load(V + keys[:, None] * head_dim_v + dv[None, :],
                mask=(keys[:, None] < num_keys) & (dv[None, :] < head_dim_v), other=0.0)
    s = tl.dot(q, k_t)
    out = tl.dot(s.to(v.dtype), v)
    tl.store(OUT + rows[:, None] * head_dim_v + dv[None, :], out,
             mask=(rows[:, None] < num_rows) & (dv[None, :] < head_dim_v))


def run_case(head_dim_qk: int, head_dim_v: int, block_dv: int, dtype: torch.dtype, device: str) -> float:
    """Relative max error of the kernel against float64 for one (Dqk, Dv, BLOCK_DV)."""
    generator = torch.Generator().manual_seed(0)
    rows = keys = 64
    # Scaled so that S stays well inside the 16-bit range.
    q = (torch.randn(rows, head_dim_qk, generator=generator) / head_dim_qk**0.5).to(device, dtype)
    k = torch.randn(keys, head_dim_qk, generator=generator).to(device, dtype)
    v = torch.randn(keys, head_dim_v, generator=generator).to(device, dtype)
    out = torch.full((rows, head_dim_v), float("nan"), dtype=torch.float32, device=device)
    block_dqk = max(16, triton.next_power_of_2(head_dim_qk))
    chained_dots_kernel[(1,)](q, k, v, out, rows, keys, head_dim_qk, head_dim_v,
                              BLOCK_M=64, BLOCK_N=64, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv)
    s = (q.double() @ k.double().T).to(dtype).double()  # the kernel rounds S to the input dtype too
    truth = s @ v.double()
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


CASES = ((40, 24), (40, 40), (24, 24), (64, 32), (64, 64))


def full_kernel_errors(dtype: torch.dtype, device: str) -> dict[str, float]:
    """The op's own Triton kernels launched without the workaround (BLOCK_DV = 32 for
    Dv = 24 beside BLOCK_DQK = 64), on the first GPU run's failing case (B2 H3, 70
    queries over 1,100 keys, key padding mask, residual): relative max errors of out,
    dq, dk, dv against float64. Run it in a process of its own: the bug came with
    illegal memory accesses, which leave the process's CUDA context unusable."""
    import perceiver_kernels as pk
    from perceiver_kernels.triton import tiling

    def unwidened(problem):
        return (max(16, triton.next_power_of_2(problem.head_dim_qk)),
                max(16, triton.next_power_of_2(problem.head_dim_v)))

    tiling.head_dim_blocks = unwidened
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    q, k, v, residual = randn(2, 3, 70, 40), randn(2, 3, 1100, 40), randn(2, 3, 1100, 24), randn(2, 3, 70, 24)
    mask = (torch.rand(2, 1100, generator=generator) < 0.3).to(device)
    dout = randn(2, 3, 70, 24)
    errors = {}
    for upcast in (False, True):
        leaves = [x.detach().double().requires_grad_() if upcast else x.detach().requires_grad_() for x in (q, k, v)]
        if upcast:
            out = pk.reference_attention(*leaves, key_padding_mask=mask, residual=residual.double())
        else:
            out = pk.cross_attention(*leaves, key_padding_mask=mask, residual=residual, backend="triton")
        results = [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]
        if not upcast:
            ours = results
            continue
        for name, mine, truth in zip(("out", "dq", "dk", "dv"), ours, results):
            errors[name] = ((mine.double() - truth).abs().max() / truth.abs().max()).item()
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.repro_chained_dots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="relative error above which a case is wrong (the bug gave 1.8; rounding gives <1e-2)")
    parser.add_argument("--full-kernel", action="store_true",
                        help="run the op's own kernels without the workaround instead (full_kernel_errors)")
    args = parser.parse_args(argv)
    wrong = 0
    print(f"triton {triton.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else args.device}")
    if args.full_kernel:
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            errors = full_kernel_errors(dtype, args.device)
            verdict = "ok" if max(errors.values()) <= args.tolerance else "WRONG"
            wrong += verdict == "WRONG"
            print(f"{str(dtype)[6:]:8} full kernels, Dqk=40 Dv=24, BLOCK_DQK=64 BLOCK_DV=32: "
                  + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()) + f" {verdict}")
        return 1 if wrong else 0
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for head_dim_qk, head_dim_v in CASES:
            block_dv = max(16, triton.next_power_of_2(head_dim_v))
            error = run_case(head_dim_qk, head_dim_v, block_dv, dtype, args.device)
            verdict = "ok" if error <= args.tolerance else "WRONG"
            wrong += verdict == "WRONG"
            print(f"{str(dtype)[6:]:8} Dqk={head_dim_qk:3} Dv={head_dim_v:3} BLOCK_DV={block_dv:3}: "
                  f"rel. error {error:.1e} {verdict}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton kernels of the SE-MoE testbed (each module: data flow, @triton.jit kernels, host wrapper,
autograd + torch.library.custom_op; torch references in :mod:`kernels.reference`).

Entry points for the reference's ``backend="triton"`` switch:
  :func:`kernels.gating.gating`        logits_TE -> weights_TK, expert_ids_TK, probs_TE, counts_E, stats
  :func:`kernels.moe_ffn.moe_ffn`      (x_TD, expert_ids_TK, weights_TK, w1_EDF, w2_EFD[, w3_EDF]) -> y_TD
  :func:`kernels.permute.build_permutation`, :func:`~kernels.permute.permute`, :func:`~kernels.permute.unpermute`
  :func:`kernels.grouped_gemm.grouped_gemm`
All fall back to the torch references when Triton cannot run (CPU without TRITON_INTERPRET=1).
"""

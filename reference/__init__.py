"""The real SE-MoE system in PyTorch: one code path for 1 CPU process, gloo ranks and NCCL GPUs."""

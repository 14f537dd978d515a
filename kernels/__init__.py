"""kernels package of the SE-MoE testbed."""

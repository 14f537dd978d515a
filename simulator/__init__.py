"""simulator package of the SE-MoE testbed."""

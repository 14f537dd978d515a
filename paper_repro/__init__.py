"""paper_repro package of the SE-MoE testbed."""

"""Communication primitives: uneven all-to-all (flat, HetuMoE hierarchical, SE-MoE rail) with start/wait
handles and autograd, and fused gradient buckets."""

"""MoE building blocks: routing (gates), dispatch/combine, experts, the MoE layer."""

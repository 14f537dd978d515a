"""The small offload configuration the validate_offload tests build rows for (imported by those test modules)."""

# E4 experts of P = 2 x 512 x 1024 parameters (gelu, no bias)
CFG = "paper-13.9b-scaled L2 D512 E4 k1 F1024 bf16 B2 S256 steps6"
P = 2 * 512 * 1024
RUN = {"date": "d", "commit": "c", "device": "NVIDIA H100 80GB HBM3"}

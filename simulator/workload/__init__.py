"""Workloads: processes that yield the phases the reference runs (training; inference later)."""

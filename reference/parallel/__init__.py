"""Distributed reference: process groups from a ParallelPlan, expert-parallel dispatch, launch helpers.

Nothing here runs at import time; every module works at world size 1 without an initialised
process group (all groups are no-op singletons)."""

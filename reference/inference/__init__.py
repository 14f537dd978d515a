"""Offloaded MoE inference: model store, ring memory, expert-aware cache, KV-cache generation.

* :mod:`.store`  flat checksummed store (dense file + one expert file per MoE block), pinned loading;
* :mod:`.build`  random-weight stores built block by block (models larger than any memory);
* :mod:`.model`  the dense part of ``MoEDecoder`` with a KV-cache forward;
* :mod:`.ring`   device expert pool, ring memory (compute, release, load), expert LRU cache;
* :mod:`.engine` memory plan from a GPU budget, the ring / expert / resident modes, generation;
* :mod:`.bench`  the H100 benchmark of issue 7 (``results/bench/infer.csv``).
"""

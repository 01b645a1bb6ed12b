"""Speculative decoding: the scheduler, the drafters (one file each), acceptance, the KV cache."""

"""Qwen3-Omni (Qwen/Qwen3-Omni-30B-A3B-Instruct) for mstar: any modality in, streaming text and speech out."""

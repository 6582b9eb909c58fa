"""BAGEL (ByteDance-Seed/BAGEL-7B-MoT) for mstar: understanding, text-to-image and editing."""

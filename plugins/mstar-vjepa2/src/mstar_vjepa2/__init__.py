"""V-JEPA 2 for mstar: video clips in, latents, masked-latent predictions, action-conditioned rollouts and CEM plans out."""

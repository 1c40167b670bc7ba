"""Adversarial Diffusion Distillation (ADD) and its latent variant (LADD): turning a model into a Turbo model."""

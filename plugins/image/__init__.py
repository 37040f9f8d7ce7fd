"""The image family: ``diffusers-image`` generation and ``clip-score`` scoring (whose tiny CLIP
the tiny diffusion model's text encoder reuses)."""

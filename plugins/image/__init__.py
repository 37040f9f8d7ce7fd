"""The image family: diffusers generation and CLIP scoring."""

"""Training-data exporters: preference pairs and best-of-n SFT sets."""

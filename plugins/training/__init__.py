"""Trainers: the reward model and the policies a job's rounds train (TRL)."""

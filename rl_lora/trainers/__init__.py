"""Trainers: thin wiring around TRL where TRL has the algorithm."""

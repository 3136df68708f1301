"""Simulation harness: pseudo-site partitioning and local Flower simulation."""

"""Flower ClientApp for hospital sites."""

"""Flower ServerApp and strategies."""

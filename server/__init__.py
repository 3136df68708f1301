"""Flower ServerApp and strategies (federated-training issue)."""

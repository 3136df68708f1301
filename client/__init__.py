"""Flower ClientApp for hospital sites (federated-training issue)."""

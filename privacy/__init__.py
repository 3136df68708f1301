"""Opacus DP-SGD wrapping, accounting and budgets. The only package that imports opacus."""

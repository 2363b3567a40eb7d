"""Adapter layers, base-model loading and injection."""

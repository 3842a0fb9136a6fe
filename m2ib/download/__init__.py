"""Downloaders for the real data sets (network access, manifests that pin the evaluated subset)."""

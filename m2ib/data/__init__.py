"""Data sets: the embedded generated benchmark and loaders for the real MS-CXR / Conceptual Captions
layouts, each registered by name (registry.py). Imports only m2ib.core."""

"""Data sets: the embedded generated benchmark and loaders for the real MS-CXR / Conceptual Captions layouts."""

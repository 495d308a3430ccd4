"""Training utilities for the Reactive Transformer (RxT)."""

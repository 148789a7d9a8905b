"""The small core every other part may import: seeded, device-independent randomness (``rng``), randomized
linear algebra (``linalg``), device names (``devices``) and the bytes a nest of tensors holds (``memory``).

Imports nothing else from fedgluon, and neither Flower nor Ray; ``compressors`` imports only this.
"""

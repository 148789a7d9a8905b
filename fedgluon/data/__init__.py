"""Datasets and federated partitions."""

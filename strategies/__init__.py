"""Flower server side (strategy, ServerApp, payload <-> record conversion); built in a later issue."""

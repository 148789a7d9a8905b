"""Compression operators, error feedback, payloads, validation and bit accounting.

Imports neither Flower nor Ray (DESIGN §1); conversion to Flower records lives in ``strategies``.
"""

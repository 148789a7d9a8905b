"""Flower server side: ``GluonStrategy`` (strategy.py), the ``ServerApp`` (server_app.py), and the conversion
between payloads/states and Flower records (records.py, columns.py, shared.py)."""

"""Learning tasks: the registry of tasks (``registry``), their models (``models``) and data loaders (``data``).
"""

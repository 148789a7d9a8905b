"""The experiment face: ``fedgluon run`` (``experiment``), sweeps (``sweep``), Ray clusters (``cluster``),
tuning on Ray Tune (``tuning``, ``tune_results``), plots (``plots``) and the command line (``cli``).
"""

"""What a run is: the experiment config's schema, loading and validation (``schema``), the run spec every
process builds its task and algorithm from (``spec``) and run directories (``run_dir``).
"""

"""The simulation around an algorithm, independent of Flower: the federation's round bookkeeping
(``federation``), the plain in-process loop (``driver``), fault plans (``faults``), checkpoints
(``checkpoint``) and the metrics each round records (``metrics``).
"""

"""What algorithms see of the clients: their objectives (stochastic gradients, one client or a stacked block;
``objective``, ``vectorised``), their committed state as one table (``table``, ``state_schema``) and the
blocks clients are grouped into (``blocks``).
"""

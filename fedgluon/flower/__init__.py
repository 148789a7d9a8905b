"""The Flower side of the clients and the transport: the ``ClientApp`` (``client_app``), the wire format
between client and server (``wire``), the three engines that drive the apps (``engines``), the deployment
helpers for SuperLink/SuperNodes (``deployment``) and the optional Flower-internals patch (``dispatch``).
"""

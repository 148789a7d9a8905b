"""The Flower server side: ``GluonStrategy`` (strategy.py), which validates and aggregates the replies of a
round and takes the server step, and the ``ServerApp`` that runs it (server_app.py). The wire format both
sides speak is ``fedgluon.flower.wire``."""

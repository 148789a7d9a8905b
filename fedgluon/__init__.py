"""fedgluon: communication-efficient federated training with layer-wise LMO optimizers.

The top-level package stays light (no Flower, no Ray); import submodules directly, e.g.
``from fedgluon.lmo.optim import Gluon`` or ``from fedgluon.lmo.geometry import Geometry``.
"""

__version__ = "0.1.0"

"""The math of the layer-wise LMO step: Newton–Schulz polar factors (``polar``), one class per norm
(``norms``), the per-layer geometry (``geometry``), radius schedules (``radius``), the server's step
(``step``), gradient estimators (``estimators``) and a ``torch.optim`` front-end (``optim``).

No Flower, no Ray, no client state.
"""

"""Flow stage: speech tokens -> mel (conformer encoder + CFM U-Net), batched across streams.

``flow.py`` (model + batched inference), ``encoder.py``, ``estimator.py``, ``cfm.py``, ``masks.py``.
"""

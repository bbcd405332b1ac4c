"""vLLM 0.26 backend for the CosyVoice2 LLM stage (unified ids, RAS logits processor, streamed text).

Only ``model.py``, ``plugin.py``, ``ras_processor.py`` and ``backend.py`` import vLLM (lazily where they
can); ``unified.py``, ``weights.py``, ``hf_config.py``, ``logits_math.py``, ``sampling.py`` and
``bistream_plan.py`` are plain torch/Python so the CPU tests cover them without vLLM.
"""

"""The target LLM: backends of the dump (`backend.py` contract; HF, vLLM), the one HF loader
(`loader.py`) and device/dtype rule (`device.py`) every stage uses, layer-id conventions, layer
capture, top-k and fingerprints."""

"""Target backends (HF, vLLM), layer-id conventions, layer capture, top-k and fingerprints."""

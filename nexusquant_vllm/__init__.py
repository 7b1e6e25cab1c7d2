"""nexusquant_vllm: E8-lattice quantized paged KV cache for vLLM."""

__version__ = "0.1.0"

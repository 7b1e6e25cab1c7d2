"""Everything that touches vLLM's internals or plugin APIs: the plugin entry point, the version shim (``compat.py``,
the only module that patches vLLM), the attention backend, the startup checks and the eviction connector.

The library packages (``codec``, ``kernels``, ``native``, ``attention``, ``eviction``, ``config``, ``dtypes``) never
import vLLM; outside this package only the command line (``cli.py``) and ``model_store``'s self-check use vLLM, and
only through its public ``LLM`` API. vLLM loads this package through the ``vllm.general_plugins`` entry point.
"""

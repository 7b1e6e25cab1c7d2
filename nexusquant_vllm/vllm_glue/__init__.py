"""Everything that imports vLLM: the plugin entry point, the version shim, the attention backend, startup checks.

Nothing outside this package imports it; vLLM loads it through the ``vllm.general_plugins`` entry point.
"""

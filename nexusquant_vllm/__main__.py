from nexusquant_vllm.cli import main

# The guard matters: vLLM's CPU workers are spawned, and spawn re-imports the main module as __mp_main__.
if __name__ == "__main__":
    raise SystemExit(main())

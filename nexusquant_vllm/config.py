"""The plugin's configuration: one typed, validated object, read once.

Where it comes from, in order of precedence:

1. ``additional_config={"nexusquant": {...}}`` of vLLM (``LLM(..., additional_config=...)`` or
   ``vllm serve --additional-config '{"nexusquant": {...}}'``);
2. the environment variables below, in the process that builds the engine config;
3. the defaults.

The glue resolves it once, when the engine config is built, and writes the result back into
``additional_config["nexusquant"]``, so every worker process reads the same values from vLLM's config. This module
and ``model_store`` are the only places in the package that touch ``os.environ``.

=========================  ===============================  ==========================================================
field                      environment variable             values
=========================  ===============================  ==========================================================
``attention``              ``NEXUSQUANT_ATTENTION``         ``auto`` (Triton on CUDA, native kernels on CPU, torch
                                                            elsewhere), ``torch``, ``native`` (CPU), ``triton`` (CUDA,
                                                            or the CPU under ``TRITON_INTERPRET=1``: tests only)
``protect_layers``         ``NEXUSQUANT_PROTECT_LAYERS``    protected layers: ``auto`` (the default: the first 2 and
                                                            last 2, none on a model that mixes sliding-window and
                                                            global layers, see :func:`parse_protect_layers`), ``N``
                                                            (first N and last N), ``none``, or indices ``0,1,29`` (one
                                                            comma at least: ``5,``)
``protect_format``         ``NEXUSQUANT_PROTECT_FORMAT``    what the protected layers store: an e8 dtype with more bits
                                                            than the run's (default ``e8-k4v4``: 68 instead of 256 B
                                                            per token-head at head_dim 64, measured as good as bf16 in
                                                            ``benchmarks/results/quality_capacity.md``) or ``auto``
                                                            (the model dtype, through vLLM's
                                                            ``kv_cache_dtype_skip_layers``: the earlier default)
``eviction``               ``NEXUSQUANT_EVICTION``          install the eviction connector with this server default
                                                            (a preset or a rate); empty: not installed
``bench_scalar``           ``NEXUSQUANT_BENCH_SCALAR``      ``1``: also serve the ``scalar-*`` baseline dtypes
                                                            (benchmarks only; read at plugin registration, since the
                                                            dtype names must exist before any config)
=========================  ===============================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

ATTENTION_CHOICES = ("auto", "torch", "native", "triton")
DEFAULT_PROTECTED = 2  # protect_layers "auto": the first and last 2 layers
ADDITIONAL_CONFIG_KEY = "nexusquant"
ENV_VARS = {
    "attention": "NEXUSQUANT_ATTENTION",
    "protect_layers": "NEXUSQUANT_PROTECT_LAYERS",
    "protect_format": "NEXUSQUANT_PROTECT_FORMAT",
    "eviction": "NEXUSQUANT_EVICTION",
    "bench_scalar": "NEXUSQUANT_BENCH_SCALAR",
}


@dataclass(frozen=True)
class NexusQuantConfig:
    """See the module docstring. Invalid values raise ``ValueError`` naming the field and its source."""

    attention: str = "auto"
    protect_layers: str = "auto"
    protect_format: str = "e8-k4v4"
    eviction: str = ""
    bench_scalar: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"nexusquant attention={self.attention!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
        if not isinstance(self.bench_scalar, bool):
            raise ValueError(f"nexusquant bench_scalar must be true or false, got {self.bench_scalar!r}")
        parse_protect_layers(self.protect_layers, num_layers=None)
        check_protect_format(self.protect_format)
        if self.eviction:
            from nexusquant_vllm.eviction import parse_rate

            parse_rate(self.eviction, ENV_VARS["eviction"])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NexusQuantConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, var in ENV_VARS.items():
            raw = environ.get(var, "").strip()
            if raw:
                values[name] = raw.lower() not in ("0", "false", "no") if name == "bench_scalar" else raw
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{e} (from the environment: {', '.join(ENV_VARS.values())})") from None

    def merged(self, overrides: Mapping[str, object] | None) -> NexusQuantConfig:
        """These values with ``overrides`` (``additional_config["nexusquant"]``) on top; unknown keys are errors."""
        overrides = dict(overrides or {})
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown additional_config.{ADDITIONAL_CONFIG_KEY} keys {unknown}; known: {sorted(known)}")
        overrides = {k: str(v) if k in ("protect_layers", "protect_format", "eviction") else v for k, v in overrides.items()}
        return NexusQuantConfig(**{**asdict(self), **overrides})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_protect_layers(spec: str, num_layers: int | None, mixed_windows: bool = False) -> list[int]:
    """Layer indices kept in ``protect_format`` for a ``protect_layers`` value (see the module docstring); with
    ``num_layers`` None only the syntax is checked.

    ``auto`` is ``2``, except on a model whose layers mix sliding-window and global attention (``mixed_windows``):
    vLLM gives every layer of such a model one page size, the largest, so 4 layers in a bigger format would enlarge
    every layer's pages (all of Gemma 3's to e8-k4v4's size: 3.94x instead of 6.24x at head_dim 256); there it
    protects none. A protection set explicitly is applied on any model."""
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "none" if mixed_windows else str(DEFAULT_PROTECTED)
    if spec in ("", "none", "0"):
        return []
    try:
        if "," in spec:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
            bad = [i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)]
            if bad:
                raise ValueError(f"layer indices {bad} out of range for a {num_layers}-layer model")
            return layers
        n = int(spec)
    except ValueError as e:
        raise ValueError(
            f"{ENV_VARS['protect_layers']}={spec!r}: expected 'none', a count N (first N and last N layers) or a "
            f"comma-separated list of layer indices ({e})"
        ) from None
    if n < 0:
        raise ValueError(f"{ENV_VARS['protect_layers']}={spec!r}: the count must be >= 0")
    if num_layers is None:
        return []
    n = min(n, num_layers // 2)
    return sorted(set(range(n)) | set(range(num_layers - n, num_layers)))


def check_protect_format(name: str) -> None:
    """``auto`` or a served e8/scalar dtype name."""
    from nexusquant_vllm.dtypes import E8_DTYPES, is_served

    if name != "auto" and not is_served(name):
        raise ValueError(
            f"{ENV_VARS['protect_format']}={name!r}: expected 'auto' (the model dtype) or one of {', '.join(E8_DTYPES)}"
        )


def default_vllm_cpu_kv_space(gib: int) -> None:
    """Set vLLM's ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on its CPU build) unless the user did, before vLLM is
    imported: its own default of 4 GiB is more than a small machine running several engines wants."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gib))


def triton_interpreter() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, Triton's own switch)."""
    return os.environ.get("TRITON_INTERPRET") == "1"

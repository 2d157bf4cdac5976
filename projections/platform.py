"""The platform fingerprint: what must match for replay to be bit-exact."""

from __future__ import annotations

import os
import platform as _platform


def configure_jax_determinism() -> None:
    """Set XLA flags that make GPU runs deterministic; call before JAX initialises.

    Without ``--xla_gpu_deterministic_ops=true`` two identical MLP runs on an H100 gave
    different digests (ARCHITECTURE.md, invariant 4). The flag is harmless on CPU.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()


def cpu_isa() -> str:
    """The widest SIMD extension the CPU offers (XLA's CPU code generation depends on it)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    for isa in ("avx512f", "avx2", "avx", "sse4_2"):
                        if isa in flags:
                            return isa
                    break
    except OSError:
        pass
    return _platform.machine() or "unknown"


def platform_fingerprint() -> tuple[tuple[str, str], ...]:
    """jax/jaxlib/optax versions, backend, device kind, CPU ISA and XLA flags, as pairs."""
    import jax
    import jaxlib
    import optax

    device = jax.devices()[0]
    pairs = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": str(device.device_kind),
        "cpu_isa": cpu_isa(),
        "machine": _platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": str(bool(jax.config.read("jax_enable_x64"))),
    }
    return tuple(sorted(pairs.items()))


def platform_differences(recorded: tuple[tuple[str, str], ...]) -> dict[str, tuple[str, str]]:
    """Keys whose recorded value differs from this process's: ``{key: (recorded, now)}``."""
    now = dict(platform_fingerprint())
    out = {}
    for key, value in recorded:
        if now.get(key) != value:
            out[key] = (value, now.get(key, ""))
    return out

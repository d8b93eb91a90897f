"""What llama.cpp needs from the machine it runs on: CPU flags, the weight-repacking decision, and its backends.

Two things make one llama-cpp-python install behave differently from CPU to CPU:

- **Weight repacking.** On load, llama.cpp moves some quantised weights into "extra buffer types"
  laid out for the CPU's matrix units.  On Intel CPUs with AMX (Sapphire Rapids and later) the
  AMX buffer type takes Q4_K weights, and its matmul crashes with SIGSEGV on the first decode
  (upstream: `ggml_backend_amx_mul_mat`, Q4_K_M).  The profile setting `repack` decides:
  "auto" turns repacking off exactly where the CPU reports AMX (option A; recorded in the README),
  "on" and "off" force it.  `repack_weights` is the whole decision, tested on recorded flag sets.
- **CPU backend variants.** The Makefile builds llama.cpp portably (GGML_NATIVE=OFF,
  GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON, see deploy/llama-portable.cmake): one CPU backend
  module per x86-64 level, of which ggml loads the best for this CPU.  ggml looks for them next to
  the executable and in the working directory, not next to libllama, so `load_backends` points it
  at llama_cpp/lib before the first model loads.  A native build has no modules; then it does nothing.

Nothing here imports llama_cpp at module import: doctor and the config read the decision alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPACK_CHOICES = ("auto", "on", "off")
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
LLAMA_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni", "avx512f", "avx512vbmi",
               "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
"""The /proc/cpuinfo flags ggml's x86 CPU variants are chosen by (and AMX, which decides repacking)."""

_lock = threading.Lock()
_backends_loaded = False


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text (empty when it lists none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def machine_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """This machine's CPU flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        return cpu_flags(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return frozenset()


def repack_weights(setting: str, flags: frozenset[str]) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types (see the module docstring)."""
    if setting not in REPACK_CHOICES:
        raise ValueError(f"repack must be one of {', '.join(REPACK_CHOICES)}, not {setting!r}")
    if setting == "auto":
        return not flags & AMX_FLAGS
    return setting == "on"


def repack_reason(setting: str, flags: frozenset[str]) -> str:
    """One line for logs and doctor: what was decided and why."""
    amx = sorted(flags & AMX_FLAGS)
    decided = "on" if repack_weights(setting, flags) else "off"
    if setting != "auto":
        return f"weight repacking {decided} (repack = {setting!r})"
    if amx:
        return (f"weight repacking off: the CPU reports {' '.join(amx)}, and llama.cpp's AMX repacking "
                f"crashes on Q4_K models (repack = 'auto'; 'on' forces it)")
    return "weight repacking on: no AMX on this CPU (repack = 'auto')"


def library_dir() -> Path:
    """Where llama-cpp-python keeps libllama and, in a portable build, the CPU backend modules."""
    import llama_cpp
    return Path(llama_cpp.__file__).parent / "lib"


def cpu_variants(lib: Path | None = None) -> list[str]:
    """The CPU backend variants a portable build ships (empty for a native build)."""
    lib = lib or library_dir()
    return sorted(path.name.removeprefix("libggml-cpu-").removesuffix(".so")
                  for path in lib.glob("libggml-cpu-*.so"))


def load_backends() -> None:
    """Load the best CPU backend module of a portable build, once per process, before any model."""
    global _backends_loaded
    with _lock:
        if _backends_loaded:
            return
        lib = library_dir()
        if cpu_variants(lib):
            import llama_cpp  # noqa: F401  loads libllama, and with it the libggml its backends must join
            # The wheel holds copies, not symlinks, of libggml.so and libggml.so.0, and each copy keeps
            # its own backend registry: load into the one libllama links (its NEEDED soname).
            libggml = ctypes.CDLL(str(lib / "libggml.so.0"))
            libggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            libggml.ggml_backend_load_all_from_path(str(lib).encode())
        _backends_loaded = True


@contextlib.contextmanager
def model_params(repack: bool) -> Iterator[None]:
    """While open, models llama-cpp-python loads get `use_extra_bufts = repack`.

    `Llama.__init__` reads `llama_model_default_params()` and loads the model at once, and
    version 0.3.36 has no argument for this field, so the default itself is wrapped.
    """
    import llama_cpp.llama_cpp as bindings
    load_backends()
    with _lock:
        original = bindings.llama_model_default_params

        def defaults() -> Any:
            params = original()
            params.use_extra_bufts = repack
            return params

        bindings.llama_model_default_params = defaults
        try:
            yield
        finally:
            bindings.llama_model_default_params = original

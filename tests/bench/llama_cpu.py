"""llama.cpp on this CPU: weight repacking on and off, and the portable build against a native one.

Each measurement runs in its own child process (a crash, such as AMX repacking's SIGSEGV, is
recorded as such), loads the bundled Gemma 3 270M, and times greedy decoding of a fixed prompt.
The configurations alternate round by round, so the ratios compare like with like.  The native
build is compiled once (about 5 minutes) into .venv/bench-llama-native with GGML_NATIVE=ON, the
pip default, and imported from there by its children.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from tests.bench.stats import median
from tests.harness import ROOT

NATIVE_DIR = ROOT / ".venv" / "bench-llama-native"
PROMPT = "User: Tell me about the history of Paris.\nAssistant:"
TOKENS = 96

CHILD = r"""
import json, os, sys, time
from voxpipe.stages.llm import llama_runtime
from voxpipe.stages.llm.providers.local import bundled_model_path
from llama_cpp import Llama
repack = sys.argv[1] == "on"
with llama_runtime.model_params(repack=repack):
    llama = Llama(model_path=bundled_model_path(), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
variant = next((line.rsplit("libggml-cpu-", 1)[1].removesuffix(".so\n") for line in open("/proc/self/maps")
                if "libggml-cpu-" in line), "built in")
rates = []
for _ in range(3):
    llama.reset()
    started = time.perf_counter()
    out = llama.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0.0)
    rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - started))
print(json.dumps({"tokens_per_s": sorted(rates)[1], "variant": variant}))
"""


def ensure_native_build() -> Path | None:
    """The -march=native build beside the portable one, compiled once; None if it cannot be built."""
    if (NATIVE_DIR / "llama_cpp").is_dir():
        return NATIVE_DIR
    print("bench: compiling a native llama.cpp for comparison (about 5 minutes, once) ...", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir",
                             "--target", str(NATIVE_DIR), f"llama-cpp-python=={version('llama_cpp_python')}"],
                            env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}, capture_output=True, text=True)
    if result.returncode:
        print(f"bench: the native build failed: {result.stderr[-500:]}", file=sys.stderr)
        return None
    return NATIVE_DIR


def measure(repack: str, build_dir: Path | None) -> dict[str, object]:
    """One child's decode rate, or how it died."""
    path = os.pathsep.join(str(p) for p in (build_dir, ROOT) if p)
    result = subprocess.run([sys.executable, "-c", CHILD, repack, PROMPT, str(TOKENS)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=600)
    if result.returncode < 0:
        return {"crash": signal.Signals(-result.returncode).name}
    if result.returncode:
        return {"crash": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> str:
    from voxpipe.stages.llm.llama_runtime import AMX_FLAGS, machine_flags, repack_reason
    flags = machine_flags()
    native = ensure_native_build()
    builds = {"portable (make install)": None, **({"native (-march=native)": native} if native else {})}
    configs = [(build, repack) for build in builds for repack in ("off", "on")]
    rounds = 1 if quick else 3
    samples: dict[tuple[str, str], list[dict[str, object]]] = {config: [] for config in configs}
    for _ in range(rounds):
        for build, repack in configs:
            samples[(build, repack)].append(measure(repack, builds[build]))
    lines = [f"Bundled Gemma 3 270M Q4_K_M, {os.cpu_count()} threads, greedy, {TOKENS} new tokens after a "
             f"short prompt; each cell is the median of {rounds} child processes (each the median of 3 "
             f"generations), the configurations interleaved. CPU AMX flags: "
             f"{' '.join(sorted(flags & AMX_FLAGS)) or 'none'}; `repack = \"auto\"` here: "
             f"{repack_reason('auto', flags)}.", "",
             "| build | CPU backend loaded | repack off: tokens/s | repack on: tokens/s |", "|---|---|---|---|"]
    rates: dict[tuple[str, str], float] = {}
    for build in builds:
        cells, variant = [], "?"
        for repack in ("off", "on"):
            runs = samples[(build, repack)]
            crashes = [str(r["crash"]) for r in runs if "crash" in r]
            good = [float(r["tokens_per_s"]) for r in runs if "tokens_per_s" in r]  # type: ignore[arg-type]
            variant = next((str(r["variant"]) for r in runs if "variant" in r), variant)
            if good:
                rates[(build, repack)] = median(good)
            cells.append(f"{median(good):.1f}" if good else "")
            if crashes:
                cells[-1] += f" **crashed: {', '.join(sorted(set(crashes)))}** ×{len(crashes)}"
        lines.append(f"| {build} | {variant} | {cells[0]} | {cells[1]} |")
    lines.append("")
    portable, native_key = ("portable (make install)", "off"), ("native (-march=native)", "off")
    if portable in rates and native_key in rates:
        lines.append(f"**Portable / native, repack off: {rates[portable] / rates[native_key]:.2f}×.**")
    repacked = ("portable (make install)", "on")
    if repacked in rates and portable in rates:
        lines.append(f"**Portable, repack on / off: {rates[repacked] / rates[portable]:.2f}×.**")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))

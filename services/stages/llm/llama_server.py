"""llama-cpp-python's OpenAI-compatible server, made safe for this CPU.

    python -m voxpipe.stages.llm.llama_server [--repack auto|on|off] --model M.gguf [llama_cpp.server options]

Runs `llama_cpp.server` unchanged, after the two things `llama_runtime` does for the in-process
model: load the best CPU backend of a portable build, and turn weight repacking off on CPUs with
AMX (or as --repack says).  Plain `python -m llama_cpp.server` crashes with SIGSEGV on the first
request on Intel AMX CPUs with Q4_K models such as the bundled Gemma.
"""

from __future__ import annotations

import argparse
import sys

from . import llama_runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repack", choices=llama_runtime.REPACK_CHOICES, default="auto")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    flags = llama_runtime.machine_flags()
    print(f"voxpipe llama_server: {llama_runtime.repack_reason(ours.repack, flags)}", file=sys.stderr, flush=True)
    from llama_cpp.server.__main__ import main as serve
    sys.argv = [sys.argv[0], *rest]
    with llama_runtime.model_params(repack=llama_runtime.repack_weights(ours.repack, flags)):
        serve()


if __name__ == "__main__":
    main()

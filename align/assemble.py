"""``align assemble RECIPE``: vision encoder + mlp2x_gelu projector + causal LM -> a standard Llava folder.

Run: ``align assemble recipes/tiny/assemble_siglip_qwen2.yaml [key=value ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from align.config import RecipeError


@dataclass
class VisionSpec:
    source: Literal["hf", "open_clip"]
    name_or_path: str  # HF id or folder; open_clip model name (e.g. ViT-L-14-336) or "local-dir:FOLDER"
    pretrained: str | None = None  # open_clip only: pretrained tag (e.g. openai) or a weights file
    feature_layer: int = -2  # hidden-state index fed to the projector (LLaVA-1.5: penultimate)
    select_strategy: Literal["default", "full"] | None = None  # None: CLIP drops CLS ("default"), SigLIP "full"

    def check(self) -> None:
        if self.source == "hf" and self.pretrained is not None:
            raise RecipeError.at("pretrained", "only open_clip sources take 'pretrained'; HF towers use name_or_path")


@dataclass
class LLMSpec:
    name_or_path: str  # any HF causal LM id or folder (DeepSeek-R1-Distill-Qwen/-Llama, ...)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class ProjectorSpec:
    type: Literal["mlp2x_gelu"] = "mlp2x_gelu"  # LLaVA-1.5: Linear -> GELU -> Linear


@dataclass
class AssembleRecipe:
    kind: Literal["assemble"]
    vision: VisionSpec
    llm: LLMSpec
    output_dir: str
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    image_token: str = "<image>"
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"

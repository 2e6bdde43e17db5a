"""Backbone registry: one adapter per model family, looked up by name from plain YAML values."""

from __future__ import annotations

from memefx.models.backbones.base import Backbone, BackboneOutput, ImageEncoder
from memefx.models.backbones.caption_pair import CaptionPairBackbone
from memefx.models.backbones.single_stream import SingleStreamBackbone
from memefx.models.backbones.vilio import VilioOscarBackbone, VilioUniterBackbone, VilioVisualBertBackbone
from memefx.models.backbones.visualbert import VisualBertBackbone

BACKBONES: dict[str, type[Backbone]] = {"visualbert": VisualBertBackbone, "caption_pair": CaptionPairBackbone,
                                     "uniter": SingleStreamBackbone, "oscar": SingleStreamBackbone,
                                     # the paper's own models, as Vilio computes them (checkpoints load strictly)
                                     "vilio_uniter": VilioUniterBackbone, "vilio_oscar": VilioOscarBackbone,
                                     "vilio_visualbert": VilioVisualBertBackbone}


def register(name: str, cls: type[Backbone]) -> None:
    """Make a new family available to ``MemeClassifier(backbone=name)``."""
    BACKBONES[name] = cls


def build_backbone(name: str, **kwargs) -> Backbone:
    """Instantiate a registered backbone; unknown names list the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    if name == "oscar":
        kwargs.setdefault("use_tags", True)
    return BACKBONES[name](**kwargs)


__all__ = ["BACKBONES", "Backbone", "BackboneOutput", "CaptionPairBackbone", "SingleStreamBackbone", "ImageEncoder", "VisualBertBackbone", "build_backbone", "register"]

"""The ResNet family, its registry, and the ways weights get into it."""

from rsscene.models.resnet import (
    ARCHS,
    MODELS,
    VARIANTS,
    BasicBlock,
    Bottleneck,
    ResNet,
    create_model,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)
from rsscene.models.weights import (
    adapt_first_conv,
    clean_state_dict,
    from_weights,
    load_backbone,
    load_model,
    load_pretrained,
    model_from_checkpoint,
)

__all__ = [
    "ARCHS",
    "MODELS",
    "VARIANTS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "adapt_first_conv",
    "clean_state_dict",
    "create_model",
    "from_weights",
    "load_backbone",
    "load_model",
    "load_pretrained",
    "model_from_checkpoint",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

"""The ResNet family and its registry."""

from rsscene.models.resnet import (
    ARCHS,
    MODELS,
    VARIANTS,
    BasicBlock,
    Bottleneck,
    ResNet,
    clean_state_dict,
    create_model,
    from_weights,
    load_backbone,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

__all__ = [
    "ARCHS",
    "MODELS",
    "VARIANTS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "clean_state_dict",
    "create_model",
    "from_weights",
    "load_backbone",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

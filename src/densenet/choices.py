"""The names the command line offers (precisions, engines, test-time views, formats, recipes),
without torch, so that every ``--help`` lists them at once. The modules that implement them take
their names from here, or (a table of implementations) are checked against them in the tests."""

from __future__ import annotations

__all__ = [
    "AMP_MODES",
    "BACKENDS",
    "BENCH_ENGINES",
    "EXPORT_FORMATS",
    "PRECISIONS",
    "RECIPES",
    "VECTOR_DTYPES",
    "VIEWS",
]

PRECISIONS = ("float32", "bfloat16", "float16")  # densenet.infer.precision.DTYPES
BACKENDS = ("eager", "inductor", "triton", "onednn", "openvino")  # densenet.optimize's engines
VIEWS = {"hflip": 2, "five-crop": 5, "ten-crop": 10}  # test-time augmentation: views per image
VECTOR_DTYPES = ("float32", "float16")  # how bulk stores embedding vectors
AMP_MODES = ("auto", "none", "bf16", "fp16")  # training's autocast
EXPORT_FORMATS = ("onnx", "torchscript", "exported", "openvino")  # densenet.tasks.export.EXPORTERS
RECIPES = (  # densenet.train.config.RECIPES
    "cifar10",
    "cifar10+",
    "cifar100",
    "cifar100+",
    "svhn",
    "imagenet",
    "rdnet",
    "finetune",
)
BENCH_ENGINES = (  # densenet.tasks.bench.ENGINES
    "torchvision eager",
    "torchvision eager CL",
    "torchvision compile CL",
    "timm eager",
    "timm eager CL",
    "onnxruntime",
    "openvino f32",
    "openvino default",
    "densenet.optimize",
    "densenet.optimize onednn",
    "densenet openvino",
    "densenet openvino auto",
    "densenet.optimize compile",
    "densenet.optimize triton",
    "densenet.optimize CUDA graph",
    "densenet.optimize triton CUDA graph",
    "densenet int8",
    "densenet int8 fx",
    "onnxruntime int8",
    "openvino int8",
)

"""The example model of the pipeline: a small CNN on Fashion-MNIST.

`data` reads the dataset from the Debian package; `model` runs the exported ONNX with
numpy + onnxruntime only (what the demo and the fast tests need); `train` holds the
replaceable training code (PyTorch, the `train` extra) and the ONNX export.
"""

from triton_al.serving.onnx_model import TritonPythonModel  # noqa: F401 - the logic lives in triton_al

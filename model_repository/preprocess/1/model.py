from triton_al.serving.preprocess import TritonPythonModel  # noqa: F401 - the logic lives in triton_al

"""The uploader's gRPC admin API (generated code in v1/, from proto/triton_al/admin/v1)."""

"""Expose an inner tensor of an ONNX model as one more graph output (e.g. an embedding).

The active_learning step can store a model's embedding with each flagged item (attach
`--embedding-output`), which the uploader uses for near-duplicates and diverse selection. A
model exported without one usually still computes it: the activations of the layer before
the classifier. This adds that tensor as an output, under a new name, through an `Identity`
node, leaving every other node and output as it was (so the model's answers do not change):

    python -m triton_al.example.expose_output model.onnx --tensor h --name embedding

then declare the output in the model's config.pbtxt (FP32, dims [D]). The example model was
given its `embedding` output (64 values, relu of the first dense layer) this way; newer
exports (`triton_al.example.train.export_onnx`) include it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def expose_output(path: str | Path, tensor: str, name: str, out: str | Path | None = None) -> list[int | str]:
    """Add graph output `name` = Identity(`tensor`) to the ONNX model at `path`, written to
    `out` (default: in place, atomically). Returns the output's shape (batch dim first, as
    shape inference gives it). ValueError when the tensor does not exist, the name is taken,
    or the tensor is not float32."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    produced = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    if tensor not in produced:
        raise ValueError(f"{path}: no tensor {tensor!r} in the graph (node outputs: {sorted(produced)[:20]})")
    taken = produced | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    if name in taken:
        raise ValueError(f"{path}: the graph already has a tensor named {name!r}: choose another --name")
    inferred = {v.name: v for v in shape_inference.infer_shapes(model).graph.value_info}
    info = inferred.get(tensor)
    if info is None or info.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"{path}: tensor {tensor!r} is not float32 (or its type cannot be inferred)")
    shape: list[int | str] = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
    graph.node.append(helper.make_node("Identity", [tensor], [name]))
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    target = Path(out) if out is not None else path
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(target)
    return shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="The model.onnx to change.")
    parser.add_argument("--tensor", required=True, help="The inner tensor to expose (e.g. the layer before the classifier).")
    parser.add_argument("--name", default="embedding", help="The new output's name (default: embedding).")
    parser.add_argument("--out", type=Path, help="Write here instead of changing MODEL in place.")
    args = parser.parse_args(argv)
    try:
        shape = expose_output(args.model, args.tensor, args.name, args.out)
    except ValueError as e:
        parser.exit(2, f"expose_output: {e}\n")
    print(f"{args.out or args.model}: output {args.name!r} = {args.tensor!r}, shape {shape}")


if __name__ == "__main__":
    main()

"""Where ONNX Runtime spends its time in r3d_18, dense and ``fold_batchnorm(factorize(model, 0.25))``
(torchvision's definition, batch 1, 3x16x112x112, CPU provider, 2 threads), per Conv node:
its input and weight shapes and its median kernel time over the runs after the first two (a
session's first run costs up to 15x a later one per node, so a profile that averages it in
misleads). Prints the totals per kind of node and, for the factorized graph, per conv.

    python benchmarks/onnx_r3d18_nodes.py [--runs 7]
"""

import argparse
import collections
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from tensorconv._torchvision import torchvision_models
from tensorconv.nn import factorize, fold_batchnorm


def node_times(path, x, runs):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(runs):
        session.run(None, feed)
    times = collections.defaultdict(list)
    for event in json.load(open(session.end_profiling())):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["name"][: -len("_kernel_time")]].append(event["dur"] / 1e3)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def conv_rows(path, times):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    shapes.update({v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.input})
    shapes.update({i.name: tuple(i.dims) for i in model.graph.initializer})
    for node in model.graph.node:
        if node.name in times and node.op_type in ("Conv", "FusedConv"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            yield (
                node.name,
                times[node.name],
                shapes.get(node.input[0]),
                shapes.get(node.input[1]),
                attrs.get("group", 1),
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dense = torchvision_models().video.r3d_18().eval()
    models = {"dense": dense, "factorized+fold": fold_batchnorm(factorize(dense, 0.25).eval())}
    x = torch.randn(1, 3, 16, 112, 112)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(path))
            times = node_times(path, x, args.runs)
            kinds = collections.Counter()
            for node in onnx.load(str(path)).graph.node:
                kinds[node.op_type] += times.get(node.name, 0.0)
            print(f"{name}: total {sum(times.values()):.1f} ms;", {k: round(v, 1) for k, v in kinds.most_common()})
            if name != "dense":
                for row in conv_rows(path, times):
                    print(f"  {row[1]:7.2f} ms  {row[0]}  input {row[2]}  weight {row[3]}  groups {row[4]}")


if __name__ == "__main__":
    main()

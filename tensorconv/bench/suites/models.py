"""``tensorconv bench models``: see :func:`run`."""

from __future__ import annotations

import os
import tempfile
import warnings

from ..common import _r3d18
from ..timing import _Progress, measure_many


def _torchvision(family, name):
    def build():
        from ..._torchvision import torchvision_models

        models = torchvision_models()
        return (getattr(models.video, name) if family == "video" else getattr(models, name))(), f"torchvision {name}"

    return build


#: name -> (builder returning (model, source), one sample's input shape, quick input shape or None: not in --quick)
MODELS = {
    "r3d_18": (_r3d18, (3, 16, 112, 112), (3, 8, 112, 112)),
    "r2plus1d_18": (_torchvision("video", "r2plus1d_18"), (3, 16, 112, 112), None),
    "resnet50": (_torchvision("image", "resnet50"), (3, 224, 224), None),
}
RUNTIMES = ("eager", "torch.compile", "onnxruntime")


def _conv_params(model):
    import torch

    from ...nn.layers import _FactorizedConv

    return sum(
        m.weight.numel() if isinstance(m, torch.nn.modules.conv._ConvNd) else m.n_params
        for m in model.modules()
        if isinstance(m, (torch.nn.modules.conv._ConvNd, _FactorizedConv))
    )


def _runners(runtime, models, x, threads):
    """name -> a no-argument callable running that model on ``x`` in ``runtime``; None where the
    runtime is not installed here. Compiling and exporting happen here, before any timing."""
    import torch

    if runtime == "eager":
        return {k: (lambda m=m: m(x)) for k, m in models.items()}
    if runtime == "torch.compile":
        compiled = {k: torch.compile(m) for k, m in models.items()}  # the default backend, as users run it
        return {k: (lambda m=m: m(x)) for k, m in compiled.items()}
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    feed = x.numpy()
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, m in models.items():
            path = os.path.join(tmp, f"{k}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(m, (x,), dynamo=True, verbose=False).save(path)
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            runners[k] = lambda s=session, name=name: s.run(None, {name: feed})
    return runners


def run(args, targets):
    """Whole networks, dense against factorized (``tensorconv.nn.factorize``, CP at a quarter of
    each conv's parameters), torch CPU, eval, no gradients, timed interleaved in each runtime:
    eager torch, ``torch.compile`` (default backend) and ONNX Runtime (CPU provider, the torch
    threads; where installed): r3d_18, r2plus1d_18 (torchvision) and resnet50 at batch 1 and 8.
    ``--quick``: r3d_18 (8 frames) at batch 1, eager only. Each row records the process settings
    (allocator, threads) it ran with. Target: r3d_18 >= 2x at batch 1 (eager)."""
    import torch

    from ...nn import factorize

    if not any(b == "torch" for b, _ in targets):
        return []
    runtimes = ("eager",) if args.quick else RUNTIMES
    batches = (1,) if args.quick else (1, 8)
    chosen = {k: v for k, v in MODELS.items() if not args.quick or v[2] is not None}
    threads = torch.get_num_threads()
    process = f"allocator: {args.allocator_note}; torch threads: {threads}"
    rows = []
    prog = _Progress(len(chosen) * len(runtimes) * len(batches), "models")
    for name, (build, sample, quick_sample) in chosen.items():
        torch.manual_seed(0)
        try:
            dense, source = build()
        except ImportError as exc:  # torchvision is a bench / test extra
            rows.append(dict(suite="models", model=name, skipped=f"not importable here: {exc}"))
            continue
        dense = dense.eval()
        # one ALS sweep per layer: the speed of a layer does not depend on how well it fits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # grouped / 1x1 convs left dense are expected here
            factorized = factorize(dense, 0.25, factorization="cp", n_iter_max=1).eval()
        shape = quick_sample if args.quick else sample
        for runtime in runtimes:
            for batch in batches:
                x = torch.randn(batch, *shape)
                with torch.no_grad():
                    runners = _runners(runtime, {"dense": dense, "factorized": factorized}, x, threads)
                    if runners is None:
                        rows.append(dict(suite="models", model=source, runtime=runtime, skipped="not installed"))
                        prog.step(f"{name} {runtime} (not installed)")
                        continue
                    t = measure_many(runners, repeat=max(3, args.repeat // 2), budget_s=args.budget)
                if runtime == "torch.compile":
                    # dynamo counts recompiles per code object for the whole process (models of one
                    # class, each batch): what this point compiled must not use up another's budget
                    torch._dynamo.reset()
                rows.append(
                    dict(
                        suite="models",
                        model=source,
                        runtime=runtime,
                        batch=batch,
                        input=list(shape),
                        dense_params=_conv_params(dense),
                        factorized_params=_conv_params(factorized),
                        **{
                            "dense ms": round(t["dense"]["median_ms"], 2),
                            "factorized ms": round(t["factorized"]["median_ms"], 2),
                        },
                        speedup=round(t["dense"]["median_ms"] / t["factorized"]["median_ms"], 2),
                        process=process,
                    )
                )
                prog.step(f"{name} {runtime} batch {batch}")
    prog.close()
    return rows

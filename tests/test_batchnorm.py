"""tensorconv.nn.fold_batchnorm: the folded model computes what the model with its BatchNorms
computes (eval mode, float64 1e-10), on hand-made graphs and torchvision's resnet18, and the
exported ONNX graph loses its BatchNormalization nodes. recalibrate_batchnorm: the running
statistics equal those computed directly from the BatchNorm's inputs."""

import pytest

torch = pytest.importorskip("torch")
from conftest import rel_err  # noqa: E402
from torch import nn  # noqa: E402

from tensorconv.nn import KruskalConv, TuckerConv, factorize, fold_batchnorm, recalibrate_batchnorm  # noqa: E402


def _randomise(bn, g):
    """Running statistics and affine parameters that are not the identity."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = KruskalConv(3, 8, (3, 3), rank=4, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = TuckerConv(8, 8, (3, 3), rank=(4, 4), padding=1, groups=2)
        self.bn_b = nn.BatchNorm2d(8, affine=False)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_c = nn.BatchNorm2d(8)  # c's output is also added below: not folded
        self.d = nn.Conv2d(8, 4, 1, bias=False)
        self.bn_d = nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))
        h = torch.relu(self.bn_b(self.b(h)))
        c = self.c(h)
        h = self.bn_c(c) + c
        return self.bn_d(self.d(h))


def test_folded_model_equals_the_model_with_its_batchnorms():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _Branching().double().eval()
    for bn in (model.bn_a, model.bn_b, model.bn_c, model.bn_d):
        _randomise(bn, g)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=g)
    want = model(x)
    folded = fold_batchnorm(model)
    kinds = {name: type(getattr(folded, name)).__name__ for name in ("bn_a", "bn_b", "bn_c", "bn_d")}
    assert kinds == {"bn_a": "Identity", "bn_b": "Identity", "bn_c": "BatchNorm2d", "bn_d": "Identity"}
    assert type(model.bn_a) is nn.BatchNorm2d  # the original is untouched
    assert folded.a.bias is not None and folded.d.bias is not None  # the shift lives in a new bias
    assert rel_err(folded(x).detach(), want.detach()) < 1e-10


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.slow
def test_factorized_resnet18_folds_every_batchnorm_and_exports_without_them(tv, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = tv.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m.double(), g)
    model = factorize(model.double(), 0.25, n_iter_max=5).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    want = model(x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert rel_err(folded(x).detach(), want.detach()) < 1e-10
    small = folded.float()
    x32 = x.float()
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(small, (x32,), dynamo=True, verbose=False).save(str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "ConvTranspose" not in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x32.numpy()})[0]
    with torch.no_grad():
        ref = small(x32).numpy()
    assert rel_err(got, ref) < 1e-4  # float32: stated 1e-4


def test_recalibrate_batchnorm_equals_statistics_of_the_inputs_it_sees():
    """Oracle: the BatchNorm inputs recorded by a hook, their mean over all samples and the
    average of the batches' unbiased variances (PyTorch's cumulative average)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        KruskalConv(3, 6, (3, 3), rank=4, padding=1), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(), nn.Conv2d(6, 4, 3)
    ).double()
    model.train()
    model[1].running_mean.fill_(5.0)  # stale statistics
    seen = []
    hook = model[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=g) for _ in range(3)]
    weights_before = [p.detach().clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, batches) is model
    hook.remove()
    per_channel = [b.transpose(0, 1).reshape(6, -1) for b in seen]
    mean = torch.stack([c.mean(1) for c in per_channel]).mean(0)
    var = torch.stack([c.var(1, unbiased=True) for c in per_channel]).mean(0)
    assert rel_err(model[1].running_mean, mean) < 1e-10 and rel_err(model[1].running_var, var) < 1e-10
    assert model.training and model[1].momentum == 0.3  # restored
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))  # nothing trained
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, [])
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3)), batches)

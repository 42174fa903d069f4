"""DistributedDataParallel with factorized layers and the lasso (2 processes, gloo, CPU).

Oracle: the same network trained in one process on the full batch. DDP averages the ranks'
gradients, so with a mean loss over each rank's half of the batch (plus the lasso, the same on
both ranks) every step equals the full-batch step; in float64 the parameters agree to rounding.
"""

import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS = 4
GAMMA = 0.01


def _net():
    from tensorconv.nn import HOCPBlock, KruskalConv, TuckerConv

    torch.manual_seed(0)
    return torch.nn.Sequential(
        KruskalConv(3, 8, (3, 3), rank=6, padding=1),
        torch.nn.ReLU(),
        TuckerConv(8, 8, (3, 3), rank=(4, 4), padding=1),
        HOCPBlock(8, 4, (3, 3), rank=5, padding=1, nonlinearity=None),
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 10, 10, generator=g, dtype=torch.float64), torch.randn(
        8, 4, 10, 10, generator=g, dtype=torch.float64
    )


def _step(model, opt, x, y, penalty_model):
    from tensorconv.nn import lasso

    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y) + lasso(penalty_model, GAMMA)
    loss.backward()
    opt.step()


def _train(rank, world, out_dir):
    net = _net()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    half = x.shape[0] // world
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    for _ in range(STEPS):
        _step(ddp, opt, xs, ys, net)  # the lasso reads the wrapped module's lambdas
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # DDP holds the process group; training in its own frame drops it before the group is destroyed
        # (a group left to interpreter exit can abort in gloo's teardown)
        _train(rank, world, out_dir)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_ddp_two_processes_equal_full_batch_training(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for _ in range(STEPS):
        _step(net, opt, x, y, net)
    single = net.state_dict()
    initial = _net().state_dict()
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # identical on both ranks
        scale = value.abs().max().clamp_min(1e-300)
        assert ((ranks[0][name] - value).abs().max() / scale) < 1e-10, name
    moved = sum(float((single[k] - initial[k]).abs().sum()) for k in single if single[k].is_floating_point())
    assert moved > 0  # it trained

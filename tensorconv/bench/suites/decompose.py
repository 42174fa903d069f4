"""``tensorconv bench decompose``: see :func:`run`."""

from __future__ import annotations

import json
import sys

from ..timing import _Progress

_DECOMPOSE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
def hwm():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
torch.manual_seed(0)
c, t, r, r_out, r_in = (int(v) for v in sys.argv[3].split(","))
conv = torch.nn.Conv3d(c, t, 3, bias=False)
who = sys.argv[1]
if who == "tltorch":
    import tensorly
    import tltorch
    tensorly.set_backend("pytorch")
base = hwm()
t0 = time.perf_counter()
if who == "tensorconv-cp":
    from tensorconv.nn import KruskalConv
    layer = KruskalConv.from_conv(conv, r)
    err = layer.relative_error
elif who == "tensorconv-tucker":
    from tensorconv.nn import TuckerConv
    layer = TuckerConv.from_conv(conv, (r_out, r_in))
    err = layer.relative_error
else:
    layer = tltorch.FactorizedConv.from_conv(conv, rank=r, factorization="cp")
    w = conv.weight.detach()
    err = float((layer.weight.to_tensor() - w).norm() / w.norm())
print(json.dumps(dict(seconds=time.perf_counter() - t0, extra_bytes=hwm() - base, error=err)))
"""


def run(args, targets):
    """Decomposing one large layer, Conv3d(512, 1024, 3): tensorconv's CP (rank 256) and Tucker
    ((256, 128)) against tensorly-torch's ``FactorizedConv.from_conv`` (CP, rank 256); time and
    peak memory above the process's baseline, each in its own process (the peer with a time and
    address-space limit, so that it cannot take the machine down). ``--quick``: Conv3d(64, 128, 3)
    at an eighth of those ranks, 20 s at most each."""
    import resource
    import subprocess

    rows = []
    threads = 2
    limit_s = 20 if args.quick else 600
    # (C, T, CP rank, Tucker R_out, R_in)
    sizes = (64, 128, 32, 32, 16) if args.quick else (512, 1024, 256, 256, 128)
    whos = ("tensorconv-cp", "tensorconv-tucker", "tltorch")
    prog = _Progress(len(whos), "decompose")
    for who in whos:

        def cap():  # 16 GiB of address space: the peer's reported ~83 GB would otherwise swap the VM
            resource.setrlimit(resource.RLIMIT_AS, (16 * 1024**3, 16 * 1024**3))

        row = dict(
            suite="decompose",
            method=who,
            layer=f"Conv3d({sizes[0]}, {sizes[1]}, 3)",
            rank=f"({sizes[3]}, {sizes[4]})" if who.endswith("tucker") else str(sizes[2]),
            threads=threads,
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", _DECOMPOSE, who, str(threads), ",".join(map(str, sizes))],
                capture_output=True,
                text=True,
                timeout=limit_s,
                preexec_fn=cap if who == "tltorch" else None,
            )
            if done.returncode == 0:
                out = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(
                    seconds=round(out["seconds"], 1),
                    extra_peak_mib=round(out["extra_bytes"] / 2**20),
                    relative_error=round(out["error"], 4),
                    result="done",
                )
            else:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                row.update(seconds=None, extra_peak_mib=None, relative_error=None, result=f"failed: {last[:120]}")
        except subprocess.TimeoutExpired:
            row.update(seconds=None, extra_peak_mib=None, relative_error=None, result=f"did not finish in {limit_s} s")
        rows.append(row)
        prog.step(who)
    prog.close()
    return rows

"""The data-parallel group's collectives on one rank, with gloo and with NCCL on a GPU (that one
marked gpu; it skips without a GPU).

One rank: two NCCL ranks cannot share the one GPU a test machine has, and the averaging across
ranks is tested with gloo in test_distributed.py. What the NCCL case covers is NCCL's own path:
the rendezvous, and every collective moving CPU tensors to the rank's GPU and back.
"""
import pytest
import torch

from learner.distributed import DistConfig, Group, free_port


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_the_groups_collectives_leave_a_single_ranks_step_unchanged(backend):
    if backend == "nccl" and not (torch.cuda.is_available()
                                  and torch.distributed.is_nccl_available()):
        pytest.skip("needs an NVIDIA GPU with a CUDA build of torch that has NCCL")
    config = DistConfig(rank=0, world_size=1, addr=f"127.0.0.1:{free_port()}", backend=backend)
    assert config.device.type == ("cuda" if backend == "nccl" else "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 5)).square().mean().backward()
    model[2].bias.grad = None  # a parameter without a gradient keeps none
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    group = Group(config)
    group.attach(model, optimizer)
    group.join()
    try:
        group.average_gradients(model)
        for p, g in zip(model.parameters(), grads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert p.grad.device.type == "cpu" and torch.equal(p.grad, g)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
        optimizer.step()
        group.finish_update()  # the step handshake and the replica fingerprint
        group.broadcast_state()  # parameters and the optimizer's state, through the GPU
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert not torch.equal(model[0].weight, before[0])  # the step happened, and survived
        got = group.send_bytes(b"tether", 6, "a test message").tobytes()
        assert got == b"tether"
    finally:
        group.close()

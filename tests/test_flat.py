"""FlatParams: parameters and gradients as views into one buffer per (device, dtype)."""

import pytest
import torch

from subgrad import FlatParams, StaleFlatParamsError


def _net(device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)
    ).to(device=device, dtype=dtype)


def test_params_become_views_and_model_is_unchanged(device):
    net = _net(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    before = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flat = FlatParams(net)
    (buf,) = flat.buffers()
    assert buf.numel() == sum(p.numel() for p in net.parameters())
    assert torch.equal(net(x), before)
    buf.add_(1.0)  # one write to the buffer is seen by every parameter
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), state[name] + 1.0), name


def test_state_dict_roundtrip(device):
    net = _net(device)
    flat = FlatParams(net)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    flat.buffers()[0].zero_()
    net.load_state_dict(saved)  # copies into the views, so into the buffer
    assert torch.equal(flat.buffers()[0], torch.cat([saved[n].reshape(-1) for n, _ in net.named_parameters()]))


def test_backward_accumulates_into_flat_grad(device):
    net = _net(device)
    flat = FlatParams(net)
    flat.zero_grad()
    x = torch.randn(2, 3, 8, 8, device=device)
    net(x).square().sum().backward()
    (grad,) = flat.grads()
    assert torch.equal(grad, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert grad.abs().sum() > 0
    expected = grad.clone()
    net(x).square().sum().backward()  # accumulates in place
    assert torch.allclose(flat.grads()[0], 2 * expected)
    # zero_grad(set_to_none=True) + backward makes fresh tensors: grads() copies and re-links them.
    torch.optim.SGD(net.parameters(), lr=0.1).zero_grad(set_to_none=True)
    net(x).square().sum().backward()
    assert torch.allclose(flat.grads()[0], expected)
    assert net[0].weight.grad.data_ptr() == flat.grads()[0].data_ptr()


def test_groups_by_dtype_and_shared_params_once(device):
    a = torch.nn.Linear(3, 3).to(device)
    b = torch.nn.Linear(3, 2).to(device=device, dtype=torch.bfloat16)
    model = torch.nn.ModuleDict(dict(a=a, b=b, a_again=a))
    flat = FlatParams(model)
    assert sorted(str(g.dtype) for g in flat.groups) == ["torch.bfloat16", "torch.float32"]
    assert flat.numel == 12 + 8


def test_moving_the_module_is_detected_and_repack_fixes_it(device):
    net = _net(device)
    flat = FlatParams(net)
    net.to(torch.float64)
    with pytest.raises(StaleFlatParamsError, match="call FlatParams.repack"):
        flat.buffers()
    flat.repack()
    (buf,) = flat.buffers()
    assert buf.dtype == torch.float64
    buf.zero_()
    assert all(bool((p == 0).all()) for p in net.parameters())


def test_no_trainable_parameters():
    net = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams(net)

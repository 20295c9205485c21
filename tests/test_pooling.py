"""fedmpi's max-pooling (fedmpi/models/nets.py ``max_pool2d`` and ``MaxPool2d``) against torch's
own: the same values without gradients, and the same outputs and gradients, bit for bit, through
whole networks with them (ties included)."""
import pytest
import torch
from torch import nn

from fedmpi.models import build_model

torch.set_num_threads(1)


def _grads(model, x, y):
    model.zero_grad()
    torch.manual_seed(1)           # the same dropout masks in both runs
    out = model(x)
    loss = sum(nn.functional.cross_entropy(o, y) for o in out) if isinstance(out, list) else \
        nn.functional.cross_entropy(out, y)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, shape", [("mnistnet", (1, 28, 28)), ("cifar10net", (3, 32, 32)),
                                         ("femnist_cnn", (1, 28, 28)), ("multiexit_vgg_small", (1, 28, 28))])
def test_channels_last_pooling_gives_the_bits_of_torchs_plain_max_pool(monkeypatch, name, shape):
    """Outputs and every parameter's gradient equal, bit for bit, those of the same model with
    torch's own F.max_pool2d / nn.MaxPool2d on the default layout. The input is rounded to a
    coarse grid and the ReLUs leave zeros, so windows hold ties: a different argmax would route a
    gradient elsewhere."""
    import fedmpi.models.nets as nets

    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    x = torch.round(torch.randn(16, *shape) * 2) / 2
    y = torch.randint(0, 10, (16,))
    out, grads = _grads(model, x, y)
    with torch.no_grad():                       # evaluation: the shifted-slices path
        torch.manual_seed(1)
        out_no_grad = model(x)
    plain = lambda x, kernel_size, stride=None, padding=0: nn.functional.max_pool2d(x, kernel_size, stride, padding)  # noqa: E731
    monkeypatch.setattr(nets, "max_pool2d", plain)
    monkeypatch.setattr(nets.MaxPool2d, "forward", nn.MaxPool2d.forward)
    out_plain, grads_plain = _grads(model, x, y)
    as_list = lambda o: o if isinstance(o, list) else [o]  # noqa: E731
    for a, b, c in zip(as_list(out), as_list(out_plain), as_list(out_no_grad)):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert grads.keys() == grads_plain.keys()
    for n in grads:
        assert torch.equal(grads[n], grads_plain[n]), n


@pytest.mark.parametrize("shape, kernel, stride", [((5, 10, 24, 24), 3, 1), ((3, 20, 18, 17), 3, 1),
                                                   ((4, 32, 28, 28), 2, None), ((2, 64, 15, 15), 2, 2),
                                                   ((3, 3, 9, 11), (3, 2), (2, 1)), ((2, 8, 7, 7), 3, 3)])
def test_pooling_without_gradient_has_torchs_values_nans_and_ties_included(shape, kernel, stride):
    from fedmpi.models.nets import max_pool2d

    torch.manual_seed(0)
    x = torch.round(torch.randn(*shape) * 2) / 2
    x[0, 0, 0, :3] = float("nan")
    expected = nn.functional.max_pool2d(x, kernel, stride)
    with torch.no_grad():
        got = max_pool2d(x, kernel, stride)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), expected.isnan()) and expected.isnan().any()
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())

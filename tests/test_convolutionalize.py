"""fcnkern.convolutionalize: the paper's equivalence between a classifier and its fully convolutional form."""

from __future__ import annotations

import pytest
import torch
from helpers import generator
from torch import nn

from fcnkern import convolutionalize

SIZE = 16
STRIDE = 2  # one 2x2 pooling


def _features():
    # Unpadded convolutions: the patch-wise equivalence is exact only where no padding enters a window.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU()
    )  # 16 -> 14 -> 7 -> 5


def sequential_classifier():
    return nn.Sequential(
        _features(), nn.Flatten(), nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)
    )


class VGGStyle(nn.Module):
    """torchvision's VGG shape: features, adaptive pooling, flatten in forward, classifier."""

    def __init__(self):
        super().__init__()
        self.features = _features()
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))
        self.classifier = nn.Sequential(nn.Linear(400, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.mark.parametrize("make", [sequential_classifier, VGGStyle], ids=["sequential", "vgg_style"])
def test_same_logits_at_the_classifier_size(make):
    torch.manual_seed(0)
    clf = make().eval()
    fcn = convolutionalize(clf, SIZE).eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=generator("conv", make.__name__))
    out = fcn(x)
    assert out.shape == (3, 10, 1, 1)
    torch.testing.assert_close(out[:, :, 0, 0], clf(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [sequential_classifier, VGGStyle], ids=["sequential", "vgg_style"])
def test_each_output_position_is_the_classifier_on_its_patch(make):
    torch.manual_seed(1)
    clf = make().eval()
    fcn = convolutionalize(clf, (SIZE, SIZE)).eval()
    x = torch.randn(2, 3, 31, 27, generator=generator("slide", make.__name__))
    out = fcn(x)
    assert out.shape == (2, 10, (31 - SIZE) // STRIDE + 1, (27 - SIZE) // STRIDE + 1)
    for i, j in [(0, 0), (3, 1), (out.shape[2] - 1, out.shape[3] - 1), (5, 4)]:
        patch = x[:, :, STRIDE * i : STRIDE * i + SIZE, STRIDE * j : STRIDE * j + SIZE]
        torch.testing.assert_close(out[:, :, i, j], clf(patch), rtol=1e-5, atol=1e-5)


def test_weights_are_copied_not_shared():
    clf = sequential_classifier()
    fcn = convolutionalize(clf, SIZE)
    before = [p.clone() for p in clf.parameters()]
    for p in fcn.parameters():
        p.data.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, clf.parameters(), strict=True))


def test_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="no Linear"):
        convolutionalize(_features(), SIZE)
    squash = nn.Sequential(_features(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="would not slide"):
        convolutionalize(squash, SIZE)
    odd = nn.Sequential(_features(), nn.Flatten(), nn.Linear(400, 32), nn.BatchNorm1d(32), nn.Linear(32, 10))
    with pytest.raises(ValueError, match="not position-wise"):
        convolutionalize(odd, SIZE)

"""Explanation methods: shapes and ranges, what each map is, Captum's Grad-CAM against the hand-written one and
pytorch-grad-cam, hooks released, baselines, and the sanity check on a model whose layers are known."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_cnn.explain.base import Explainer, scale_unit, upsample
from attention_cnn.explain.baselines import EdgeMap, RandomMap, sobel_magnitude
from attention_cnn.explain.methods import GradCAM, MaskMap
from attention_cnn.explain.randomization import cascading_randomization, parameter_layers, spearman
from attention_cnn.explain.scoring import METHODS, build_methods
from attention_cnn.model import AttentionCNN
from attention_cnn.params import ModelParams

S = 32


def tiny_model(attention: str = "conv", seed: int = 0, head: str = "gmp") -> AttentionCNN:
    torch.manual_seed(seed)
    model = AttentionCNN(3, S, ModelParams(attention=attention, channels=8, hidden=16, head=head))
    model.train()  # non-trivial batch-norm statistics, as after training, so features differ between images
    with torch.no_grad():
        model(torch.rand(16, 3, S, S))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(1))


def predicted(model, images):
    with torch.no_grad():
        return model(images).logits.argmax(dim=1)


@pytest.mark.parametrize("attention, head", [("none", "gmp"), ("conv", "gmp"), ("ltpa", "gmp"), ("conv", "cam")])
def test_every_method_gives_image_sized_maps_in_unit_range(attention, head, images):
    model = tiny_model(attention, head=head)
    methods = build_methods(METHODS, model, seed=3, batch_size=64)
    expected = [m for m in METHODS if attention != "none" or m not in ("mask", "attended")]
    assert [m.name for m in methods] == expected
    for method in methods:
        with torch.inference_mode():  # as evaluate calls them
            maps = method(model, images, predicted(model, images))
        assert maps.shape == (4, S, S) and maps.dtype == torch.float32, method.name
        assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all(), method.name
    assert all(p.grad is None for p in model.parameters())  # they explain; they do not train


def test_the_mask_map_is_the_mask_averaged_over_channels(images):
    model = tiny_model("conv")
    with torch.no_grad():
        out = model(images)
    maps = MaskMap()(model, images, predicted(model, images))
    assert torch.allclose(maps, scale_unit(upsample(out.mask.mean(dim=1), S)), atol=1e-6)


def oracle_gradcam(model, images, targets):
    """The hand-written Grad-CAM that evaluate used before Captum: ReLU(sum_c mean_hw(d logit / d A_c) * A_c) on
    the trunk's output, gradients through a forward hook."""
    store = {}
    handle = model.trunk.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    try:
        logits = model(images.clone()).logits
        (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"])
    finally:
        handle.remove()
    return F.relu((grads.mean(dim=(2, 3), keepdim=True) * store["a"].detach()).sum(dim=1))  # (B, h, w)


def test_captum_gradcam_equals_the_hand_written_one_and_pytorch_grad_cam(images):
    from pytorch_grad_cam import GradCAM as LibraryGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = tiny_model("conv").double()
    x = images.double()
    targets = torch.tensor([0, 1, 2, 1])  # not only the predicted class
    ours = GradCAM().raw(model, x, targets)
    torch.testing.assert_close(ours, oracle_gradcam(model, x, targets), atol=1e-5, rtol=0)

    class Logits(nn.Module):  # pytorch-grad-cam wants a module that returns the logits tensor
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, batch):
            return self.inner(batch).logits

    class OnTheGrid(LibraryGradCAM):  # keep its map on the feature grid: no resize, only its min-max scaling
        def get_target_width_height(self, input_tensor):
            return (S // 8, S // 8)

    with OnTheGrid(model=Logits(), target_layers=[model.trunk]) as library:
        theirs = library(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    torch.testing.assert_close(scale_unit(ours).float(), torch.from_numpy(theirs).float(), atol=1e-5, rtol=0)


def test_gradcam_leaves_no_hook_even_when_the_forward_fails():
    model = tiny_model("conv")
    with pytest.raises(RuntimeError):
        GradCAM()(model, torch.rand(2, 5, S, S), torch.tensor([0, 1]))  # 5 channels: the first conv raises
    assert len(model.trunk._forward_hooks) == 0 and len(model.trunk._backward_hooks) == 0


def test_random_maps_are_seeded(images):
    model = tiny_model("conv")
    targets = torch.zeros(4, dtype=torch.long)
    first, again, other = (RandomMap(seed)(model, images, targets) for seed in (7, 7, 8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # each image its own noise


def test_the_edge_map_marks_the_step_and_nothing_on_a_flat_image():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0                                       # a vertical step between columns 3 and 4
    edges = sobel_magnitude(image)[0]
    assert edges[:, 3:5].min() > 0 and edges[:, :3].max() == 0 and edges[:, 5:].max() == 0
    assert torch.equal(EdgeMap()(None, torch.full((1, 3, 8, 8), 0.3), None), torch.zeros(1, 8, 8))


def test_spearman_with_ties_equals_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 6, 6), generator=g).float()   # many ties
    b = a + torch.rand(3, 6, 6, generator=g) * 3
    expected = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(3)]
    assert spearman(a, b).tolist() == pytest.approx(expected, abs=1e-9)
    assert spearman(a, torch.zeros_like(a)).tolist() == [0.0, 0.0, 0.0]   # a constant map ranks nothing


class Scale(nn.Module):
    """A bare nn.Parameter, as ConvAttention.scale."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        return x * self.scale


class BottomConvOutput(Explainer):
    """A map that depends on the bottom layer only: it must not move until that layer is randomised."""
    name = "bottom"

    def raw(self, model, images, targets):
        with torch.no_grad():
            return model[0](images)[:, 0]


def test_cascading_randomisation_goes_top_down_through_every_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), Scale(), nn.Conv2d(2, 1, 1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert [name for name, _ in parameter_layers(model)] == ["2", "1", "0"]
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cascade = cascading_randomization(model, [BottomConvOutput(), EdgeMap()], images, torch.zeros(3).long(), seed=0)
    assert cascade.layers == ["2", "1", "0"]
    bottom = cascade.correlation["bottom"]
    assert bottom[:3] == pytest.approx([1.0, 1.0, 1.0]) and abs(bottom[3]) < 0.9  # moves only at the last step
    assert cascade.correlation["edge"] == pytest.approx([1.0] * 4)  # model-free: never moves (fails the check)
    for name, p in model.named_parameters():  # the model itself is left alone (a copy is randomised) ...
        assert torch.equal(p, before[name])
    copy = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), Scale(), nn.Conv2d(2, 1, 1))
    copy.load_state_dict(model.state_dict())
    from attention_cnn.explain.randomization import randomize_
    generator = torch.Generator().manual_seed(0)
    for _, module in parameter_layers(copy):
        randomize_(module, generator)
    for name, p in copy.named_parameters():  # ... and every parameter, the bare one too, is redrawn
        assert not torch.allclose(p, before[name]), name


def test_gradcam_fails_to_stay_the_same_on_a_randomised_cnn(images):
    model = tiny_model("conv")
    cascade = cascading_randomization(model, [GradCAM(), EdgeMap()], images, predicted(model, images), seed=0)
    assert "attention" in cascade.layers and cascade.layers[0] == "head.3"   # ConvAttention.scale's owner
    assert cascade.correlation["gradcam"][-1] < 0.5 < cascade.correlation["edge"][-1]

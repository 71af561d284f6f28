"""Saliency maps: shapes and ranges, the masking they show, Grad-CAM against plain autograd, hooks released."""

import pytest
import torch
import torch.nn.functional as F

from attention_cnn.maps import ActivationHook, AttentionMap, GradCAM, RandomMap, scale_unit, upsample
from attention_cnn.model import AttentionCNN
from attention_cnn.params import ModelParams

S = 32


def tiny_model(attention: str = "conv", seed: int = 0) -> AttentionCNN:
    torch.manual_seed(seed)
    model = AttentionCNN(3, S, ModelParams(attention=attention, channels=8, hidden=16))
    # Non-trivial batch-norm statistics, as after training, so features differ between images.
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, S, S))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attention", ["none", "dense", "conv", "spatial", "ltpa"])
@pytest.mark.parametrize("method", [AttentionMap, GradCAM, lambda: RandomMap(seed=3)])
def test_maps_are_image_sized_and_in_unit_range(attention, method, images):
    maps = method()(tiny_model(attention), images)
    assert maps.shape == (4, S, S)
    assert maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("attention", ["dense", "conv", "spatial", "ltpa"])
def test_masking_changes_the_features(attention, images):
    with torch.no_grad():
        out = tiny_model(attention)(images)
    assert not torch.allclose(out.attended, out.features)
    assert torch.allclose(out.attended, out.features * out.mask)
    assert out.mask.std() > 0  # a non-trivial mask
    # The attention map is that mask, averaged over channels, upsampled and scaled to [0, 1]; its maximum
    # sits where the mask's does.
    maps = AttentionMap()(tiny_model(attention), images)
    assert torch.allclose(maps, scale_unit(upsample(out.mask.mean(dim=1), S)), atol=1e-6)
    assert maps.flatten(1).amax(dim=1).tolist() == pytest.approx([1.0] * 4)


def test_no_attention_leaves_the_features_and_gives_a_flat_map(images):
    model = tiny_model("none")
    with torch.no_grad():
        out = model(images)
    assert torch.equal(out.attended, out.features)
    assert torch.equal(AttentionMap()(model, images), torch.zeros(4, S, S))  # nothing to rank


def test_gradcam_equals_its_definition_computed_without_hooks(images):
    model = tiny_model("conv")
    x = images.clone()
    out = model(x)
    predicted = out.logits.argmax(dim=1)
    score = out.logits.gather(1, predicted[:, None]).sum()
    (grads,) = torch.autograd.grad(score, out.features)
    expected = F.relu((grads.mean(dim=(2, 3), keepdim=True) * out.features).sum(dim=1)).detach()
    assert torch.allclose(GradCAM().raw(model, images), expected, atol=1e-5)


def test_gradcam_works_under_inference_mode_and_leaves_no_hook(images):
    model = tiny_model("conv")
    with torch.inference_mode():
        maps = GradCAM()(model, images)
    assert maps.shape == (4, S, S) and maps.max() == pytest.approx(1.0)
    assert len(model.trunk._forward_hooks) == 0
    assert all(p.grad is None for p in model.parameters())  # it explains; it does not train


def test_hooks_are_released_even_when_the_forward_fails():
    model = tiny_model("conv")
    with pytest.raises(RuntimeError):
        GradCAM()(model, torch.rand(2, 5, S, S))  # 5 channels: the first conv raises
    assert len(model.trunk._forward_hooks) == 0
    with ActivationHook(model.trunk) as hook:
        assert len(model.trunk._forward_hooks) == 1
        model(torch.rand(1, 3, S, S))
        assert hook.activation.shape == (1, 8, S // 8, S // 8)
    assert len(model.trunk._forward_hooks) == 0


def test_random_maps_are_seeded(images):
    model = tiny_model("conv")
    first, again, other = RandomMap(7)(model, images), RandomMap(7)(model, images), RandomMap(8)(model, images)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # each image its own noise


def test_scale_unit_maps_each_image_to_zero_one():
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]])
    scaled = scale_unit(maps)
    assert scaled[0].tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert scaled[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]

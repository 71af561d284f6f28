"""The attention CNN: every variant's output contract (also in bf16 and channels_last, as CUDA runs it), the seed's
dense formula by hand, the memory guard, and the saved-model round trip."""

import time

import pytest
import torch
import torch.nn.functional as F

from attention_cnn.errors import UserError
from attention_cnn.memory import available_memory_bytes, check_dense_fits, check_model_fits, dense_attention_bytes
from attention_cnn.model import (CLASS_ATTENTION_TEMPERATURE, AttentionCNN, ConvAttention, DenseAttention, load_model,
                                 save_model)
from attention_cnn.params import ATTENTION_VARIANTS, HEADS, ModelParams

IMG, C, B, K = 32, 8, 3, 4  # final map h = w = 32 // 8 = 4


def tiny(attention: str, **kw) -> AttentionCNN:
    torch.manual_seed(0)
    return AttentionCNN(K, IMG, ModelParams(attention=attention, channels=C, hidden=16, **kw))


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_every_variant_keeps_the_output_contract(variant):
    model = tiny(variant)
    x = torch.rand(B, 3, IMG, IMG)
    out = model(x)
    assert out.logits.shape == (B, K)
    assert out.features.shape == (B, C, 4, 4)
    mask_channels = C if variant in ("dense", "conv") else 1
    assert out.mask.shape == (B, mask_channels, 4, 4)
    assert out.mask.min() >= 0 and out.mask.max() <= 1
    assert out.attended.shape == (B, C, 4, 4)
    torch.testing.assert_close(out.attended, out.features * out.mask)
    assert out.mask.mean(dim=1).shape == (B, 4, 4)  # the 2-D heat map consumers draw
    if variant == "none":
        assert torch.equal(out.mask, torch.ones(B, 1, 4, 4))
    if variant == "ltpa":  # a softmax over positions: a distribution per image
        torch.testing.assert_close(out.mask.sum(dim=(1, 2, 3)), torch.ones(B))
    if variant in ("dense", "conv", "spatial"):  # a sigmoid: strictly inside (0, 1) and not constant
        assert out.mask.min() > 0 and out.mask.max() < 1 and out.mask.std() > 0
    # Gradients reach the attention weights through the logits.
    out.logits.sum().backward()
    for name, p in model.attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_every_variant_trains_a_step_in_bf16_autocast_and_channels_last(variant):
    """What a CUDA step runs (bf16 autocast, channels_last weights and input), on CPU's bf16 autocast: every
    variant must mix bf16 activations with its fp32 pieces without a dtype error, and train in fp32."""
    model = tiny(variant).to(memory_format=torch.channels_last).train()
    x = torch.rand(B, 3, IMG, IMG).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out.logits.float(), torch.arange(B) % K)
    assert out.logits.dtype == torch.bfloat16  # the head ran in bf16: autocast was in effect
    assert out.features.dtype == torch.bfloat16  # the trunk too
    mask = out.mask.float()
    assert mask.shape[0] == B and mask.min() >= 0 and mask.max() <= 1
    if variant == "ltpa":  # a softmax over positions, computed in fp32 under autocast
        torch.testing.assert_close(mask.sum(dim=(1, 2, 3)), torch.ones(B), atol=1e-2, rtol=0)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
@pytest.mark.parametrize("head", HEADS)
def test_every_variant_works_with_every_head(variant, head):
    model = tiny(variant, head=head)
    out = model(torch.rand(B, 3, IMG, IMG))
    assert out.logits.shape == (B, K)
    if head == "class_attention":  # each class pools with its own attention, in class_maps (tested below)
        return
    seen = model.attention.head_input(out.attended, head)
    pooled = out.attended.sum(dim=(2, 3)) if variant == "ltpa" else out.attended.mean(dim=(2, 3))
    expected = {"flatten": out.attended.flatten(1), "gmp": out.attended.amax(dim=(2, 3)), "gap": pooled,
                "cam": pooled}[head]
    torch.testing.assert_close(seen, expected)
    first_linear = model.head[1 if head == "cam" else 0]
    assert first_linear.in_features == seen.shape[1] == (C * 16 if head == "flatten" else C)


def trained_statistics(model: AttentionCNN) -> AttentionCNN:
    """The model in eval mode with batch-norm statistics of its own (not the init's 0 and 1), so the features
    have both signs, as a trained model's do."""
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, IMG, IMG))
    return model.eval()


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
@pytest.mark.parametrize("head", HEADS)
def test_class_maps_sum_over_positions_plus_the_offsets_to_the_logits(variant, head):
    model = trained_statistics(tiny(variant, head=head))
    out = model(torch.rand(B, 3, IMG, IMG))
    maps = model.class_maps(out.attended)  # (B, K, h, w)
    assert maps.shape == (B, K, *out.attended.shape[-2:])
    offsets = model.class_offsets(out.attended)
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + offsets, out.logits, rtol=1e-5, atol=1e-5)
    if head in ("cam", "class_attention"):  # no hidden layer: the offset is the bias, the same for every image
        torch.testing.assert_close(offsets, model.head[-1].bias.expand(B, -1))


@pytest.mark.parametrize("variant", ["conv", "none"])
@pytest.mark.parametrize("head", ["gmp", "gap", "flatten"])
def test_a_hidden_layer_head_s_class_map_is_gradient_times_input_at_the_attended_map(variant, head):
    """What the gated decomposition claims, checked by autograd: with the ReLU gates fixed by the input the head is
    linear in the attended map, so each position's share is d logit_k / d attended times attended, summed over
    the channels (for `gmp` nonzero only where a channel peaks)."""
    model = trained_statistics(tiny(variant, head=head))
    attended = model(torch.rand(B, 3, IMG, IMG)).attended.detach().requires_grad_(True)
    logits = model.head(model.attention.head_input(attended, head))                 # (B, K)
    maps = model.class_maps(attended).detach()
    for k in range(K):
        (gradient,) = torch.autograd.grad(logits[:, k].sum(), attended, retain_graph=True)
        torch.testing.assert_close(maps[:, k], (gradient * attended).sum(dim=1).detach(), rtol=1e-5, atol=1e-6)
    if head == "gmp" and variant == "conv":  # only where a channel peaks (no ties in a masked map)
        assert ((maps[:, 0] != 0).flatten(1).sum(dim=1) <= C).all()


def neighbourhood_max(attended: torch.Tensor, window: int) -> torch.Tensor:
    """(C, h, w) -> each channel's maximum over the window x window positions around each position that lie on
    the map: by hand, one shifted copy per offset."""
    C_, h, w = attended.shape
    r = window // 2
    padded = torch.full((C_, h + 2 * r, w + 2 * r), float("-inf"))
    padded[:, r:r + h, r:r + w] = attended
    shifted = [padded[:, dy:dy + h, dx:dx + w] for dy in range(window) for dx in range(window)]
    return torch.stack(shifted).amax(dim=0)


@pytest.mark.parametrize("window", [1, 3])
def test_class_attention_weighs_each_class_by_its_own_softmax_over_positions(window):
    """Written out by hand for one image: class k's logit is sum_s softmax_s(T z_k)_s z_ks + b_k, z_ks = W_k . f_s,
    f_s each channel's maximum over the model.class_window square around s (the position alone at 1)."""
    model = tiny("conv", head="class_attention", class_window=window).eval()
    out = model(torch.rand(1, 3, IMG, IMG))
    features = neighbourhood_max(out.attended[0], window).flatten(1)   # (C, h*w)
    if window > 1:
        assert not torch.equal(features, out.attended[0].flatten(1))
    weight, bias = model.head[-1].weight, model.head[-1].bias    # (K, C), (K,)
    temperature = model.log_temperature.exp()
    assert temperature.item() == pytest.approx(CLASS_ATTENTION_TEMPERATURE)  # before training
    for k in range(K):
        z = weight[k] @ features                                 # (h*w,)
        torch.testing.assert_close(out.logits[0, k], ((temperature * z).softmax(0) * z).sum() + bias[k],
                                   rtol=1e-5, atol=1e-5)


def test_class_attention_learns_its_temperature():
    model = tiny("conv", head="class_attention")
    model(torch.rand(B, 3, IMG, IMG)).logits.logsumexp(dim=1).sum().backward()
    assert model.log_temperature.grad is not None and model.log_temperature.grad.abs() > 0
    assert "log_temperature" in model.state_dict()  # saved with the model, so predict sees the trained one


def test_pooled_heads_ignore_where_the_evidence_is_and_flatten_does_not():
    attended = torch.rand(B, C, 4, 4)
    moved = torch.roll(attended, shifts=(1, 2), dims=(2, 3))  # the same evidence elsewhere on the map
    attention = tiny("conv").attention
    for head, same in (("gap", True), ("gmp", True), ("flatten", False)):
        a, b = attention.head_input(attended, head), attention.head_input(moved, head)
        assert torch.allclose(a, b, atol=1e-6) == same, head


def test_dense_reproduces_the_seed_formula_by_hand():
    # One channel on a 2x2 map: F = 4. mask = sigmoid(w * ReLU(W x + b)) over the flattened map (row-major).
    attention = DenseAttention(channels=1, size=2)
    with torch.no_grad():
        attention.proj.weight.copy_(torch.tensor([[1., 0., 0., 0.],
                                                  [0., 1., 0., 0.],
                                                  [1., 1., 0., 0.],
                                                  [0., 0., 0., 2.]]))
        attention.proj.bias.copy_(torch.tensor([0., 0., 0.5, -1.]))
        attention.scale.copy_(torch.tensor([1., 2., -1., 3.]))
    features = torch.tensor([[[[1., -2.], [3., 1.]]]])  # (1, 1, 2, 2), flattened: [1, -2, 3, 1]
    # W x = [1, -2, -1, 2]; + b = [1, -2, -0.5, 1]; ReLU = [1, 0, 0, 1]; * w = [1, 0, 0, 3];
    # sigmoid = [0.7310586, 0.5, 0.5, 0.9525741].
    expected_mask = torch.tensor([[[[0.7310586, 0.5], [0.5, 0.9525741]]]])
    mask, attended = attention(features)
    torch.testing.assert_close(mask, expected_mask)
    torch.testing.assert_close(attended, torch.tensor([[[[0.7310586, -1.0], [1.5, 0.9525741]]]]))


def test_conv_is_the_seed_formula_with_weights_shared_across_positions():
    torch.manual_seed(1)
    attention = ConvAttention(channels=3)
    with torch.no_grad():
        attention.scale.copy_(torch.tensor([0.5, -2.0, 1.5]))
    features = torch.randn(2, 3, 5, 5)
    W, b = attention.proj.weight.view(3, 3), attention.proj.bias
    w = attention.scale.view(3)
    # The same formula at every position p: mask[:, :, p] = sigmoid(w * ReLU(W x[:, :, p] + b)).
    per_position = features.permute(0, 2, 3, 1)  # (B, h, w, C)
    expected = torch.sigmoid(w * torch.relu(per_position @ W.T + b)).permute(0, 3, 1, 2)
    torch.testing.assert_close(attention(features).mask, expected)


def test_dense_refuses_the_seed_config_at_150px_before_allocating():
    needed = dense_attention_bytes(channels=128, img_size=150)
    assert 1.72e9 * 36 < needed < 1.72e9 * 36 * 1.01  # 41,472^2 weights, 36 bytes each with Adam (+ activations)
    available, _ = available_memory_bytes("cpu")
    if needed <= available:
        pytest.skip(f"this machine has {available / 1e9:.0f} GB available: the seed's layer fits here")
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        check_model_fits(ModelParams(attention="dense", channels=128), 150)
    assert time.perf_counter() - started < 1.0
    message = str(err.value)
    assert "62.0 GB" in message and "model.attention=conv" in message and "1.72 billion weights" in message


def test_dense_refuses_what_no_machine_holds_and_accepts_what_fits():
    with pytest.raises(UserError, match=r"model.attention=conv"):
        check_dense_fits(channels=1024, img_size=1024)  # 1.7e13 weights
    check_dense_fits(channels=8, img_size=32)  # 128 x 128 weights: fits anywhere
    check_model_fits(ModelParams(attention="conv", channels=1024), 1024)  # C^2 weights at any size
    # Holding a trained layer for prediction needs the weights only: 4 bytes each, not 36.
    assert dense_attention_bytes(8, 32, training=False) == (128 * 128 + 2 * 128) * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it on one)")
def test_dense_guard_reads_the_gpu_free_memory():
    free, where = available_memory_bytes("cuda")
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory and "free memory on" in where
    with pytest.raises(UserError, match=r"GB of free memory on .* is at hand on cuda"):
        check_dense_fits(channels=512, img_size=150, device="cuda")  # 1.1e12 bytes: no GPU holds it
    check_dense_fits(channels=8, img_size=32, device="cuda")


def test_saved_model_round_trips_to_identical_logits(tmp_path):
    model = tiny("conv", dropout=0.3)
    model.set_normalization(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.1, 0.2, 0.3]))
    model.train()
    model(torch.rand(8, 3, IMG, IMG))  # move the BatchNorm running stats off their defaults
    model.eval()
    path = save_model(tmp_path / "model.pt", model, classes=["a", "b", "c", "d"], resize="pad", best_epoch=3)
    loaded = load_model(path)
    assert loaded.classes == ["a", "b", "c", "d"] and loaded.img_size == IMG
    assert loaded.resize == "pad" and loaded.best_epoch == 3
    assert loaded.model.params == ModelParams(attention="conv", channels=C, hidden=16, dropout=0.3)
    assert not loaded.model.training
    torch.testing.assert_close(loaded.model.mean.flatten(), torch.tensor([0.2, 0.4, 0.6]))
    x = torch.rand(5, 3, IMG, IMG)
    with torch.no_grad():
        before, after = model(x), loaded.model(x)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.mask, after.mask)
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temp file left behind


def test_a_class_attention_model_saved_before_class_window_loads_with_the_position_alone(tmp_path):
    """Model files written before model.class_window scored each position alone: they must load as they were
    trained, not with the new default window."""
    model = trained_statistics(tiny("conv", head="class_attention", class_window=1))
    path = save_model(tmp_path / "model.pt", model, classes=["a", "b", "c", "d"], resize="stretch")
    blob = torch.load(path, weights_only=True)
    del blob["params"]["class_window"]
    torch.save(blob, path)
    loaded = load_model(path)
    assert loaded.model.params.class_window == 1
    x = torch.rand(5, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded.model(x).logits)


def test_load_model_names_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="model.pt: model not found"):
        load_model(tmp_path / "model.pt")

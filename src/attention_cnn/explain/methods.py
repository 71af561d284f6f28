"""The maps of the model: its own attention, and the field's post-hoc attributions through Captum.

- MaskMap: the learned attention mask, averaged over channels (`out.mask.mean(1)`): where the attention module
  says to look. It is computed from the trunk's features only: the classifier head never shapes it.
- AttendedMap: what the head actually receives, features x mask, as the max over channels (the "after" panel
  of the visualize stage). Where the mask is the same for every channel (spatial, ltpa) it ranks positions like
  the mask weighted by feature strength; for conv and dense masks it differs in meaning, so both are scored.
- NativeMap: the model's own map of the explained class, read off the forward pass: `AttentionCNN.class_maps`,
  whose sum over positions plus `class_offsets` is the logit exactly (Zhou et al. 2016's CAM through the mask
  for `cam`; weighted by the class's own attention for `class_attention`; for the hidden-layer heads, the
  coefficients of the head with its ReLU gates as this input set them, at the positions the head reads, which
  for `gmp` are where each channel peaks). Its positive part, as Grad-CAM's: the positions that raise the logit.
  For the hidden-layer heads it equals gradient x input at the attended map (the gated head is linear there),
  an attribution none of the post-hoc methods here computes: Grad-CAM averages the trunk's gradients.
- GradCAM (Selvaraju et al. 2017): Captum's LayerGradCam on the output of `model.trunk`, the layer the mask
  multiplies, ReLU'd; upsampled bilinearly and min-max scaled per image by the base class. It explains the trunk,
  before the mask, on purpose: at the mask's output, on a cam head, Grad-CAM's weights are the head's class
  weights divided by h*w, so Grad-CAM there would be the native map again (an identity, not a rival). On a
  class_attention head it would not be, but the trunk stays the layer, so every model is explained at one place.
- IntegratedGradients (Sundararajan et al. 2017) from the training images' mean colour (zero after the model's
  normalisation, the same neutral image deletion fills with), `IG_STEPS` Gauss-Legendre steps; |attribution|
  summed over colour channels.
- SmoothGrad (Smilkov et al. 2017): Captum's NoiseTunnel over Saliency (absolute gradients), `SG_SAMPLES`
  noisy copies at sigma 0.15 of the [0, 1] range; max over colour channels, as Simonyan et al. draw saliency.
- Occlusion (Zeiler & Fergus 2014): a mean-colour square of side S/8 slid with stride S/8 (the final feature
  map's grid, where Grad-CAM and the mask live; a half stride costs 3.5x the forwards); the drop in the class
  logit where the square sat.
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Occlusion, Saliency

from attention_cnn.explain.base import Explainer, gradients_on, logits_of, once_per_image, plain
from attention_cnn.explain.metrics.deletion_insertion import deletion_fill

IG_STEPS = 16
SG_SAMPLES = 16
SG_SIGMA = 0.15


class MaskMap(Explainer):
    name = "mask"

    def raw(self, model, images, targets):
        with torch.no_grad():
            return model(images).mask.float().mean(dim=1)  # (B, h, w)


class AttendedMap(Explainer):
    name = "attended"

    def raw(self, model, images, targets):
        with torch.no_grad():
            return model(images).attended.float().amax(dim=1)  # (B, h, w)


class NativeMap(Explainer):
    name = "native"

    def raw(self, model, images, targets):
        with torch.no_grad():
            maps = model.class_maps(model(images).attended)                     # (B, K, h, w)
            explained = maps[torch.arange(maps.shape[0], device=maps.device), targets]
        return explained.float().clamp_min(0)                                   # (B, h, w)


class GradCAM(Explainer):
    name = "gradcam"

    def raw(self, model, images, targets):
        with gradients_on():
            cam = LayerGradCam(logits_of(model, split=False), model.trunk)
            return cam.attribute(plain(images), target=plain(targets), relu_attributions=True)[:, 0]  # (B, h, w)


class IntegratedGradientsMap(Explainer):
    name = "ig"

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size

    def raw(self, model, images, targets):
        with gradients_on():
            ig = IntegratedGradients(logits_of(model))
            x = plain(images)
            mean_colour = deletion_fill(x, model.mean).contiguous()  # zero after the model's normalisation
            attribution = ig.attribute(x, baselines=mean_colour, target=plain(targets), n_steps=IG_STEPS,
                                       internal_batch_size=self.batch_size)
        return attribution.abs().sum(dim=1)  # (B, S, S)


class SmoothGrad(Explainer):
    name = "smoothgrad"

    def __init__(self, seed: int, batch_size: int = 256):
        self.seed, self.batch_size = seed, batch_size

    def raw(self, model, images, targets):
        # NoiseTunnel draws with torch's global generator: seed it here so each call gives the same map.
        with gradients_on(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            tunnel = NoiseTunnel(Saliency(logits_of(model)))
            attribution = tunnel.attribute(plain(images), nt_type="smoothgrad", nt_samples=SG_SAMPLES,
                                           stdevs=SG_SIGMA, target=plain(targets),
                                           nt_samples_batch_size=max(1, self.batch_size // images.shape[0]))
        return attribution.amax(dim=1)  # (B, S, S), Saliency returns |gradient|


def occlusion_window(size: int) -> tuple[int, int]:
    """(side, stride) of the occluding square: S/8 each, at least 2 px."""
    side = max(2, size // 8)
    return side, side


class OcclusionMap(Explainer):
    name = "occlusion"

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size

    def raw(self, model, images, targets):
        side, stride = occlusion_window(images.shape[-1])
        with torch.no_grad():
            occlusion = Occlusion(once_per_image(logits_of(model)))
            attribution = occlusion.attribute(images, sliding_window_shapes=(3, side, side),
                                              strides=(3, stride, stride),
                                              baselines=deletion_fill(images, model.mean).contiguous(), target=targets,
                                              perturbations_per_eval=max(1, self.batch_size // images.shape[0]))
        return attribution.sum(dim=1)  # (B, S, S); the window spans the 3 channels, each gets the same share

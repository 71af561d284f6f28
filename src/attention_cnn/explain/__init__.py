"""Explanations of the attention CNN, held to the field's standards.

Shaped like pytorch-grad-cam: the methods share one base (`base.py`) and each is a small class that overrides
one function; the scores live in `metrics/`, one module each; the sanity check and the statistics stand apart.

    base.py            Explainer: (model, images, targets) -> (B, S, S) maps in [0, 1]; gradients under a context
    methods.py         the native class map (cam, class_attention heads), learned mask, attended map, and
                       Captum's Grad-CAM,
                       Integrated Gradients, SmoothGrad, Occlusion
    baselines.py       random and a model-free edge map (Sobel), which any real map must beat
    metrics/           deletion_insertion.py, road.py, pointing.py (pointing game, relevance mass),
                       grid.py (grid pointing game on mosaics of confidently classified test images)
    statistics.py      bootstrap confidence intervals and the paired test
    randomization.py   the cascading model-parameter randomisation (sanity check)
    scoring.py         every method x every score on one set of images, batched
    report.py          what the metrics files, the plots and the README table hold
    figures.py         one figure per image: the input, then one panel per method
"""

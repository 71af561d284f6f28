"""End to end: the real `dvc repro` in a temporary copy of the repo, with tiny params."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from attention_cnn.model import load_model
from e2e import VENV_BIN, run, stages_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

@pytest.fixture(scope="module")
def repo(built_repo, tmp_path_factory) -> Path:
    """A git + DVC copy of the repo's tracked pipeline files, with tiny params, after one `dvc repro`
    (tests/conftest.py builds it once per session)."""
    return built_repo(tmp_path_factory.mktemp("pipeline"))


def test_repro_writes_metrics_model_and_images(repo):
    metrics = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["guess"] == 0.167  # beside accuracy, so `dvc exp show` tells a model that did not learn
    assert json.loads((repo / "metrics/train/metrics.json").read_text())["guess"] == 0.167
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo))
    assert "accuracy" in json.dumps(shown)

    trained = load_model(repo / "models/model.pt")
    assert trained.classes == ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    assert trained.img_size == 32
    with torch.no_grad():
        out = trained.model(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 6)

    pngs = sorted((repo / "output/visualize").glob("*.png"))
    assert len(pngs) >= 3 and (repo / "output/visualize/native_per_class.png").is_file()
    with Image.open(pngs[0]) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    confusion = json.loads((repo / "output/evaluate/confusion.json").read_text())
    assert {row["actual"] for row in confusion} <= set(trained.classes)


def test_metrics_show_fits_160_columns(repo):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "160"}
    table = subprocess.run(["dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True, text=True).stdout
    lines = table.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 160, table
    # One row per file: the headline, then per explanation method its means and its interval half-widths, sharing
    # six score columns, then the mask-vs-Grad-CAM p-values.
    rows = ["metrics/evaluate/metrics.json"]
    for method in ("native", "mask", "attended", "gradcam", "ig", "smoothgrad", "occlusion", "random", "edge"):
        rows += [f"metrics/maps/{method}.json", f"metrics/ci/{method}.json"]
    # then the native map against each post-hoc method
    natives = [f"metrics/ci/vs-{m}.json" for m in ("gradcam", "ig", "smoothgrad", "occlusion")]
    assert [line.split()[0] for line in lines] == ["Path", *rows, "metrics/ci/paired.json", *natives]
    assert set(lines[0].split()[1:]) >= {"accuracy", "guess", "best_epoch", "del", "ins", "road", "pg", "mass", "mprt"}
    # The tiny model (model.head=class_attention) scores the native map. Whether a 2-epoch model classifies test
    # images of four classes correctly, as the grid pointing game needs, is luck: the widest table, grid column
    # included, is checked on scripted files (test_grid_native.py).
    native = json.loads((repo / "metrics/maps/native.json").read_text())
    assert 0 <= native["mass"] <= 1 and 0 <= native["pg"] <= 1


# Writes, once the page has loaded, how many of its images decoded into the DOM that --dump-dom prints.
IMAGE_PROBE = """<script>window.addEventListener("load", function () {
  var images = document.querySelectorAll("img"), loaded = 0;
  images.forEach(function (image) { if (image.complete && image.naturalWidth > 0) loaded++; });
  var out = document.createElement("pre"); out.id = "image-probe";
  out.textContent = "images loaded " + loaded + " of " + images.length; document.body.appendChild(out);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `apt-get install -y chromium` "
                                             "(.ci/run installs it, so CI always runs this test)")
def test_plots_page_draws_every_chart_and_image_with_no_network(repo):
    run(["dvc", "plots", "show"], repo)
    page = repo / "dvc_plots/index.html"
    html = page.read_text()
    assert not re.search(r"<script[^>]*\ssrc\s*=", html) and "cdn.jsdelivr" not in html  # everything inlined
    charts = html.count("vegaEmbed('#")
    images = html.count('<img src="static/')
    # 4 curves, confusion, per-class, ROAD MoRF and LeRF, sanity; gallery, 6 method figures, the mosaic, 3 figures,
    # 6 grids, the native map's class averages
    assert charts == 9 and images == 18
    probe = page.with_name("probe.html")
    end = html.rindex("</body>")  # the last one: the inlined libraries contain the string too
    probe.write_text(html[:end] + IMAGE_PROBE + html[end:])
    # Every host name resolves to nothing: the page must draw from what it carries.
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                           "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180)
    dom = done.stdout
    assert dom.count('class="marks"') == charts, done.stderr[-2000:]  # one drawn canvas per vega chart
    assert f"images loaded {images} of {images}" in dom


def test_second_repro_is_a_no_op(repo):
    log = run(["dvc", "repro"], repo)
    assert stages_run(log) == []
    assert "up to date" in run(["dvc", "status"], repo)


def test_visualize_param_reruns_only_visualize(repo):
    log = run(["dvc", "repro", "--dry"], repo)
    assert stages_run(log) == []
    log = run(["dvc", "exp", "run", "-S", "visualize.alpha=0.3"], repo)
    assert stages_run(log) == ["visualize"]


def test_img_size_reruns_everything_but_sample(repo):
    log = run(["dvc", "exp", "run", "-S", "img_size=24"], repo)
    assert stages_run(log) == ["prepare", "train", "evaluate", "visualize"]
    assert load_model(repo / "models/model.pt").img_size == 24


def test_bad_param_fails_before_any_work(repo):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "exp", "run", "-S", "model.attention=softmax"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "'model.attention' must be one of 'none', 'dense', 'conv', 'spatial', 'ltpa'" in done.stdout + done.stderr

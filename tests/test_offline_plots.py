"""The committed offline plots page: the template DVC fills, with the libraries DVC's own page would load."""

import configparser
import re
from pathlib import Path

from dvc_render.html import HTML
from dvc_render.vega import VegaRenderer

REPO = Path(__file__).resolve().parents[1]


def template_path() -> Path:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    return REPO / ".dvc" / config["plots"]["html_template"]  # DVC reads it relative to .dvc/


def test_the_configured_template_exists_and_dvc_can_fill_it():
    page = template_path().read_text(encoding="utf8")
    filled = HTML(page).with_element("<div id='probe'></div>").with_scripts(VegaRenderer.SCRIPTS).embed()
    assert "<div id='probe'></div>" in filled
    assert "cdn.jsdelivr" not in filled  # no {scripts} placeholder: DVC's CDN tags have nowhere to go
    assert not re.search(r"<script[^>]*\ssrc\s*=", filled)


def test_it_inlines_the_versions_dvc_loads_with_their_licences():
    # When this fails after a DVC upgrade: `make plots-template` (needs npm), then commit .dvc/offline_plots/.
    page = template_path().read_text(encoding="utf8")
    for package, version in re.findall(r"npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS):
        assert f"<script>/* {package}@{version} */" in page, package
        licence = (template_path().parent / f"LICENSE-{package}").read_text()
        assert "Redistribution and use in source and binary forms" in licence  # BSD-3-Clause

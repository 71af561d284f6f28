"""Regenerate .dvc/offline_plots/: the HTML template `dvc plots show` and `dvc plots diff` fill (set as
plots.html_template in .dvc/config), with vega, vega-lite and vega-embed inlined, so the page draws every chart
with no network. DVC's own page loads them from a CDN and stays blank offline.

Run once when DVC's vega versions change (tests/test_offline_plots.py says when): `make plots-template`.
Needs `npm` (the libraries come from the npm registry, the same builds DVC's page loads) and the project's venv
(for dvc_render, whose versions are used). The output is committed: nothing is downloaded at run time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from dvc_render.vega import VegaRenderer

OUT = Path(__file__).resolve().parents[1] / ".dvc" / "offline_plots"
# Each package's one-file browser build, as the CDN serves it.
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # dvc_render replaces these anywhere in the page

NOTICE = """Third-party code in template.html (inlined by tools/make_offline_plots.py from the npm registry):
- vega, vega-lite, vega-embed: BSD-3-Clause, University of Washington Interactive Data Lab (LICENSE-* here).
- Bundled inside their browser builds: d3 modules (ISC, Mike Bostock), topojson-client (ISC),
  vega-themes, vega-tooltip, vega-schema-url-parser (BSD-3-Clause, UW Interactive Data Lab), semver (ISC),
  fast-json-patch (MIT), json-stringify-pretty-compact (MIT). Their licence texts ship in each package on npm.
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}, inlined from the npm registry by tools/make_offline_plots.py; licences in LICENSE-* beside
         this file. The page has no scripts placeholder on purpose: DVC would put its CDN tags there. -->
{inlined}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def dvc_versions() -> dict[str, str]:
    """{package: version} of the scripts DVC's default page loads, e.g. {'vega': '5.20.2', ...}."""
    return dict(re.findall(r"npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS))


def fetch(package: str, version: str, into: Path) -> Path:
    subprocess.run(["npm", "pack", "--silent", f"{package}@{version}"], cwd=into, check=True,
                   stdout=subprocess.DEVNULL)
    unpacked = into / package
    with tarfile.open(into / f"{package}-{version}.tgz") as archive:
        archive.extractall(unpacked, filter="data")
    return unpacked / "package"


def main() -> None:
    versions = dvc_versions()
    if set(versions) != set(BUILDS):
        raise SystemExit(f"dvc_render loads {sorted(versions)}, expected {sorted(BUILDS)}: update this script")
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        packages = {name: fetch(name, versions[name], Path(tmp)) for name in BUILDS}
        OUT.mkdir(parents=True, exist_ok=True)
        for name, root in packages.items():
            # Without its source-map comment: the .map file is not shipped, and a browser would ask for it.
            code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", (root / BUILDS[name]).read_text(encoding="utf8"))
            if any(p in code for p in PLACEHOLDERS) or "</script" in code.lower():
                raise SystemExit(f"{name}: its build contains a DVC placeholder or </script>; cannot inline it")
            scripts.append(f"    <script>/* {name}@{versions[name]} */\n{code}\n    </script>")
            shutil.copy(root / "LICENSE", OUT / f"LICENSE-{name}")
    tags = ", ".join(f"{name}@{versions[name]}" for name in BUILDS)
    page = PAGE.replace("{versions}", tags).replace("{inlined}", "\n".join(scripts))
    (OUT / "template.html").write_text(page, encoding="utf8")
    (OUT / "NOTICE").write_text(NOTICE, encoding="utf8")
    print(f"wrote {OUT / 'template.html'} ({len(page) // 1024} KiB: {tags})")


if __name__ == "__main__":
    main()

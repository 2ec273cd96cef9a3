"""Real anatomy the recipe builds on, fetched when the recipe runs and never at run time.

- MNI152 2009c T1 and its GM/WM probability maps: in nilearn's wheel under
  ``nilearn/datasets/data/`` (nilearn is BSD-3-Clause; the ICBM 2009c templates carry the
  McConnell Brain Imaging Centre's permissive copyright notice).
- Colin27 (``ch2``, ``ch2bet``) and the AAL, Harvard-Oxford and JHU atlases: Debian's
  ``mricron-data`` package (MRIcron's templates; AAL's licence forbids redistribution for
  commercial use, Harvard-Oxford and JHU come with FSL's non-commercial licence). The
  anatomy-based generator (``engine.synthetic.anatomy_archive``) reads these: tissue classes from
  the MNI152 probability maps and Colin27, lobe names from AAL.

Neither goes into the repository: only weights trained on them do. ``fetch(DIR)`` downloads
and unpacks both with their ordinary clients (``pip download``, ``apt-get download`` +
``dpkg-deb -x``); ``require(DIR)`` returns the files or fails naming what is missing and the
command that gets it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import UsageError

NILEARN = "nilearn==0.14.1"
NILEARN_DATA = "nilearn/datasets/data"
MRICRON_TEMPLATES = "usr/share/mricron/templates"
FILES = {
    "mni_t1": f"{NILEARN_DATA}/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni_gm": f"{NILEARN_DATA}/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mni_wm": f"{NILEARN_DATA}/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "colin": f"{MRICRON_TEMPLATES}/ch2.nii.gz",
    "colin_brain": f"{MRICRON_TEMPLATES}/ch2bet.nii.gz",
    "aal": f"{MRICRON_TEMPLATES}/aal.nii.gz",
    "aal_names": f"{MRICRON_TEMPLATES}/aal.nii.txt",
    "harvard_oxford": f"{MRICRON_TEMPLATES}/HarvardOxford-cort-maxprob-thr0-1mm.nii.gz",
    "jhu": f"{MRICRON_TEMPLATES}/JHU-WhiteMatter-labels-1mm.nii.gz",
}


def fetch(folder: str | Path) -> dict[str, Path]:
    """Download and unpack the assets into ``folder`` (needs the network; recipe time only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not all((folder / rel).is_file() for key, rel in FILES.items() if key.startswith("mni")):
        subprocess.run([sys.executable, "-m", "pip", "download", NILEARN, "--no-deps", "-d", str(folder)], check=True)
        wheel = max(folder.glob("nilearn-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(NILEARN_DATA) and name.endswith(".nii.gz"):
                    z.extract(name, folder)
    if not (folder / FILES["colin"]).is_file():
        subprocess.run(["apt-get", "download", "mricron-data"], check=True, cwd=folder)
        deb = max(folder.glob("mricron-data_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    return require(folder)


def require(folder: str | Path | None) -> dict[str, Path]:
    """The asset files under ``folder``, or a usage error naming each missing one and the fix."""
    if folder is None:
        raise UsageError(
            "the anatomy assets are needed: python -m engine.default_model.assets fetch DIR, then --assets DIR"
        )
    folder = Path(folder)
    missing = [rel for rel in FILES.values() if not (folder / rel).is_file()]
    if missing:
        raise UsageError(
            f"anatomy assets missing under {folder}: {', '.join(missing)}; "
            f"get them with: python -m engine.default_model.assets fetch {folder}"
        )
    return {key: folder / rel for key, rel in FILES.items()}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "fetch":
        sys.exit("usage: python -m engine.default_model.assets fetch DIR")
    for key, path in fetch(sys.argv[2]).items():
        print(f"{key}: {path}")

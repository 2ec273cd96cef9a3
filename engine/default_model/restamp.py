"""Re-stamp the shipped heads with the embedded model's fingerprint, without refitting.

A head records the fingerprint of the encoder it was fit on (``encoder.fingerprint`` in its
manifest) and is refused on any other. When the fingerprint's definition changes but the tensors
do not (or new weights ship with heads fit on them under the older definition), this rewrites
each recorded value that names the embedded model — under the current definition or the legacy
one (:func:`engine.model.legacy_fingerprint`) — to the current fingerprint. A head recording any
other encoder is left alone and listed. Deterministic: a second run changes nothing.

    python -m engine.default_model.restamp            # rewrite contrib_heads/*/manifest.json
    python -m engine.default_model.restamp --check    # exit 1 if any shipped head is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.model import DEFAULT_MODEL_DIR, compute_fingerprint, legacy_fingerprint, read_card

HEADS_DIR = Path(__file__).resolve().parents[2] / "contrib_heads"


def restamp(
    heads_dir: Path = HEADS_DIR, model_dir: Path = DEFAULT_MODEL_DIR, check: bool = False
) -> dict[str, list[str]]:
    """Rewrite every manifest under ``heads_dir`` that records ``model_dir``'s model by an older
    fingerprint; returns {"restamped": [...], "current": [...], "other": [...], "any": [...]}
    (head folder names). With ``check``, nothing is written."""
    card = read_card(Path(model_dir))
    new, old = compute_fingerprint(card, Path(model_dir)), legacy_fingerprint(card, Path(model_dir))
    out: dict[str, list[str]] = {"restamped": [], "current": [], "other": [], "any": []}
    for manifest in sorted(Path(heads_dir).glob("*/manifest.json")):
        name = manifest.parent.name
        recorded = (json.loads(manifest.read_text(encoding="utf-8")).get("encoder") or {}).get("fingerprint")
        if recorded == new:
            out["current"].append(name)
        elif recorded == old:
            if not check:  # a textual replace keeps each manifest's own layout
                text = manifest.read_text(encoding="utf-8")
                manifest.write_text(text.replace(f'"{old}"', f'"{new}"'), encoding="utf-8")
            out["restamped"].append(name)
        elif recorded == "any":
            out["any"].append(name)
        else:
            out["other"].append(name)
    out["fingerprint"] = [new]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heads", type=Path, default=HEADS_DIR, help="Folder of head modules (default: contrib_heads)."
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help="Model folder (default: the embedded model)."
    )
    parser.add_argument(
        "--check", action="store_true", help="Write nothing; exit 1 when a head records an older fingerprint."
    )
    args = parser.parse_args(argv)
    done = restamp(args.heads, args.model, check=args.check)
    print(f"model fingerprint {done['fingerprint'][0]}")
    for what in ("restamped", "current", "any", "other"):
        if done[what]:
            verb = "stale" if what == "restamped" and args.check else what
            print(f"{verb}: {', '.join(done[what])}")
    return 1 if args.check and done["restamped"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the embedded default model folder reproducibly: ``python -m engine.default_model.build``.

Writes ``model.json``, seeded encoder weights, a WordPiece vocabulary trained on generated
radiology-report text, a small BERT text tower in Hugging Face layout and the text projection.
The same seed gives byte-identical files (and so the same fingerprint). Nothing is downloaded.
Weights are an initialisation; a training recipe may overwrite them, keeping this layout.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "spacing": [3.0, 3.0, 3.0],
    "input_size": [64, 64, 64],
    "intensity": {"clip_percentiles": [0.5, 99.5], "normalize": "zscore"},
    "tile_overlap": 0.25,
}

ENCODER: dict[str, Any] = {
    "architecture": "vit3d",
    "weights": "encoder.safetensors",
    "in_channels": 1,
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "layer_norm_eps": 1e-6,
    "feature_layers": [1, 3, 5],
}

JOINT_DIM = 64

BERT_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

TEXT_MAX_LENGTH = 64
VOCAB_SIZE = 3000

# --- generated report text -------------------------------------------------------------------

REGIONS: dict[str, dict[str, list[str]]] = {
    "brain": {
        "organ": [
            "brain parenchyma",
            "white matter",
            "gray matter",
            "cerebral cortex",
            "basal ganglia",
            "thalamus",
            "cerebellum",
            "brainstem",
            "corpus callosum",
        ],
        "fluid": [
            "lateral ventricles",
            "third ventricle",
            "fourth ventricle",
            "sulci",
            "cisterns",
            "cerebrospinal fluid",
        ],
        "places": [
            "left frontal lobe",
            "right frontal lobe",
            "left parietal lobe",
            "right parietal lobe",
            "left temporal lobe",
            "right temporal lobe",
            "occipital lobe",
            "periventricular white matter",
            "centrum semiovale",
            "cerebellar hemisphere",
        ],
    },
    "knee": {
        "organ": [
            "distal femur",
            "proximal tibia",
            "patella",
            "fibular head",
            "bone marrow",
            "articular cartilage",
            "medial meniscus",
            "lateral meniscus",
            "anterior cruciate ligament",
            "posterior cruciate ligament",
        ],
        "fluid": ["joint effusion", "synovial fluid", "suprapatellar recess", "baker cyst"],
        "places": [
            "medial femoral condyle",
            "lateral femoral condyle",
            "tibial plateau",
            "patellofemoral compartment",
            "intercondylar notch",
            "posterior horn of the medial meniscus",
        ],
    },
    "spine": {
        "organ": [
            "vertebral bodies",
            "spinal cord",
            "conus medullaris",
            "intervertebral discs",
            "facet joints",
            "posterior elements",
        ],
        "fluid": ["thecal sac", "cerebrospinal fluid", "spinal canal", "neural foramina"],
        "places": [
            "cervical spine",
            "thoracic spine",
            "lumbar spine",
            "L4-L5 level",
            "L5-S1 level",
            "C5-C6 level",
            "T12 vertebral body",
            "sacrum",
        ],
    },
    "abdomen": {
        "organ": [
            "liver",
            "spleen",
            "pancreas",
            "kidneys",
            "adrenal glands",
            "gallbladder",
            "bowel loops",
            "abdominal wall",
        ],
        "fluid": ["urinary bladder", "gallbladder", "ascites", "renal collecting system", "biliary tree"],
        "places": [
            "right hepatic lobe",
            "left hepatic lobe",
            "segment VII of the liver",
            "upper pole of the left kidney",
            "lower pole of the right kidney",
            "pancreatic head",
            "splenic hilum",
        ],
    },
}

CONTRASTS = {
    "T1": ["T1-weighted", "T1 weighted", "T1"],
    "T2": ["T2-weighted", "T2 weighted", "T2"],
    "FLAIR": ["FLAIR", "fluid attenuated inversion recovery", "T2 FLAIR"],
    "PD": ["proton density", "PD-weighted", "PD"],
}

SIGNALS = [
    "hyperintense",
    "hypointense",
    "isointense",
    "heterogeneous",
    "homogeneous",
    "bright",
    "dark",
    "mixed signal",
]
SHAPES = ["round", "oval", "ellipsoid", "spherical", "lobulated", "well-circumscribed", "ill-defined", "irregular"]
NORMAL_PHRASES = [
    "No acute abnormality.",
    "No focal lesion is identified.",
    "Normal signal intensity throughout.",
    "No mass effect or midline shift.",
    "No abnormal enhancement.",
    "The visualised structures are unremarkable.",
    "No evidence of fracture or marrow edema.",
    "No free fluid.",
]
NUMBER_WORDS = ["one", "two", "three", "four", "single", "multiple", "several", "few"]

# Plain English and general medical words so that queries outside the report templates still
# tokenize into meaningful pieces rather than single characters.
BASIC_WORDS = """
the a an and or of in on at to with without from by for is are was were be been has have had no not
there this that these those which what where when who how it its as than then also both either
left right upper lower anterior posterior medial lateral superior inferior central peripheral
proximal distal deep superficial bilateral unilateral diffuse focal small large mild moderate severe
new old stable increased decreased unchanged normal abnormal likely possible probable consistent
finding findings impression history indication comparison technique examination study series image
images scan scans sequence sequences axial sagittal coronal oblique slice slices thickness resolution
contrast enhancement enhancing gadolinium diffusion restriction signal intensity artifact motion
volume size measure measures measuring measurement millimetre millimetres millimeter millimeters
centimetre centimeters ml mm cm cc region regions area areas organ organs tissue tissues fluid fluids
body head neck chest abdomen pelvis spine knee brain joint bone bones muscle muscles tendon tendons
ligament ligaments cartilage marrow cord nerve nerves vessel vessels artery arteries vein veins blood
lesion lesions mass masses nodule nodules cyst cysts tumor tumour tumors metastasis metastases edema
oedema inflammation infection infarct infarction hemorrhage haemorrhage ischemia ischaemia atrophy
degeneration degenerative disease disorder injury tear tears rupture fracture effusion stenosis
herniation protrusion bulge compression displacement collection abscess necrosis calcification
scar scarring fibrosis fat fatty water iron sclerosis multiple benign malignant suspicious
patient male female adult child year years old age follow up follow-up recommend recommended
correlation clinical further evaluation biopsy surgery treatment therapy response progression
present absent seen noted identified demonstrated shows show showing appears appear appearing
within along adjacent near around between across into over under involving extending measuring
hyperintensity hypointensity signal change changes pattern patterns border margin margins wall
total number count largest smallest dominant predominant scattered confluent punctate nodular
liver kidney spleen pancreas bladder bowel stomach colon prostate uterus ovary adrenal gallbladder
ventricle ventricles cortex parenchyma hemisphere lobe lobes cerebellum brainstem skull scalp
femur tibia patella fibula meniscus menisci condyle plateau vertebra vertebrae disc discs canal
foramen foramina sacrum coccyx cervical thoracic lumbar sacral
one two three four five six seven eight nine ten zero first second third
about above after again against all almost alone already always among another any anything
because before behind below beside best better beyond but can cannot could did do does doing done
down during each early end enough even ever every except few find found give given go going good
great half hard help here high higher highest however if image just keep known last late later least
less like little long look low lower lowest made main make many may might more most much must near
nearly need never next nothing now often only open other others our out outside over part per perhaps
place point points quite rather really same should side since so some something sometimes soon still
such take than through thus time times together too toward towards under until up upon usually very
well what whether while whole why will would yes yet
abnormality abnormalities acute chronic subacute recurrent residual postoperative postsurgical
anatomy anatomical appearance architecture asymmetry asymmetric axis baseline boundary cavity
characteristic characterised characterized circumscribed compartment component configuration
congenital contour cortical cystic density deformity dense dilated dilatation distribution enlarged
enlargement extent exudate filling fissure fluid-filled fragment gland glandular hypertrophy
intact interval involvement irregularity lining localised localized lobulated lumen mesh midline
morphology narrowing nodularity obstruction opacity orientation outline parenchymal perfusion
periventricular pleural posterior prominent prominence proportion radiologist radiology report
resection rim septated septation shape solid space structure structures subchondral subcutaneous
surrounding swelling symmetric symmetry thickened thickening thin trace uniform variant vascular
ventral dorsal cranial caudal rostral frontal parietal temporal occipital insular hippocampus
amygdala pituitary sella orbit orbits sinus sinuses mastoid cerebral cerebellar spinal vertebral
hepatic renal splenic pancreatic biliary portal pelvic femoral tibial patellar meniscal cruciate
collateral quadriceps hamstring achilles rotator cuff shoulder hip ankle wrist elbow hand foot
weighted weighting inversion recovery echo gradient spin turbo fast field strength tesla scanner
protocol acquisition reconstruction voxel voxels isotropic anisotropic spacing matrix noise
""".split()


def report(rng: random.Random) -> str:
    """One generated radiology-report-like text (findings and impression)."""
    region = rng.choice(sorted(REGIONS))
    parts = REGIONS[region]
    contrast = rng.choice(sorted(CONTRASTS))
    seq = rng.choice(CONTRASTS[contrast])
    plane = rng.choice(["axial", "sagittal", "coronal", "oblique"])
    lines = [f"MRI of the {region}. {seq} {plane} images were obtained."]
    lines.append(f"The {rng.choice(parts['organ'])} shows normal signal intensity on {seq} images.")
    lines.append(
        f"The {rng.choice(parts['fluid'])} {rng.choice(['is', 'appears'])} {rng.choice(['normal in size', 'unremarkable', 'mildly prominent', 'within normal limits'])}."
    )
    n = rng.choice([0, 0, 1, 1, 2, 3])
    if n == 0:
        lines.append(rng.choice(NORMAL_PHRASES))
        impression = f"Impression: normal {contrast} MRI of the {region}; no lesion."
    else:
        total = 0.0
        for _ in range(n):
            size = rng.randint(3, 40)
            total += 4.0 / 3.0 * 3.14159 * (size / 20.0) ** 3
            lines.append(
                f"A {size} mm {rng.choice(SHAPES)} {rng.choice(SIGNALS)} lesion in the {rng.choice(parts['places'])}."
            )
        count = "a single lesion" if n == 1 else f"{NUMBER_WORDS[n - 1]} lesions"
        impression = f"Impression: {count} in the {region}, total lesion volume {total:.1f} mL."
    lines.append(impression)
    return " ".join(lines)


def corpus(seed: int = 0, n_reports: int = 4000) -> Iterator[str]:
    """Generated reports, short queries and the basic word list, in a fixed order."""
    rng = random.Random(seed)
    for _ in range(n_reports):
        yield report(rng)
    for region, parts in sorted(REGIONS.items()):
        for _, names in sorted(CONTRASTS.items()):
            for name in names:
                yield f"{name} MRI of the {region}"
        for group in ("organ", "fluid", "places"):
            for phrase in parts[group]:
                yield f"{phrase} lesion in the {region}"
    yield " ".join(BASIC_WORDS)


# --- writers ---------------------------------------------------------------------------------


def word_counts(texts: list[str]) -> dict[str, int]:
    """Lower-cased words as BERT's normaliser and pre-tokenizer split them, with counts."""
    from tokenizers import normalizers, pre_tokenizers  # heavy: only building or training the default model needs it

    norm = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    return counts


def learn_wordpiece(counts: dict[str, int], vocab_size: int) -> list[str]:
    """Deterministic WordPiece vocabulary learning (greedy pair merges, continuation pieces
    prefixed ``##``), ties broken by the pieces' text.

    The ``tokenizers`` trainer gives a different vocabulary from run to run (hash-ordered ties),
    which would change the model's fingerprint on every rebuild, hence this small learner.
    """
    splits = {w: [w[0]] + ["##" + c for c in w[1:]] for w in sorted(counts)}
    vocab = list(SPECIAL_TOKENS)
    # Every printable ASCII character, word-initial and continuing, so no word falls to [UNK].
    alphabet = {c for c in string.printable if not c.isspace() and not c.isupper()}
    alphabet |= {s[-1] for syms in splits.values() for s in syms}
    vocab += sorted(alphabet) + sorted("##" + c for c in alphabet)
    known = set(vocab)
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[str]] = {}

    def account(word: str, sign: int) -> None:
        syms = splits[word]
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + sign * counts[word]
            if sign > 0:
                where.setdefault(pair, set()).add(word)

    for word in splits:
        account(word, +1)
    while len(vocab) < vocab_size:
        live = [(n, p) for p, n in pair_counts.items() if n > 0]
        if not live:
            break
        _, (a, b) = min(live, key=lambda np_: (-np_[0], np_[1]))
        merged = a + b[2:]
        for word in sorted(where.pop((a, b), ())):
            account(word, -1)
            syms, out, i = splits[word], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[word] = out
            account(word, +1)
        pair_counts.pop((a, b), None)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return vocab


def build_tokenizer(text_dir: Path, seed: int, vocab_size: int = VOCAB_SIZE) -> int:
    """Learn a lower-casing WordPiece vocabulary on the generated corpus and write the Hugging
    Face tokenizer files (vocab.txt, tokenizer.json, tokenizer_config.json, special tokens).

    Returns the vocabulary size.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )  # heavy: only building or training the default model needs it

    vocab = learn_wordpiece(word_counts(list(corpus(seed))), vocab_size)
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    tok.save(str(text_dir / "tokenizer.json"))
    special = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": TEXT_MAX_LENGTH, **special}
    _write_json(text_dir / "tokenizer_config.json", config)
    _write_json(text_dir / "special_tokens_map.json", special)
    return len(vocab)


def _init_(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Seeded initialisation independent of any library's own init code."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std, generator=generator)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def build_text_tower(folder: Path, text_dir: Path, vocab_size: int, seed: int) -> None:
    """Write config.json and model.safetensors (BertModel, no pooler) and the text projection."""
    from transformers import BertConfig, BertModel  # heavy: only building or training the default model needs it

    config = {**BERT_CONFIG, "vocab_size": vocab_size}
    _write_json(text_dir / "config.json", config)
    bert = BertModel(BertConfig(**config), add_pooling_layer=False)
    gen = torch.Generator().manual_seed(seed + 1)
    _init_(bert, gen)
    state = {k: v.detach().contiguous().clone() for k, v in bert.state_dict().items()}
    save_file(state, str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    proj = nn.Linear(config["hidden_size"], JOINT_DIM)
    _init_(proj, gen)
    save_file(
        {k: v.detach().contiguous() for k, v in proj.state_dict().items()}, str(folder / "text_projection.safetensors")
    )


def build_encoder(folder: Path, card: dict[str, Any], seed: int) -> None:
    from engine.model import build_encoder as make  # the recipe loads the run path and fitting only when it runs

    encoder = make(card)
    encoder.init_weights(torch.Generator().manual_seed(seed))
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / card["encoder"]["weights"]))


def make_card(seed: int) -> dict[str, Any]:
    return {
        "name": "mrfm-default",
        "version": "0.1.0",
        "format": 1,
        "description": "Small 3D ViT image encoder and BERT text tower embedded in mrfm, sharing a 64-d joint space.",
        "license": "Apache-2.0",
        "encoder": dict(ENCODER),
        "joint_dim": JOINT_DIM,
        "text": {
            "folder": "text",
            "projection": "text_projection.safetensors",
            "pooling": "mean",
            "max_length": TEXT_MAX_LENGTH,
        },
        "preprocessing": PREPROCESSING,
        "training": {
            "recipe": "python -m engine.default_model.build",
            "seed": seed,
            "status": "initialised",
            "note": "Seeded initialisation; the WordPiece vocabulary is trained on generated report text.",
        },
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build(out: Path = HERE, seed: int = 0) -> str:
    """Write the model folder to ``out``; return its fingerprint."""
    from engine.model import load_model  # the recipe loads the run path and fitting only when it runs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card = make_card(seed)
    build_encoder(out, card, seed)
    text_dir = out / card["text"]["folder"]
    vocab_size = build_tokenizer(text_dir, seed)
    build_text_tower(out, text_dir, vocab_size, seed)
    _write_json(out / "model.json", card)
    return load_model(out).fingerprint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="model folder to write (default: the embedded one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fingerprint = build(args.out, args.seed)
    print(f"wrote {args.out} ({fingerprint})")


if __name__ == "__main__":
    main()

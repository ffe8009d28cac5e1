"""Published numbers that normbench's tables are held against, as plain data.

Transcribed from docs/papers.md, section 1 (ImageNet, ResNet-50, single 224 center crop, 8 GPUs,
per-GPU BN statistics). Conventions:

* GN-paper tables are top-1 **error** %, the SN-paper table is top-1 **accuracy** %.
* "Batch" is always images per GPU; SN settings are ``(gpus, images_per_gpu)`` tuples.
* ``None`` means the paper has no number for that cell (see the entry's ``notes`` for why).
* Every table carries ``source`` (where the numbers come from) and ``caveat`` (how far to trust them);
  per-cell caveats live in ``notes`` / ``single_sourced``.

Nothing here is computed; derived rows (e.g. BN - GN) are computed by the report from these values. The
other published figures (ResNet-101, Batch Renorm, WS, FRN, EvoNorm, CIFAR) live in docs/papers.md only: no
table of the report is held against them yet.
"""

from __future__ import annotations

GN_PAPER = "Wu & He, Group Normalization, ECCV 2018 (arXiv 1803.08494)"
SN_PAPER = "Luo et al., Differentiable Learning-to-Normalize via Switchable Normalization, ICLR 2019 (arXiv 1806.10779)"

# --- GN paper -------------------------------------------------------------------------------------

GN_TABLE1 = {
    "title": "GN Table 1: ResNet-50 top-1 error at 32 images/GPU",
    "metric": "top1_error",
    "setting": {"gpus": 8, "per_gpu_batch": 32},
    "values": {"bn": 23.6, "ln": 25.3, "in": 28.4, "gn": 24.1},
    "source": GN_PAPER + ", Table 1",
    "caveat": "Stated in the paper's table and text.",
}

GN_TABLE2 = {
    "title": "GN Table 2 / Figure 1: top-1 error vs images per GPU",
    "metric": "top1_error",
    "setting": {"gpus": 8},
    "batches": (32, 16, 8, 4, 2),
    "values": {
        "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
        "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    },
    # As printed by the paper (BN - GN): -0.5, -0.5, 0.8, 3.1, 10.6. Kept for cross-checking only.
    "printed_bn_minus_gn": {32: -0.5, 16: -0.5, 8: 0.8, 4: 3.1, 2: 10.6},
    "source": GN_PAPER + ", Table 2 and Figure 1",
    "caveat": "Stated in the paper's table.",
}

GN_TABLE3_GROUPS = {
    "title": "GN Table 3 (top): group number G, 32 images/GPU",
    "metric": "top1_error",
    "setting": {"gpus": 8, "per_gpu_batch": 32},
    "values": {64: 24.6, 32: 24.1, 16: 24.6, 8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3},
    "single_sourced": (16, 8, 4, 2),
    "notes": {1: "G=1 is LN", 32: "best"},
    "source": GN_PAPER + ", Table 3",
    "caveat": "Middle cells (G=16, 8, 4, 2) come from one secondary source only; "
    "the best cell (G=32) and the ends (G=64, G=1) are stated in the paper's text.",
}

GN_TABLE3_CHANNELS = {
    "title": "GN Table 3 (bottom): channels per group, 32 images/GPU",
    "metric": "top1_error",
    "setting": {"gpus": 8, "per_gpu_batch": 32},
    "values": {64: 24.4, 32: 24.5, 16: 24.2, 8: 24.3, 4: 24.8, 2: 25.6, 1: 28.4},
    "single_sourced": (32, 8, 4, 2),
    "notes": {
        1: "1 channel per group is IN",
        16: "best",
        64: "G = C/64 differs per layer; a 64-channel layer gets G=1",
    },
    "source": GN_PAPER + ", Table 3",
    "caveat": "Middle cells (32, 8, 4, 2 channels/group) come from one secondary source only; "
    "the best cell (16) and the ends (64, 1) are stated in the paper's text.",
}

# --- SN paper -------------------------------------------------------------------------------------

SN_SETTINGS = ((8, 32), (8, 16), (8, 8), (8, 4), (8, 2), (1, 16), (1, 32), (8, 1), (1, 8))

SN_TABLE = {
    "title": "SN paper: ResNet-50 top-1 accuracy by (GPUs, images/GPU)",
    "metric": "top1_accuracy",
    "settings": SN_SETTINGS,
    "values": {
        "bn": {
            (8, 32): 76.4,
            (8, 16): 76.3,
            (8, 8): 75.2,
            (8, 4): 72.7,
            (8, 2): 65.3,
            (1, 16): 76.2,
            (1, 32): 76.5,
            (8, 1): None,
            (1, 8): 75.4,
        },
        "gn": {
            (8, 32): 75.9,
            (8, 16): 75.8,
            (8, 8): 76.0,
            (8, 4): 75.8,
            (8, 2): 75.9,
            (1, 16): 75.9,
            (1, 32): 75.8,
            (8, 1): 75.5,
            (1, 8): 75.5,
        },
        "sn": {
            (8, 32): 76.9,
            (8, 16): 76.7,
            (8, 8): 76.7,
            (8, 4): 75.9,
            (8, 2): 75.6,
            (1, 16): 76.3,
            (1, 32): 76.6,
            (8, 1): 75.0,
            (1, 8): 75.9,
        },
    },
    "notes": {("bn", (8, 1)): "diverges", ("sn", (8, 1)): "IN and LN only, BN dropped"},
    "source": SN_PAPER + ", main ImageNet table",
    "caveat": "Stated in the paper's table.",
}

SN_IMPORTANCE_BN_SHARE = {
    "values": {(8, 32): 0.58, (8, 2): 0.15, (8, 1): 0.0},
    "source": SN_PAPER + ", importance-weight figure",
    "caveat": "Read off a chart (approximate); one BN share, not split into mean and variance weights.",
}

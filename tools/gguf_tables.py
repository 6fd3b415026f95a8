#!/usr/bin/env python3
"""Write gguf_tables.c, the value tables of the GGUF block formats, from gguf-py.

    tests/data/venv-gguf/bin/python tools/gguf_tables.py > gguf_tables.c

The i-quant grids come from the pinned gguf-py (gguf==0.19.0, the venv of tests/test_gguf.sh):
each class's grid_hex, read as little-endian 16-bit words, one word per grid point, is exactly
how gguf-py packs them. tests/test_gguf.py checks the result: it decodes blocks that use every
grid entry and every sign pattern and compares with gguf.quants.dequantize.
"""
import sys

from gguf import quants

GRIDS = [  # (C name, gguf-py class, what)
    ("gguf_iq2xxs_grid", quants.IQ2_XXS, "IQ2_XXS: 256 points of 8 coordinates"),
    ("gguf_iq2xs_grid", quants.IQ2_XS, "IQ2_XS: 512 points of 8 coordinates"),
    ("gguf_iq2s_grid", quants.IQ2_S, "IQ2_S: 1024 points of 8 coordinates"),
    ("gguf_iq3xxs_grid", quants.IQ3_XXS, "IQ3_XXS: 256 points of 4 coordinates"),
    ("gguf_iq3s_grid", quants.IQ3_S, "IQ3_S: 512 points of 4 coordinates"),
    ("gguf_iq1s_grid", quants.IQ1_S, "IQ1_S and IQ1_M: 2048 points of 8 coordinates"),
]

HEAD = """\
/* gguf_tables.c - the value tables of the GGUF block formats: data only, included by
 * gguf_blocks.c. Written by tools/gguf_tables.py from gguf-py 0.19.0 (gguf/quants.py);
 * tests/test_gguf.py decodes blocks that use every entry and compares with gguf-py.
 *
 * The i-quant grids (llama.cpp's iq2xxs_grid ... iq1s_grid in ggml-common.h) list lattice
 * points: grid index -> 8 coordinates (IQ1, IQ2) or 4 (IQ3). Each point is one 16-bit word
 * of codes into the type's coordinate values, as gguf-py packs them: 2 bits per coordinate
 * in the IQ1 and IQ2 grids (coordinate j = bits 2j..2j+1), 4 bits in the IQ3 grids
 * (coordinate j = bits 4j..4j+3). So IQ2_XXS's word 0x0002 is the point (43, 8, 8, 8, 8, 8,
 * 8, 8), which ggml-common.h writes as 0x080808080808082b. */
#include <stdint.h>

/* The 16 values of IQ4_NL and IQ4_XS (kvalues_iq4nl in ggml-common.h). */
static const int8_t gguf_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                              1,    13,   25,  38,  53,  69,  89,  113};

/* MXFP4's FP4 (E2M1) values, doubled so they are integers (kvalues_mxfp4): code 0..7 is
 * +0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign. The block scale carries the factor 1/2. */
static const int8_t gguf_kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* The coordinate values the grid codes stand for. */
static const float gguf_iq2_coords[3] = {8, 25, 43};                      /* 0x08, 0x19, 0x2b */
static const float gguf_iq3xxs_coords[8] = {4, 12, 20, 28, 36, 44, 52, 62}; /* 0x04 ... 0x3e */
static const float gguf_iq3s_coords[8] = {1, 3, 5, 7, 9, 11, 13, 15};
static const float gguf_iq1_coords[3] = {-1, 0, 1};
"""


def words(cls):
    h = cls.grid_hex
    b = bytes(int(h[i:i + 2], 16) for i in range(0, len(h), 2))
    w = [b[i] | b[i + 1] << 8 for i in range(0, len(b), 2)]
    assert len(w) == cls.grid_shape[0], cls
    return w


def main():
    out = [HEAD]
    for name, cls, what in GRIDS:
        w = words(cls)
        out.append(f"\n/* {what} */\nstatic const uint16_t {name}[{len(w)}] = {{\n")
        for i in range(0, len(w), 12):
            out.append("    " + " ".join(f"0x{x:04x}," for x in w[i:i + 12]) + "\n")
        out.append("};\n")
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()

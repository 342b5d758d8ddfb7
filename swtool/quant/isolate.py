"""Isolating super weights in their quantization blocks, by reordering a layer's MLP channels.

What a block can hold: a Q4_0 block is one f16 scale d and 32 four-bit codes, value
= d * (q - 8). To hold a super weight S exactly, |d| must be |S| / 8, and then every
other weight of its block with |w| < |d| / 2 rounds to zero: in SmolLM2, S = -5.3
zeroes its 31 neighbours in row 507. Q8_0 (d = |S| / 127) zeroes the small ones, and
a K-quant super-block coarsens the sub-block scales of all 256 values. So a block
format cannot "clip the super weight, quantize, then restore it" inside one block: the
restored value does not fit the scale the clipped block was given.

What a model allows: the MLP's intermediate channels can be put in any order,
    down(silu(gate(x)) * up(x)),
as long as the rows of gate and up and the columns of down move together: the
function is exactly the same. Blocks run along the columns of ffn_down, so the
order decides which weights share a block with the super weight. `isolation_order`
keeps each super weight where it is and swaps its block-mates with columns of another
block (the donor) that fit the super weight's coarse grid: near zero, or near a
multiple of its step (|S| / 8 for 4-bit types). The displaced block-mates, now away
from the super weight, get a scale of their own. Each super weight gets a block to
itself (two in one block cannot both be exact: 5.875 beside 6.0625 in one Q4_0 block
becomes 6.0625). The donor is the block for which the real quantizer gives the
super-weight rows the smallest error, and a swap is made only if that error is
smaller than without it, so only two blocks per row change and the rows holding
super weights never get worse. The super weight itself stays exact (for Q4_0,
d = S / -8 is an f16 when S is a bf16 value). It costs no byte, and the file loads in
stock llama.cpp; but column m of the stored ffn_down is no longer column m of the
source, so the order is recorded in the metadata (gguf_keys.py).
"""

import numpy as np

from swtool.block_types import BY_NAME



def block_error(values, qtype):
    """Squared error of quantizing `values` [rows, block] to qtype and back."""
    from swtool.quant import dequantize, quantize

    values = np.ascontiguousarray(values, dtype=np.float32)
    back = dequantize(quantize(values, qtype), qtype, values.shape)
    return float(np.square(back.astype(np.float64) - values).sum())


def isolation_order(super_rows, super_cols, qtype):
    """Stored channel i <- source channel order[i], for one layer; int64 [n_ff].

    super_rows: float32 [k, n_ff], the rows of the layer's ffn_down that hold super weights;
    super_cols: their columns; qtype: ffn_down's block type (a GGMLQuantizationType).
    """
    block = BY_NAME[qtype.name].block_values
    n_ff = super_rows.shape[1]
    n_blocks = n_ff // block
    cols = sorted({int(c) for c in super_cols})
    order = np.arange(n_ff)

    def error(order, blocks):  # the super-weight rows' error in these blocks under `order`
        return sum(block_error(super_rows[:, order[b * block:(b + 1) * block]], qtype) for b in blocks)

    for col in cols:
        position = int(np.flatnonzero(order == col)[0])
        home = position // block
        # how badly each column fits the super weight's grid, in the rows holding super weights
        # the super weight's block has a grid of |S| / 2**(bits - 1), bits those of a value's code
        step = np.abs(super_rows[:, col]).max() / 2 ** (BY_NAME[qtype.name].code_bits - 1)
        misfit = np.square(super_rows - step * np.round(super_rows / step)).sum(axis=0)
        home_positions = np.array([p for p in range(home * block, (home + 1) * block) if p != position])
        best, best_gain = None, 0.0
        for donor in range(n_blocks):
            members = order[donor * block:(donor + 1) * block]
            if donor == home or np.isin(members, cols).any():
                continue
            # the block - 1 donor columns that fit the grid best trade places with the block-mates
            donor_positions = donor * block + np.argsort(misfit[members], kind="stable")[:block - 1]
            trial = order.copy()
            trial[home_positions], trial[donor_positions] = order[donor_positions], order[home_positions]
            gain = error(order, (home, donor)) - error(trial, (home, donor))
            if gain > 0 and (best is None or gain > best_gain):
                best, best_gain = trial, gain
        if best is not None:
            order = best
    return order


def stored_position(order, source_channel):
    """Where source channel `source_channel` sits in the stored order."""
    return int(np.flatnonzero(order == source_channel)[0])

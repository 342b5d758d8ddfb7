"""A 2-D tensor stored transposed, [in, out], seen as the [out, in] matrix W the rest of swtool uses.

GPT-2's Conv1D layers store their weight as [in_features, out_features] and
compute x @ stored, where nn.Linear stores [out, in] and computes x @ W.T.
Wrapping such a tensor in `TransposedTensor` makes it look like an nn.Linear
weight, W = stored.T, so linears, world edits, weight transforms and detection
all address W[row, col] with row = output channel j and col = input channel m,
in every family alike. That element lives at stored[col, row] (`stored_index`):
the catalog names the real tensor and gives that index too.
"""

from dataclasses import dataclass

from swtool.checkpoint.safetensors import FLOAT_DTYPES, TensorInfo, decode_float32
from swtool.errors import CheckpointError


@dataclass(frozen=True)
class TransposedTensor:
    stored: TensorInfo  # the tensor as it is in the file, [in, out]

    @property
    def name(self):
        return self.stored.name

    @property
    def dtype(self):
        return self.stored.dtype

    @property
    def path(self):
        return self.stored.path

    @property
    def shape(self):
        """W's shape, [out, in]."""
        return tuple(reversed(self.stored.shape))

    @staticmethod
    def stored_index(index):
        """Where W[row, col] is in the stored tensor: [col, row]."""
        row, col = index
        return (col, row)

    def element_offset(self, index):
        """Absolute file offset of W[row, col]."""
        return self.stored.element_offset(self.stored_index(index))

    def read(self, rows=None):
        """W (or only its `rows`) as a new C-ordered float32 array: columns of the stored tensor."""
        if self.dtype not in FLOAT_DTYPES:
            raise CheckpointError(self.path, f"tensor {self.name!r} has dtype {self.dtype}; "
                                             f"swtool reads {', '.join(FLOAT_DTYPES)}")
        return self.stored.with_stored(lambda stored: decode_float32(_columns(stored, rows).T, self.dtype))

    def with_stored(self, use, rows=None):
        """use(view) with view = rows of W over the stored bits: a transposed, non-contiguous view
        (kernels.matmul_stored recognises it and multiplies column-wise)."""
        return self.stored.with_stored(lambda stored: use(_columns(stored, rows).T))


def _columns(stored, rows):
    """The stored [in, out] array's columns that are W's `rows` (all when None)."""
    return stored if rows is None else stored[:, rows]

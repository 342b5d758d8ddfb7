"""Simulated quantization during the streaming eval (the paper's section 4): no file is written.

Weights (`swtool quantsim --block-sizes ...`), as the paper's `quantize_blockwise`
(LLMSuperWeight outliers/functional/quantization.py):
  - a matrix is cut into flat 1-D blocks, `weight.reshape(-1, block)` of the HF
    [out, in] layout (row-major, so a block of 16384 is not a 128 x 128 tile);
  - each block is quantized asymmetric min-max to b bits: scale = (2^b - 1) / (max - min),
    q = round((w - min) * scale), w' = q / scale + min (round half to even, as torch.round);
  - RTN is exactly that. Super-weight-aware first clips the outliers of every block
    (zscore:Z clamps |w| to Z * std(|w|) + mean(|w|) of the block, std with Bessel's
    correction as torch.std; percentile:P clamps to the k-th largest |w| of the whole
    tensor, k = max(int(numel * P), 1), as the paper's `tensor_percentage`), then
    quantizes, then writes the super weights back with their original values;
  - quantized: every 2-D weight but norms, embeddings and the LM head (the paper skips
    names with "norm", "embed_tokens", "lm_head"; experiments.control_matrices is that set).
Where swtool departs from the paper's code, and why:
  - a tensor whose size is not a multiple of the block gets a shorter last block;
    the paper's code silently quantizes such a tensor as one block (SmolLM2's q_proj,
    576 x 576, is not a multiple of 16384, so its "16384" would be "tensor");
  - a constant block (max = min) is left as it is; the paper's scale would be inf and give NaN;
  - the arithmetic is float32 (the paper ran it in the model's fp16).

Activations (`--activations int8`), as SmoothQuant's W8A8 fake quantization of the
input of every linear layer (its `quantize_activation_per_tensor_absmax`):
scale = max|x| / 127 over the whole input of one sequence, x' = round(x / scale) * scale.
The weights stay as stored. The LM head's input is not quantized (SmoothQuant keeps it).
With super-activation handling (the paper: replace the super activation by the median,
quantize, dequantize, restore it in full precision), the super activation is the
down_proj input at each super weight's column m in its layer, at the token where
|x[:, m]| is largest in that sequence: the one value the super weight multiplies to
make the super activation. The residual channel j (the super weight's row) is not
the input of any linear: every linear after it reads it through an RMSNorm, which
divides token 0 by its own huge RMS (in SmolLM2 that channel is below 31 in every
normed input, while layer 11's down_proj input reaches 2,826 at column 1229).
"""

from dataclasses import dataclass, field

import numpy as np

from swtool.errors import SwtoolError

TENSOR = "tensor"  # block size: the whole tensor is one block
CLIP_METHODS = ("zscore", "percentile", "none")
SCHEMA_ID = "swtool.quantsim/1"  # what `swtool quantsim --json` prints: swtool/schema/quantsim.schema.json
ACTIVATION_WORLDS = ("unquantized", "int8", "int8, super activation kept")


# --- parsing -----------------------------------------------------------------------------

def parse_block_sizes(text):
    """'32,128,tensor' -> [32, 128, 'tensor']; a one-line error otherwise."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == TENSOR:
            sizes.append(TENSOR)
            continue
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size < 2:
            raise SwtoolError(f"--block-sizes {text!r}: each size must be an integer >= 2 or 'tensor', "
                              f"e.g. 32,128,1024,16384,tensor")
        sizes.append(size)
    if len(set(sizes)) != len(sizes):
        raise SwtoolError(f"--block-sizes {text!r}: a size is repeated")
    return sizes


@dataclass(frozen=True)
class Clip:
    """Outlier clipping before quantization: method zscore (value Z) or percentile (value P), or none."""

    method: str = "none"
    value: float = 0.0

    def __str__(self):
        return "none" if self.method == "none" else f"{self.method}:{self.value:g}"


def parse_clip(text):
    """'zscore:9' / 'percentile:1e-6' / 'none' -> Clip; a one-line error otherwise."""
    method, _, value = text.strip().lower().partition(":")
    if method == "none" and not value:
        return Clip()
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    valid = {"zscore": number > 0, "percentile": 0 < number < 1}
    if method not in valid or not np.isfinite(number) or not valid[method]:
        raise SwtoolError(f"--clip {text!r}: expected zscore:Z (Z > 0), percentile:P (0 < P < 1) or none, "
                          f"e.g. zscore:9 or percentile:1e-6")
    return Clip(method, number)


# --- the weight quantizer ------------------------------------------------------------------

def quantize_blockwise(weight, bits, block_size, clip=Clip()):
    """The paper's block-wise min-max quantization of one tensor, then dequantized.

    weight: float array of any shape; block_size: int or 'tensor'.
    Returns (float32 array of weight's shape, number of elements clipped).
    """
    flat = np.array(weight, dtype=np.float32).reshape(-1)  # a copy: quantized in place below
    size = flat.size if block_size == TENSOR else min(int(block_size), flat.size)
    threshold = None
    if clip.method == "percentile":  # one threshold for the whole tensor: the k-th largest |w|
        k = max(int(flat.size * clip.value), 1)
        threshold = np.partition(np.abs(flat), flat.size - k)[flat.size - k]
    n_full = flat.size // size
    clipped = _quantize_blocks(flat[:n_full * size].reshape(n_full, size), bits, clip, threshold)
    if n_full * size < flat.size:  # the remainder: one shorter block
        clipped += _quantize_blocks(flat[n_full * size:].reshape(1, -1), bits, clip, threshold)
    return flat.reshape(np.shape(weight)), clipped


def _quantize_blocks(blocks, bits, clip, threshold):
    """Quantize and dequantize each row of blocks [n, size] (float32) in place; returns the clipped count."""
    # 1. clip: clamp |w| to a per-block (zscore) or per-tensor (percentile) threshold
    clipped = 0
    if clip.method == "zscore":
        magnitude = np.abs(blocks, dtype=np.float64)
        mean = magnitude.mean(axis=1, keepdims=True)
        std = magnitude.std(axis=1, ddof=1, keepdims=True) if blocks.shape[1] > 1 else 0.0
        threshold = (clip.value * std + mean).astype(np.float32)
    if threshold is not None:
        clipped = int(np.count_nonzero(np.abs(blocks) > threshold))
        np.clip(blocks, -threshold, threshold, out=blocks)
    # 2. asymmetric min-max: the block's range mapped onto the integers 0 .. 2^b - 1
    low = blocks.min(axis=1, keepdims=True)
    high = blocks.max(axis=1, keepdims=True)
    spread = high - low
    constant = spread == 0  # nothing to quantize; the paper's scale would be inf (NaN weights)
    # (2^b - 1) / spread as torch evaluates int / tensor in the paper's code: a reciprocal, then a product
    scale = np.float32(2 ** bits - 1) * (np.float32(1) / np.where(constant, np.float32(1), spread))
    # 3. round to the nearest level and map back, in the paper's order of float32 operations
    levels = np.round((blocks - low) * scale)
    np.copyto(blocks, levels / scale + low, where=~constant)
    return clipped


# --- the weight transform -------------------------------------------------------------------

@dataclass(frozen=True)
class WeightSetting:
    """One row of the weight table: block size, and plain RTN or super-weight-aware."""

    bits: int
    block_size: object  # int or TENSOR
    aware: bool  # clip, quantize, restore the super weights
    clip: Clip = Clip()

    @property
    def label(self):
        method = f"clip {self.clip} + restore" if self.aware else "RTN"
        return f"INT{self.bits} block {self.block_size} {method}"


@dataclass
class QuantizeWeights:
    """Weight transform (forward.py): each quantized matrix is replaced by its quantized copy as it is read.

    shapes: {HF name: (out, in)} of the matrices to quantize (W layout, as linear() reads them);
    keep: {HF name: [(row, col)]} super weights restored after quantization (aware settings);
    read_whole: name -> float32 W [out, in], for a linear that reads a matrix in chunks of rows
    (blocks run across rows, so the whole matrix is quantized once and the chunks cut from it).
    """

    setting: WeightSetting
    shapes: dict
    keep: dict
    read_whole: object
    clipped: dict = field(default_factory=dict)  # name -> elements clipped
    _whole: tuple = (None, None)  # (name, quantized W) of the last matrix read in chunks

    def touches(self, name):
        return name in self.shapes

    def __call__(self, name, weight, rows=None, expert=None):
        if name not in self.shapes or expert is not None:
            return weight  # not quantized (norms, embeddings, the LM head, stacked experts)
        n_out = self.shapes[name][0]
        whole = rows is None or (isinstance(rows, slice) and (rows.start or 0) == 0 and weight.shape[0] == n_out)
        if whole:
            return self._quantize(name, weight)
        if self._whole[0] != name:  # a chunk of rows (or one row, for a world edit): cut from the whole
            self._whole = (name, self._quantize(name, self.read_whole(name)))
        return self._whole[1][rows]

    def _quantize(self, name, weight):
        setting = self.setting
        clip = setting.clip if setting.aware else Clip()
        quantized, self.clipped[name] = quantize_blockwise(weight, setting.bits, setting.block_size, clip)
        if setting.aware:
            for row, col in self.keep.get(name, ()):
                quantized[row, col] = weight[row, col]  # the super weight, exactly as stored
        return quantized


def quantized_matrices(model):
    """{HF name: (out, in)} of the matrices quantsim quantizes: the paper's set (no norms, embeddings, LM head)."""
    from swtool.experiments import control_matrices

    shapes = {}
    for name in control_matrices(model):
        shape = tuple(model.checkpoint.tensor(name).shape)
        if len(shape) != 2:
            continue  # a stacked [experts, out, in] tensor: not quantized
        shapes[name] = shape[::-1] if model.arch.stored_transposed(name) else shape
    return shapes


def whole_reader(model):
    """name -> the whole matrix as float32 W [out, in] (GPT-2's Conv1D read transposed, as linear() does)."""
    from swtool.checkpoint.transposed import TransposedTensor

    def read(name):
        info = model.checkpoint.tensor(name)
        if model.arch.stored_transposed(name):
            info = TransposedTensor(info)
        return info.read()

    return read


def super_weight_positions(super_weights):
    """{tensor name: [(row, col)]} of catalog entries in 2-D tensors (an expert's slice of a stacked tensor is skipped)."""
    keep = {}
    for sw in super_weights:
        keep.setdefault(sw["tensor"], []).append((sw["row"], sw["col"]))
    return keep


# --- the activation hook ----------------------------------------------------------------------

def fake_quantize_absmax(x, bits=8):
    """SmoothQuant's per-tensor absmax fake quantization: x / s rounded, times s, s = max|x| / (2^(b-1) - 1)."""
    scale = np.abs(x).max() / np.float32(2 ** (bits - 1) - 1)
    if scale == 0:
        return x.copy()
    return np.round(x / scale) * scale


@dataclass
class QuantizeActivations:
    """Activation transform (forward.py `linear_input`): int8 inputs of the quantized linears, per sequence.

    modes: {world index: "plain" or "keep"}; worlds not listed stay unquantized.
    "keep": per sequence, the super activation (in `channels` {down_proj name: [col]}, the token
    with the largest |x| of that column) is replaced by the median of the input, the input is
    quantized and dequantized, and the super activation is written back unquantized.
    valid: [B, ctx] real positions of this pass's chunks (padding sets no scale and no median).
    """

    names: set
    modes: dict
    channels: dict
    valid: np.ndarray
    bits: int = 8
    kept: list = field(default_factory=list)  # (linear, row, token, col, value) of each super activation kept

    def __call__(self, point, layer, x, ctx):
        return None  # nothing at the observer points

    def linear_input(self, name, x, ctx):
        if name not in self.names:
            return None
        if x.ndim != 3 or x.shape[0] != len(ctx.world_of_row):
            raise SwtoolError("--activations: the input of a mixture expert is a gather of several sequences; "
                              "per-sequence activation quantization is not supported for mixtures of experts")
        out = x.copy()
        n_sequences = ctx.n_sequences
        for row in range(x.shape[0]):
            mode = self.modes.get(int(ctx.world_of_row[row]))
            if mode is None:
                continue
            real = self.valid[row % n_sequences]
            sequence = x[row, real]  # [real tokens, in]
            work = sequence.copy()
            saved = []
            if mode == "keep":
                # REPLACE: the super activation by the median of this input
                median = np.median(sequence)
                for col in self.channels.get(name, ()):
                    token = int(np.argmax(np.abs(sequence[:, col])))
                    saved.append((token, col, sequence[token, col]))
                    work[token, col] = median
            # QUANTIZE and DEQUANTIZE: one absmax scale for this sequence's input
            work = fake_quantize_absmax(work, self.bits)
            # RESTORE: the super activation in full precision
            for token, col, value in saved:
                work[token, col] = value
                self.kept.append((name, row, token, col, float(value)))
            out[row, real] = work
        return out


def activation_channels(super_weights):
    """{down_proj name: [col]}: where each super weight's input, the super activation's source, enters a linear."""
    channels = {}
    for sw in super_weights:
        if sw.get("expert") is None:
            channels.setdefault(sw["tensor"], [])
            if sw["col"] not in channels[sw["tensor"]]:
                channels[sw["tensor"]].append(sw["col"])
    return channels


# --- running the settings through swtool eval's machinery ---------------------------------------

def run_weights(model, chunks, settings, super_weights, progress=True, batch_tokens=None):
    """Perplexity per weight setting: one eval pass each. Returns [dict] in settings order."""
    from swtool.evaluate import DEFAULT_BATCH_TOKENS, Plan, evaluate
    from swtool.forward import World

    shapes, read = quantized_matrices(model), whole_reader(model)
    keep = super_weight_positions(super_weights)
    n_restored = sum(len(positions) for name, positions in keep.items() if name in shapes)
    results = []
    for setting in settings:
        transform = QuantizeWeights(setting, shapes, keep, read)
        (score,) = evaluate(model, chunks, Plan([World(setting.label)], [transform]), progress=progress,
                            batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS)
        results.append({"block_size": setting.block_size, "method": "aware" if setting.aware else "rtn",
                        "clip": str(setting.clip) if setting.aware else "none", "perplexity": score.perplexity,
                        "nll": score.nll, "predictions": score.count, "clipped": sum(transform.clipped.values()),
                        "restored": n_restored if setting.aware else 0})
    return results


def run_activations(model, chunks, super_weights, bits=8, progress=True, batch_tokens=None):
    """Perplexity unquantized, with int8 linear inputs, and with the super activation kept: one pass, three worlds."""
    from swtool.evaluate import DEFAULT_BATCH_TOKENS, Plan, evaluate
    from swtool.forward import World

    names = set(quantized_matrices(model))
    channels = activation_channels(super_weights)
    hooks = []

    def make(part):
        hooks.append(QuantizeActivations(names, {1: "plain", 2: "keep"}, channels, part.valid(), bits))
        return hooks[-1:]

    worlds = [World(name) for name in ACTIVATION_WORLDS]
    scores = evaluate(model, chunks, Plan(worlds, [], [make]), progress=progress,
                      batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS)
    kept = [k for hook in hooks for k in hook.kept]
    return [{"setting": s.name, "perplexity": s.perplexity, "nll": s.nll, "predictions": s.count}
            for s in scores], kept


# --- one command: settings, result, table ----------------------------------------------------------

@dataclass
class QuantsimOptions:
    """What `swtool quantsim` was asked for."""

    bits: int = 4
    block_sizes: tuple = (32, 128, 1024, 16384, TENSOR)
    clip: Clip = Clip("zscore", 9.0)
    weights: bool = True  # the weight table
    activations: str = "none"  # "none" or "int8": the activation table


def weight_settings(options):
    """RTN and super-weight-aware per block size, in table order."""
    return [WeightSetting(options.bits, size, aware, options.clip)
            for size in options.block_sizes for aware in (False, True)]


def describe_run(model, text_path, n_tokens, chunks, super_weights_from):
    """The head of `swtool quantsim`'s JSON result (what was scored and where the super weights came from);
    run() adds the tables."""
    return {"schema": SCHEMA_ID, "model": str(model.path), "text": str(text_path), "tokens": n_tokens,
            "ctx": chunks.ctx, "chunks": len(chunks.tokens), "super_weights_from": super_weights_from}


def run(model, chunks, super_weights, options, progress=True, batch_tokens=None):
    """Every pass `swtool quantsim` makes; returns the JSON-ready result (without model/text names)."""
    from swtool.evaluate import DEFAULT_BATCH_TOKENS, Plan, evaluate
    from swtool.forward import World

    result = {"super_weights": [{key: sw.get(key) for key in ("layer", "row", "col", "tensor", "value")}
                                for sw in super_weights]}
    baseline = None
    if options.activations != "none":
        rows, kept = run_activations(model, chunks, super_weights, 8, progress, batch_tokens)
        baseline = rows[0]
        result["activations"] = {
            "bits": 8, "scheme": "symmetric per-tensor absmax, per sequence, input of every linear but the LM head",
            "super_activation": [{"linear": name, "col": col} for name, cols in
                                 activation_channels(super_weights).items() for col in cols],
            "kept_values": _kept_summary(kept), "settings": rows}
    if baseline is None:
        (score,) = evaluate(model, chunks, Plan([World("unquantized")]), progress=progress,
                            batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS)
        baseline = {"setting": "unquantized", "perplexity": score.perplexity, "nll": score.nll,
                    "predictions": score.count}
    result["baseline"] = {key: baseline[key] for key in ("perplexity", "nll", "predictions")}
    if options.weights:
        rows = run_weights(model, chunks, weight_settings(options), super_weights, progress, batch_tokens)
        shapes = quantized_matrices(model)
        result["weights"] = {"bits": options.bits, "clip": str(options.clip), "scheme": "asymmetric min-max, flat blocks",
                             "matrices": len(shapes), "elements": int(sum(a * b for a, b in shapes.values())),
                             "settings": rows}
    return result


def _kept_summary(kept):
    """{linear name: {col: largest |value| kept}} of the super activations written back."""
    summary = {}
    for name, _row, _token, col, value in kept:
        entry = summary.setdefault(name, {})
        entry[str(col)] = max(entry.get(str(col), 0.0), abs(value))
    return summary


def format_quantsim(result):
    """The human tables of `swtool quantsim`."""
    from swtool.table import format_table, plural, plural_noun

    base = result["baseline"]
    lines = [f"{result['model']}: {result['text']}, {plural(result['tokens'], 'token')} in "
             f"{plural(result['chunks'], 'chunk')} of {result['ctx']}; {plural(base['predictions'], 'prediction')} "
             f"scored; unquantized perplexity {base['perplexity']:.4f}"]
    sws = result["super_weights"]
    where = ", ".join(f"{sw['layer']}:{sw['row']}:{sw['col']}" for sw in sws) or "none found"
    lines.append(f"super weights ({result['super_weights_from']}): {where}")
    if "weights" in result:
        w = result["weights"]
        lines.append("")
        lines.append(f"weights: INT{w['bits']} {w['scheme']}, {plural(w['matrices'], 'matrix', 'matrices')} "
                     f"({w['elements']:,} {plural_noun(w['elements'], 'element')}; "
                     f"not norms, embeddings, LM head); activations unquantized")
        by_size = {}
        for entry in w["settings"]:
            by_size.setdefault(entry["block_size"], {})[entry["method"]] = entry
        rows = []
        for size, pair in by_size.items():
            rtn, aware = pair["rtn"], pair["aware"]
            rows.append([size, f"{rtn['perplexity']:.6g}", f"{rtn['perplexity'] / base['perplexity']:.4g}",
                         f"{aware['perplexity']:.6g}", f"{aware['perplexity'] / base['perplexity']:.4g}",
                         aware["clipped"], aware["restored"]])
        lines.append(format_table(["block", "RTN", "x base", "SW-aware", "x base", "clipped", "restored"], rows))
        method = w["clip"].split(":")[0]
        clip = {"zscore": f"clip {w['clip']} per block", "percentile": f"clip {w['clip']} of each tensor's |w|",
                "none": "no clipping"}[method]
        lines.append(f"RTN: round to nearest, min-max per block; SW-aware: {clip}, "
                     f"quantize, restore the super weights; block: elements per flat block of W [out, in]")
    if "activations" in result:
        a = result["activations"]
        lines.append("")
        lines.append(f"activations: INT8 {a['scheme']}; weights as stored")
        rows = [[s["setting"], f"{s['perplexity']:.6g}", f"{s['perplexity'] / base['perplexity']:.4g}"]
                for s in a["settings"]]
        lines.append(format_table(["activations", "perplexity", "x base"], rows))
        kept = ", ".join(f"{sa['linear'].replace('model.layers.', 'layers.')}[:, {sa['col']}]"
                         for sa in a["super_activation"]) or "none (no super weight)"
        lines.append(f"super activation kept: replaced by the input's median, quantize, dequantize, written back, "
                     f"at the token with the largest |x| per sequence of {kept}")
    return "\n".join(lines)

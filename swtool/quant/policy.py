"""Which ggml type each tensor of an exported GGUF gets: llama-quantize's rules (src/llama-quant.cpp).

For every tensor, in this order:
  1. Only weights are quantized: names ending in "weight" with at least 2 dimensions,
     except norms and the few small matrices llama-quantize skips (`quantizable`).
     Everything else is stored in F32, as convert_hf_to_gguf stores 1-D tensors
     (or copied unchanged from a GGUF input).
  2. The target: a plain ggml type (`--type q4_0`) for every weight, or a llama-quantize
     file type whose rules (`_rule_type`, from what the model is: `ModelFacts`) give some
     tensors another type: the mixes (q4_k_m ...) give attn_v and ffn_down of some layers
     more bits, and attn_v at least Q5_K in what llama.cpp calls a 70B model (`is_70b`);
     iq4_nl/iq4_xs give ffn_down of the first n/8 layers Q5_K (without an importance
     matrix), and attn_v Q5_K when 4 or more query heads share a key/value head; in a
     model of 8 experts every file type (LLAMA_FILE_TYPES and the mixes) gives attn_v and
     attn_k Q8_0, and q3_k_s/m, q4_k_s/m and iq4_nl/xs give attn_output Q5_K. swtool's
     q2_k..q5_k are not llama-quantize file types: every weight in that type.
  3. For a quantized target, `output.weight` (or the token embedding when the
     output is tied to it) becomes Q6_K, or Q8_0 when the target is Q8_0 or its
     rows do not fit the target's block.
  4. A tensor holding a super weight is stored in the keep type (`--keep-type`), unless
     its planned type is already at least as precise.
  5. `--tensor-type REGEX=TYPE` overrides all of the above: the first pattern that
     `re.search` finds in the tensor name wins, as llama-quantize's std::regex_search.
  6. Row fallback: blocks run along a row, so a row whose length is not a multiple
     of the type's block gets llama.cpp's fallback: Q4_K -> Q5_0, Q5_K -> Q5_1,
     Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, and F16 if even that does not fit.
     (SmolLM2's 576-wide rows are not multiples of 256; its ffn_down rows of 1536 are.)
"""

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from swtool import block_types
from swtool.errors import SwtoolError
from swtool.quant import TYPES, quant_type

# llama-quantize's mixes: (ggml type of most weights, llama_ftype value written as general.file_type)
MIXES = {
    "q3_k_s": (T.Q3_K, 11), "q3_k_m": (T.Q3_K, 12), "q3_k_l": (T.Q3_K, 13),
    "q4_k_s": (T.Q4_K, 14), "q4_k_m": (T.Q4_K, 15),
    "q5_k_s": (T.Q5_K, 16), "q5_k_m": (T.Q5_K, 17),
}

# The plain types that are also llama-quantize file types (LLAMA_FTYPE_MOSTLY_Q4_0 ...), so their rules
# apply: IQ4_NL's and IQ4_XS's own, and the 8-expert ones. swtool's q2_k..q5_k are not: llama-quantize's
# Q2_K is a mix, and its Q3_K, Q4_K and Q5_K are aliases of the _M mixes, so here they mean every
# weight in that type. (The float types have no rules: llama-quantize applies them to quantized targets.)
LLAMA_FILE_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "iq4_nl", "iq4_xs")

# general.file_type (llama_ftype) of a file whose weights are mostly this plain type
FILE_TYPES = {T[block_type.name]: block_type.file_type for block_type in block_types.TYPES}

# llama.cpp's tensor_type_fallback for rows that do not fit the block
FALLBACKS = {T[block_type.name]: T[block_type.fallback]
             for block_type in block_types.TYPES if block_type.fallback}

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
NOT_QUANTIZED = "not a quantizable weight"
KEPT = "holds a super weight: --keep-type"


@dataclass(frozen=True)
class Target:
    """What `--type` asked for: the type of most weights, and the llama-quantize file type whose
    rules apply (a mix, or one of LLAMA_FILE_TYPES; None: every weight in `qtype`)."""

    name: str  # as given, lower case: "q4_0", "q4_k_m"
    qtype: T
    rules: str = None
    file_type: int = 0


def parse_target(text):
    """A --type value: a plain ggml type swtool writes, or a llama-quantize mix name."""
    name = text.strip().lower()
    if name in MIXES:
        qtype, file_type = MIXES[name]
        return Target(name, qtype, name, file_type)
    try:
        qtype = quant_type(name)
    except SwtoolError:
        plain = ", ".join(t.name.lower() for t in TYPES)
        raise SwtoolError(f"--type {text!r}: expected one of {plain}, or a mix: {', '.join(MIXES)}") from None
    return Target(name, qtype, name if name in LLAMA_FILE_TYPES else None, FILE_TYPES[qtype])


def parse_tensor_types(specs):
    """--tensor-type REGEX=TYPE values -> [(compiled pattern, text, type)], in the order given."""
    rules = []
    for spec in specs:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern or not type_name:
            raise SwtoolError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'blk\\.2\\.ffn_down=q8_0'")
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise SwtoolError(f"--tensor-type {spec!r}: bad regular expression ({e})") from None
        try:
            qtype = quant_type(type_name)
        except SwtoolError as e:
            raise SwtoolError(f"--tensor-type {spec!r}: {e}") from None
        rules.append((compiled, f"--tensor-type {pattern}={qtype.name.lower()}", qtype))
    return rules


def named_tensor_rules(output_type=None, embedding_type=None):
    """llama-quantize's --output-tensor-type and --token-embedding-type, as rules for exactly
    output.weight and token_embd.weight (a --tensor-type 'output\\.weight' also matches attn_output)."""
    rules = []
    for option, name, type_name in (("--output-tensor-type", "output.weight", output_type),
                                    ("--token-embedding-type", "token_embd.weight", embedding_type)):
        if type_name:
            try:
                qtype = quant_type(type_name)
            except SwtoolError as e:
                raise SwtoolError(f"{option} {type_name!r}: {e}") from None
            rules.append((re.compile(rf"^{re.escape(name)}$"), f"{option} {qtype.name.lower()}", qtype))
    return rules


def _block_values(qtype):
    return block_types.BY_NAME[qtype.name].block_values


def bits_per_weight(qtype):
    elements, nbytes = block_types.block_shape(qtype.name)
    return 8.0 * nbytes / elements


def quantizable(name, shape):
    """llama-quantize's tensor_allows_quantization for the tensors of the families swtool exports."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and name not in ("position_embd.weight", "token_types.weight"))


def layer_of(name):
    """The block number of `blk.N.*` names, else None."""
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def use_more_bits(i_layer, n_layers):
    """llama-quantize's choice of layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class ModelFacts:
    """What llama-quantize's rules read of the model (its llama_hparams and llama_model::type)."""

    n_layers: int
    n_gqa: int = 1  # query heads per key/value head: n_head / n_head_kv (llama_hparams::n_gqa)
    n_expert: int = 0  # experts per MoE layer ({arch}.expert_count); 8 is "Mixtral-8x7B style"
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B: see `of`

    @classmethod
    def of(cls, arch_name, n_layers, n_head, n_head_kv, n_expert=0):
        """The facts of a model from its GGUF hyperparameters (n_head_kv: n_head when absent; a
        per-layer list of heads counts by its first layer, as llama.cpp's n_gqa)."""
        n_head, n_head_kv = (v[0] if isinstance(v, (list, tuple)) and v else v for v in (n_head, n_head_kv))
        n_head_kv = n_head if n_head_kv is None else n_head_kv
        n_gqa = n_head // n_head_kv if n_head and n_head_kv else 0  # llama.cpp: 0 without KV heads
        return cls(n_layers, n_gqa, n_expert or 0, is_70b(arch_name, n_layers, n_head, n_head_kv, n_expert or 0))


def is_70b(arch_name, n_layers, n_head, n_head_kv, n_expert=0):
    """llama.cpp's LLM_TYPE_70B (load_hparams), for the architectures swtool writes: 80 layers of
    Qwen2 or OLMo, or of Llama with grouped-query attention (with a key/value head per head it is
    the 65B; with 8 experts llama.cpp sizes it as a Mixtral, which has no 80-layer type)."""
    if n_layers != 80:
        return False
    return arch_name in ("qwen2", "olmo") or (arch_name == "llama" and n_head != n_head_kv and n_expert != 8)


# The rules of llama_tensor_get_type_impl, for the llama-quantize file type `ftype` (Target.rules:
# "q4_k_m", "q4_0", "iq4_xs" ...) and the tensor of layer `i`; `planned` is the file type's own
# ggml type. llama.cpp counts the attn_v(-like) and ffn_down tensors, or reads the layer of ffn_down
# from the name when the model has experts: in the families swtool writes, every layer has one of
# each, so both are `i`.

def _attn_v_type(ftype, planned, i, model):
    """attn_v: several query heads share each of its rows (n_gqa), so llama.cpp gives it more bits."""
    if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, model.n_layers):
        planned = T.Q6_K
    elif ftype == "q4_k_s" and i < 4:
        planned = T.Q5_K
    elif ftype == "q3_k_m":
        planned = T.Q5_K if i < 2 else T.Q4_K
    elif ftype == "q3_k_l":
        planned = T.Q5_K
    elif ftype in ("iq4_nl", "iq4_xs") and model.n_gqa >= 4:
        planned = T.Q5_K
    if model.is_70b and planned in (T.Q3_K, T.Q4_K):  # 8 query heads per attn_v row
        planned = T.Q5_K
    if model.n_expert == 8:  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        planned = T.Q8_0
    return planned


def _ffn_down_type(ftype, planned, i, model, has_imatrix):
    n = model.n_layers
    if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return T.Q6_K
    if ftype == "q4_k_s" and i < n // 8:
        return T.Q5_K
    if ftype == "q3_k_m":
        return T.Q5_K if i < n // 16 else T.Q4_K
    if ftype == "q3_k_l":
        return T.Q5_K
    if ftype in ("iq4_nl", "iq4_xs") and i < n // 8 and not has_imatrix:
        return T.Q5_K
    if ftype in ("q4_0", "q5_0") and i < n // 8 and has_imatrix:  # "craziness in the first few ffn_down"
        return T.Q4_1 if ftype == "q4_0" else T.Q5_1
    return planned


EIGHT_EXPERT_ATTN_OUTPUT = ("q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs")


def _attn_output_type(ftype, planned, model):
    if model.n_expert == 8:
        return T.Q5_K if ftype in EIGHT_EXPERT_ATTN_OUTPUT else planned
    return {"q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(ftype, planned)


# llama.cpp's attn_v-like tensors (category_is_attn_v): the fused query-key-value matrix of Phi-3,
# GPT-2 and GPT-NeoX gets attn_v's rules
ATTN_V_LIKE = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")


def _rule_type(ftype, name, planned, model, has_imatrix):
    """llama-quantize's type for a tensor of a block under file type `ftype` (`planned` if no rule names it)."""
    i = layer_of(name)
    if i is None:
        return planned
    if any(part in name for part in ATTN_V_LIKE):
        return _attn_v_type(ftype, planned, i, model)
    if "attn_k.weight" in name:
        return T.Q8_0 if model.n_expert == 8 else planned
    if "attn_output.weight" in name:
        return _attn_output_type(ftype, planned, model)
    if "ffn_down" in name:
        return _ffn_down_type(ftype, planned, i, model, has_imatrix)
    return planned


def _output_type(target, cols):
    """llama-quantize's type for output.weight (or a tied token embedding) under a quantized target."""
    if target.qtype == T.Q8_0 or cols % _block_values(target.qtype):
        return T.Q8_0
    return T.Q6_K


def fallback(qtype, cols):
    """(type whose block fits rows of `cols`, note) - llama.cpp's tensor_type_fallback."""
    block = _block_values(qtype)
    if cols % block == 0:
        return qtype, None
    chosen = FALLBACKS.get(qtype, T.F16)
    if cols % _block_values(chosen):
        chosen = T.F16
    return chosen, f"rows of {cols} are not a multiple of {qtype.name}'s block of {block}: {qtype.name} -> {chosen.name}"


@dataclass(frozen=True)
class Choice:
    """The type chosen for one tensor and why (shown in the export's summary)."""

    qtype: T
    reason: str


def choose_type(name, shape, target, model, *, tied_output, has_imatrix=False, rules=(), super_tensors=(),
                keep_type=None, pure=False):
    """The Choice for tensor `name` of logical `shape` (outermost first; rows run along the last axis).

    model: the ModelFacts of the model; tied_output: the file has no output.weight, so token_embd is
    also the output; has_imatrix: the weights are quantized with an importance matrix (llama-quantize
    --imatrix), which some rules read (issue 18: swtool has none yet);
    rules: parse_tensor_types() and named_tensor_rules(); super_tensors: names of tensors holding a
    super weight; keep_type: their type (None: no super-weight handling of types);
    pure: llama-quantize --pure, no mix or output-tensor rule (every weight in the target type).
    """
    if not quantizable(name, shape):
        return Choice(T.F32, NOT_QUANTIZED)
    cols = shape[-1]
    for pattern, text, qtype in rules:  # the user's word is final, except that rows must fit
        if pattern.search(name):
            chosen, note = fallback(qtype, cols)
            return Choice(chosen, text + (f"; {note}" if note else ""))
    planned, reason = target.qtype, f"--type {target.name}"
    if target.qtype not in FLOAT_TYPES and not pure:
        if name == "output.weight" or (tied_output and name == "token_embd.weight"):
            planned, reason = _output_type(target, cols), "output tensor rule" + (" (tied)" if tied_output else "")
        elif target.rules:
            ruled = _rule_type(target.rules, name, planned, model, has_imatrix)
            if ruled != planned:
                planned, reason = ruled, f"{target.rules} rule"
    if name in super_tensors and keep_type is not None:
        if bits_per_weight(keep_type) > bits_per_weight(planned):
            planned, reason = keep_type, f"{KEPT} {keep_type.name.lower()}"
        else:
            reason += f" (holds a super weight; already at least {keep_type.name})"
    chosen, note = fallback(planned, cols)
    return Choice(chosen, reason + (f"; {note}" if note else ""))

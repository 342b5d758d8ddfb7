"""Synthetic Llama checkpoints of real shapes, with one planted super weight.

Benchmarks of peak memory and speed need checkpoints as large as real ones,
stored as Hugging Face stores them (bf16, sharded, index, config, tokenizer),
without downloading gigabytes. The weights are random, except for a planted
mechanism that makes one weight a super weight, so a scan has a known answer.

    python -m bench.synth bench/build/llama-1b --shape llama-1b [--shard-gb 2.0] [--seed 0]

The planted mechanism, in layer L, with residual channel c, intermediate channel m
and output row j drawn from the seed (see `plant_for`):
  - embedding column c is EMBED_SPIKE for every token. The random layers add noise
    of order 1 to every residual channel (a std-0.02 matrix with fan-in 2048 has a
    gain of ~0.9), so c must be far above 1 to still stand out after layer 0:
    in the RMS-normalized MLP input of layer L it is ~10-20 (others ~1);
  - gate_proj[m, c] = up_proj[m, c] = GATE_UP_SPIKE, so gate and up at m are ~20-40
    and the intermediate activation silu(gate) * up at m is in the hundreds for every
    token, where the random channels stay below ~20;
  - down_proj[j, m] = SUPER_WEIGHT, the super weight: down_proj output row j is then
    in the thousands; the other rows of layer L get ~1/50 of that through their
    random weights at column m, and the outputs of the other layers stay below ~10.
After L the residual is dominated by channel j, so later layers see one channel,
like layer 0 does, and their outputs stay of order 1: the spike stays unique.
"""

import argparse
import json
import shutil
import sys
import time
from math import prod
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from swtool.atomic import write_text_atomic
from swtool.checkpoint import DeferredTensor, write_safetensors
from swtool.checkpoint.safetensors import DTYPES

# Hyper-parameters of the real models (config.json names), plus a tiny one for smoke tests.
SHAPES = {
    "llama-1b": {  # meta-llama/Llama-3.2-1B
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "llama-7b": {  # meta-llama/Llama-2-7b-hf
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
        "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "rope_scaling": None,
    },
    "tiny": {  # seconds to write; grouped-query attention and an untied lm_head like the big ones
        "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 1024, "tie_word_embeddings": False, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "rope_scaling": None,
    },
}

WEIGHT_STD = 0.02  # the initializer_range of Llama; trained weights are of the same order
DTYPE = "BF16"  # as the real checkpoints are stored
# The planted values, exact in bf16; why these sizes is in the module docstring.
EMBED_SPIKE = 32.0
GATE_UP_SPIKE = 2.0
SUPER_WEIGHT = 4.0
PLANTED_LAYER = 1  # early, like real super weights (Llama-2-7B's is in layer 1)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# Text the toy tokenizer learns its merges from: ordinary English, so prompts encode in few tokens.
TOKENIZER_CORPUS = (
    "Apple Inc. is a worldwide tech company. Paris is the capital of France. "
    "The quick brown fox jumps over the lazy dog. My favorite food is pizza and my favorite "
    "color is blue. The weather today is sunny and warm. Water boils at one hundred degrees. "
    "A language model predicts the next word of a sentence from the words before it. "
    "Summer is the warmest season of the year, and winter is the coldest one. "
    "The company was founded in California and makes phones, computers and software."
)
TOKENIZER_MAX_VOCAB = 1024


def plant_for(shape, seed):
    """Where the super weight goes: channels drawn from the seed, so they are not 0 or obvious.

    c (residual channel) and j (down_proj output row) differ, so the spike a scan sees
    at row j is made by the super weight alone, not inherited from the embedding.
    """
    config = SHAPES[shape]
    rng = np.random.default_rng([seed, 0xC0FFEE])
    residual_channel, output_row = (int(x) for x in rng.choice(config["hidden_size"], 2, replace=False))
    intermediate_channel = int(rng.integers(config["intermediate_size"]))
    return {
        "layer": PLANTED_LAYER,
        "tensor": f"model.layers.{PLANTED_LAYER}.mlp.down_proj.weight",
        "row": output_row,
        "col": intermediate_channel,
        "value": SUPER_WEIGHT,
        "residual_channel": residual_channel,
    }


def tensor_specs(config, plant):
    """[(name, shape, spike)] in the order transformers saves a state dict.

    `spike` is None, or a function that writes planted values into the tensor once
    its random values are drawn.
    """
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    c, m, j = plant["residual_channel"], plant["col"], plant["row"]

    def spike_embedding(w):
        w[:, c] = EMBED_SPIKE

    def spike_gate_up(w):
        w[m, c] = GATE_UP_SPIKE

    def spike_down(w):
        w[j, m] = SUPER_WEIGHT

    specs = [("model.embed_tokens.weight", (config["vocab_size"], hidden), spike_embedding)]
    for n in range(config["num_hidden_layers"]):
        planted = n == plant["layer"]
        prefix = f"model.layers.{n}."
        specs += [
            (prefix + "self_attn.q_proj.weight", (q_rows, hidden), None),
            (prefix + "self_attn.k_proj.weight", (kv_rows, hidden), None),
            (prefix + "self_attn.v_proj.weight", (kv_rows, hidden), None),
            (prefix + "self_attn.o_proj.weight", (hidden, q_rows), None),
            (prefix + "mlp.gate_proj.weight", (inter, hidden), spike_gate_up if planted else None),
            (prefix + "mlp.up_proj.weight", (inter, hidden), spike_gate_up if planted else None),
            (prefix + "mlp.down_proj.weight", (hidden, inter), spike_down if planted else None),
            (prefix + "input_layernorm.weight", (hidden,), None),
            (prefix + "post_attention_layernorm.weight", (hidden,), None),
        ]
    specs.append(("model.norm.weight", (hidden,), None))
    if not config["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (config["vocab_size"], hidden), None))
    return specs


def deferred(shape, spike, seed, number):
    """A DeferredTensor drawn when written. Each tensor has its own stream, [seed, number],
    so its values do not depend on which tensors were drawn before it."""
    def make():
        if len(shape) == 1:  # the RMSNorm weights, the only 1-D tensors of Llama
            return np.ones(shape, dtype=np.float32)
        values = np.empty(shape, dtype=np.float32)
        np.random.default_rng([seed, number]).standard_normal(dtype=np.float32, out=values)
        values *= WEIGHT_STD  # in place: one float32 copy of the tensor is all this holds
        if spike is not None:
            spike(values)
        return values
    return DeferredTensor(shape, make)


def plan_shards(specs, shard_bytes):
    """Split the tensors, in order, into shards of at most `shard_bytes`, as transformers
    does: a tensor starts a new shard when it would overflow the current one."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = tensor_bytes(spec[1])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def tensor_bytes(shape):
    return prod(shape) * DTYPES[DTYPE][0]


def config_json(shape):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": WEIGHT_STD,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,  # the ids of the toy tokenizer's <s> and </s>
        "eos_token_id": 2,
        **SHAPES[shape],
    }


def build_tokenizer(vocab_size):
    """A small byte-level BPE (any text encodes; ids < vocab_size) that prepends <s> = id 1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TOKENIZER_MAX_VOCAB),
        special_tokens=[UNK, BOS, EOS],  # ids 0, 1, 2, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TOKENIZER_CORPUS], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def generate(out_dir, shape, shard_bytes=2 * 10**9, seed=0):
    """Write a synthetic `shape` checkpoint to `out_dir`; return the planted super weight.

    The result ({"layer", "row", "col", "value", ...}) is also written to planted.json,
    last, so that file marks a complete directory: a second call with the same shape,
    seed and shard size finds it and returns at once.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    out_dir, shard_bytes = Path(out_dir), int(shard_bytes)
    planted = {**plant_for(shape, seed), "shape": shape, "seed": seed, "shard_bytes": shard_bytes}
    planted_path = out_dir / "planted.json"
    if read_json(planted_path) == planted:
        return planted
    out_dir.mkdir(parents=True, exist_ok=True)
    planted_path.unlink(missing_ok=True)
    remove_old_weights(out_dir)  # from another shape or sharding, or an interrupted run

    specs = tensor_specs(SHAPES[shape], planted)
    total_size = sum(tensor_bytes(spec[1]) for spec in specs)
    check_free_space(out_dir, total_size)
    weight_map = write_shards(out_dir, plan_shards(specs, shard_bytes), seed)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    index_text = json.dumps(index, indent=2, sort_keys=True)  # sorted, as transformers writes it
    write_text_atomic(out_dir / "model.safetensors.index.json", index_text + "\n")
    write_text_atomic(out_dir / "config.json", json.dumps(config_json(shape), indent=2) + "\n")
    write_text_atomic(out_dir / "tokenizer.json", build_tokenizer(SHAPES[shape]["vocab_size"]).to_str())
    write_text_atomic(planted_path, json.dumps(planted, indent=2) + "\n")
    return planted


def write_shards(out_dir, shards, seed):
    """Write each shard, drawing one tensor at a time; return {tensor name: file name}."""
    weight_map, number = {}, 0
    for shard_number, shard in enumerate(shards, 1):
        file_name = f"model-{shard_number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, spike in shard:
            number += 1  # the tensor's position in the whole checkpoint seeds its stream
            tensors[name] = (DTYPE, deferred(shape, spike, seed, number))
            weight_map[name] = file_name
        started = time.perf_counter()
        write_safetensors(out_dir / file_name, tensors, metadata={"format": "pt"})
        size = (out_dir / file_name).stat().st_size
        print(f"wrote {file_name}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    return weight_map


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_old_weights(out_dir):
    for path in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / "model.safetensors",
                 out_dir / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)


def check_free_space(out_dir, needed):
    free = shutil.disk_usage(out_dir).free
    if free < needed + 10**9:  # a margin, as the disk is shared
        raise SystemExit(f"synth: {out_dir} has {free / 1e9:.1f} GB free; "
                         f"the checkpoint needs {needed / 1e9:.1f} GB plus 1 GB of margin")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write, e.g. bench/build/llama-1b")
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size, in 10^9 bytes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    planted = generate(args.out_dir, args.shape, int(args.shard_gb * 10**9), args.seed)
    print(json.dumps(planted))
    print(f"{args.out_dir}: ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

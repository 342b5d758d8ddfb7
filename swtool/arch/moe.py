"""Sparse mixtures of experts: the MLP step Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE share.

    h      = x + o_proj(attention(...))                       the family's own attention
    p      = softmax(gate(norm(h)))                           router over n experts, per token
    top    = the k most probable experts, weights p (divided by their sum when the family normalises)
    out    = h + sum over e in top: weight_e * down_e(act(gate_e(norm(h))) * up_e(norm(h)))

Two checkpoint layouts hold the same expert weights (BLOCK is `block_sparse_moe` for
Mixtral's per-expert files, `mlp` otherwise; GATE/UP/DOWN are w1/w3/w2 for Mixtral,
gate_proj/up_proj/down_proj otherwise):
  - per expert (the Hub's checkpoints; transformers' save_pretrained by default):
      model.layers.N.BLOCK.gate.weight                 [experts, hidden]
      model.layers.N.BLOCK.experts.E.GATE.weight       [ff, hidden]
      model.layers.N.BLOCK.experts.E.UP.weight         [ff, hidden]
      model.layers.N.BLOCK.experts.E.DOWN.weight       [hidden, ff]
  - stacked (transformers 5's own modules, save_pretrained(save_original_format=False)):
      model.layers.N.mlp.gate.weight                   [experts, hidden]
      model.layers.N.mlp.experts.gate_up_proj          [experts, 2 ff, hidden]  gate rows, then up rows
      model.layers.N.mlp.experts.down_proj             [experts, hidden, ff]
  - stacked apart (a GGUF file: llama.cpp's converter stacks each matrix on its own,
    blk.N.ffn_{gate,up,down}_exps.weight; GGUF input presents them under these names):
      model.layers.N.mlp.experts.gate_proj             [experts, ff, hidden]
      model.layers.N.mlp.experts.up_proj               [experts, ff, hidden]
      model.layers.N.mlp.experts.down_proj             [experts, hidden, ff]

Qwen-style configs may keep some layers dense (a plain gated MLP, `mlp.{gate,up,down}_proj`):
layer i is sparse unless i is in `mlp_only_layers` or (i + 1) is not a multiple of
`decoder_sparse_step`, as transformers decides.

Routing is computed per world: removing a weight upstream changes the router's
input, so a world may send a token to other experts than the intact model does.
A world may also remove whole experts (forward.DropExpert: their router logits
-inf before the softmax and top-k, the weights then computed as the family does).
Each expert still reads its weights once per pass, for the rows of all worlds it receives.
"""

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swtool import ops
from swtool.arch import blocks
from swtool.arch.base import DOWN_IN, DOWN_OUT, Count, DecoderArgs, Layers
from swtool.errors import SwtoolError

STACKED_DOWN = re.compile(r"model\.layers\.\d+\.mlp\.experts\.down_proj")
# a stacked tensor: transformers 5 names them without the ".weight" suffix, and so does GGUF input
STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)")
GGUF_STACKED_DOWN = re.compile(r"blk\.\d+\.ffn_down_exps\.weight")  # what adapt() sees of a GGUF file
# the expert label of an always-on shared expert (Qwen2-MoE) in observe_expert and down_proj_name:
# it sees every token, and its down projection is a plain 2-D matrix, not a numbered expert
SHARED = "shared"


@dataclass
class Routed:
    """The rows one expert receives: row n is token `token[n]` of batch row `world[n]` (the world,
    with one sequence per world as in a scan), with router weight `weight[n]`."""

    world: np.ndarray
    token: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True, kw_only=True)
class MixtureArgs(DecoderArgs):
    """The keys of a mixture, besides the family's own."""

    # transformers maps num_experts and num_local_experts onto each other (attribute_map):
    # Hub Qwen/OLMoE configs say num_experts, Mixtral and transformers 5's Qwen3-MoE num_local_experts
    aliases: ClassVar[dict] = {"num_local_experts": "num_experts"}
    num_experts: Count
    num_experts_per_tok: Count
    norm_topk_prob: bool = False  # top-k weights divided by their sum
    decoder_sparse_step: Count = 1  # layer i is sparse if (i + 1) is a multiple ...
    mlp_only_layers: Layers = ()  # ... and i is not listed here (Qwen)

    def check(self):
        super().check()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise SwtoolError(f"config.json: num_experts_per_tok = {self.num_experts_per_tok} must be between "
                              f"1 and num_experts = {self.num_experts}")


class Mixture:
    """A family's MLP step when it is a mixture (`self.moe = Mixture(self, ...)`): names, tensors, math.

    `expert_ff`: an expert's intermediate size; `normalise`: top-k weights divided by their sum;
    `module`: the module holding router and experts in per-expert checkpoints ("block_sparse_moe"
    for Mixtral); `matrices`: the per-expert names of gate, up and down.
    """

    def __init__(self, arch, expert_ff, normalise, module="mlp", matrices=("gate_proj", "up_proj", "down_proj")):
        args = arch.args
        self.activation, self.hidden_size = arch.activation, arch.hidden_size
        self.module, self.matrices = module, matrices
        self.n_experts, self.top_k, self.expert_ff = args.num_experts, args.num_experts_per_tok, expert_ff
        self.normalise_top_k = normalise
        self.sparse_step, self.dense_layers = args.decoder_sparse_step, set(args.mlp_only_layers)
        self.n_layers = arch.n_layers
        self.stacked = False  # per-expert tensors until adapt() sees the stacked ones
        self.fused = False  # stacked gate and up in one gate_up_proj (transformers 5), or apart (GGUF)

    def adapt(self, names):
        """The layout of a checkpoint's names, or of a GGUF file's (llama.cpp's names: stacked apart)."""
        self.stacked = any(STACKED_DOWN.fullmatch(name) or GGUF_STACKED_DOWN.fullmatch(name) for name in names)
        self.fused = any(name.endswith(".mlp.experts.gate_up_proj") for name in names)

    def is_sparse(self, layer):
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def check_gguf_export(self, gguf_arch_name):
        """Refuse dense layers: llama.cpp's mixture architectures load a router and experts in every
        layer (blk.N.ffn_gate_inp is required), and its converter cannot name a dense layer's MLP."""
        dense = [layer for layer in range(self.n_layers) if not self.is_sparse(layer)]
        if dense:
            raise SwtoolError(f"dense layers {dense} (mlp_only_layers / decoder_sparse_step) cannot be exported: "
                              f"llama.cpp's {gguf_arch_name} loads a router and experts in every layer")

    # --- names ---------------------------------------------------------------------
    def router_name(self, layer):
        return f"model.layers.{layer}.{'mlp' if self.stacked else self.module}.gate.weight"

    def expert_name(self, layer, expert, matrix):
        """Per-expert layout: the name of expert `expert`'s matrix 0 (gate), 1 (up) or 2 (down)."""
        return f"model.layers.{layer}.{self.module}.experts.{expert}.{self.matrices[matrix]}.weight"

    def down_proj_name(self, layer, expert=None):
        if not self.is_sparse(layer):
            return f"model.layers.{layer}.mlp.down_proj.weight"  # a dense layer's MLP
        if expert is None:
            raise SwtoolError(f"layer {layer}'s down projections are per expert: give the expert")
        if self.stacked:
            return f"model.layers.{layer}.mlp.experts.down_proj"
        return self.expert_name(layer, expert, 2)

    def gguf_name(self, hf_name, name_map):
        """llama.cpp's name, through `name_map` (the family's gguf-py map).

        llama.cpp's converter stacks a layer's experts into one 3-D tensor per matrix
        (blk.N.ffn_down_exps.weight: expert = slowest axis, ne[2]); gguf-py names the
        stacked tensor, so a per-expert name maps through its stacked spelling.
        """
        per_expert = re.fullmatch(r"(model\.layers\.\d+\.\w+\.experts)\.\d+\.(\w+\.weight)", hf_name)
        dense = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", hf_name)
        if per_expert:
            hf_name = f"{per_expert[1]}.{per_expert[2]}"
        elif STACKED.fullmatch(hf_name):
            hf_name += ".weight"  # transformers 5 names the stacked parameter without the suffix
        elif dense and not self.is_sparse(int(dense[1])):
            # gguf-py's MoE maps leave out dense MLPs; llama.cpp's generic names, for a scan's catalog
            # (no file holds them: check_gguf_export refuses to write one)
            return f"blk.{dense[1]}.ffn_{dense[2]}.weight"
        return name_map(hf_name)

    def gguf_restacked(self, tensor):
        """The experts as llama.cpp's converter writes them, one [experts, out, in] tensor per matrix
        and layer, from a checkpoint whose layout differs: ({name in the stacked-apart layout: (shape,
        read(experts))}, the checkpoint names they stand for). Per-expert tensors are stacked,
        transformers 5's gate_up_proj split into its gate and up halves (Qwen2MoeModel.modify_tensors).
        `tensor(name)`: the checkpoint's tensor."""
        restacked, replaced = {}, set()
        if self.stacked and not self.fused:
            return restacked, replaced  # llama.cpp's own layout
        d, ff, n = self.hidden_size, self.expert_ff, self.n_experts
        for layer in filter(self.is_sparse, range(self.n_layers)):
            base = f"model.layers.{layer}.mlp.experts."
            if self.stacked:  # fused gate_up_proj; down_proj is already llama.cpp's
                fused = tensor(base + "gate_up_proj")
                restacked[base + "gate_proj"] = ((n, ff, d), lambda rows, t=fused: t.read(rows)[:, :ff])
                restacked[base + "up_proj"] = ((n, ff, d), lambda rows, t=fused: t.read(rows)[:, ff:])
                replaced.add(base + "gate_up_proj")
                continue
            for matrix, stacked_name in enumerate(("gate_proj", "up_proj", "down_proj")):
                names = [self.expert_name(layer, expert, matrix) for expert in range(n)]
                shape = (n, d, ff) if matrix == 2 else (n, ff, d)
                restacked[base + stacked_name] = (shape, stacked_reader([tensor(name) for name in names]))
                replaced.update(names)
        return restacked, replaced

    def tensors(self, layer, dense_ff):
        """Layer `layer`'s MLP tensors: router and experts, or a dense gated MLP of `dense_ff` channels."""
        d, ff, n = self.hidden_size, self.expert_ff, self.n_experts
        if not self.is_sparse(layer):
            return blocks.gated_mlp_tensors(f"model.layers.{layer}.mlp", d, dense_ff)
        shapes = {self.router_name(layer): (n, d)}
        if self.stacked:
            base = f"model.layers.{layer}.mlp.experts."
            if self.fused:
                shapes[base + "gate_up_proj"] = (n, 2 * ff, d)
            else:
                shapes[base + "gate_proj"] = shapes[base + "up_proj"] = (n, ff, d)
            shapes[base + "down_proj"] = (n, d, ff)
            return shapes
        for expert in range(n):
            shapes[self.expert_name(layer, expert, 0)] = shapes[self.expert_name(layer, expert, 1)] = (ff, d)
            shapes[self.expert_name(layer, expert, 2)] = (d, ff)
        return shapes

    # --- math ------------------------------------------------------------------------
    def __call__(self, ctx, layer, h, shared=None):
        """The layer's MLP: a dense gated MLP, or the routed experts (plus `shared(ctx, layer, h)`, an
        always-on expert). A mixture's DOWN_OUT is the sum: what its down projections add to the residual."""
        if not self.is_sparse(layer):
            return blocks.gated_mlp(ctx, layer, h, f"model.layers.{layer}.mlp", self.activation)
        out = self.routed(ctx, layer, h)
        if shared is not None:
            out = out + shared(ctx, layer, h)
        ctx.observe(DOWN_OUT, layer, out)
        return out

    def routed(self, ctx, layer, h):
        """Route every token of every world to its top-k experts; sum their weighted outputs."""
        # a world without some experts (forward.DropExpert): their logits -inf, so the router never picks them
        top, weights = self.route(ctx.drop_experts(layer, ctx.linear(h, self.router_name(layer))))
        out = np.zeros_like(h)
        for expert in range(self.n_experts):
            world, token, slot = np.nonzero(top == expert)  # each (world, token) picks an expert at most once
            if len(world) == 0:
                continue
            routed = Routed(world, token, weights[world, token, slot])
            y = self.expert(ctx, layer, expert, h[world, token][None], routed)
            out[world, token] += routed.weight[:, None] * y[0]
        return out

    def route(self, logits):
        """Router logits [W, T, experts] -> (top-k expert ids, their softmax weights), [W, T, k].
        A logit of -inf (a removed expert) is never among the top k."""
        removed = np.isneginf(logits)
        if removed.any() and int((~removed).sum(axis=-1).min()) < self.top_k:
            raise SwtoolError(f"fewer than {self.top_k} experts (num_experts_per_tok) left to route a token to "
                              f"once the removed experts are excluded")
        probs = ops.softmax(logits)
        # exact ties: the lower id; a removed expert last, even after a probability that underflows to 0
        top = np.argsort(np.where(removed, np.inf, -probs), axis=-1, kind="stable")[..., : self.top_k]
        weights = np.take_along_axis(probs, top, axis=-1)
        if self.normalise_top_k:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return top, weights

    def expert(self, ctx, layer, expert, x, routed):
        """One expert's gated MLP on the rows it receives: x [1, N, hidden] -> [1, N, hidden]."""
        if self.stacked:
            base = f"model.layers.{layer}.mlp.experts."
            if self.fused:
                gate_up = ctx.linear(x, base + "gate_up_proj", world=routed.world, positions=routed.token, expert=expert)
                gate, up = np.split(gate_up, 2, axis=-1)  # gate rows first, then up rows
            else:
                gate = ctx.linear(x, base + "gate_proj", world=routed.world, positions=routed.token, expert=expert)
                up = ctx.linear(x, base + "up_proj", world=routed.world, positions=routed.token, expert=expert)
            down, down_expert = base + "down_proj", expert
        else:
            gate = ctx.linear(x, self.expert_name(layer, expert, 0), world=routed.world, positions=routed.token)
            up = ctx.linear(x, self.expert_name(layer, expert, 1), world=routed.world, positions=routed.token)
            down, down_expert = self.expert_name(layer, expert, 2), None  # the name already is the expert's
        act = self.activation(gate) * up
        ctx.observe_expert(DOWN_IN, layer, expert, routed, act[0])
        y = ctx.linear(act, down, world=routed.world, positions=routed.token, expert=down_expert)
        ctx.observe_expert(DOWN_OUT, layer, expert, routed, y[0])
        return y


def stacked_reader(experts):
    """read(rows) of the [experts, out, in] stack of the 2-D tensors `experts`: rows pick experts."""
    def read(rows=None):
        picked = np.arange(len(experts))[slice(None) if rows is None else rows]
        return np.stack([experts[int(e)].read() for e in np.atleast_1d(picked)])
    return read


def mixture_config_from_gguf(hparams, normalised):
    """config.json's mixture keys from a GGUF file: expert counts, and whether the top-k weights are
    divided by their sum: `{arch}.expert_weights_norm` when the file says, else `normalised`, what
    llama.cpp does for the architecture (the converter writes the key for few of them)."""
    norm = hparams.meta.get(f"{hparams.arch}.expert_weights_norm", normalised)
    if not isinstance(norm, bool):
        raise hparams.error(f"metadata {hparams.arch}.expert_weights_norm = {norm!r} is not true or false")
    return {"num_experts": hparams("expert_count"), "num_experts_per_tok": hparams("expert_used_count"),
            "norm_topk_prob": norm}

#!/usr/bin/env python3
"""Reference logits for `dsopt verify`, made with transformers' own DeepSeek classes.

Run by hand (needs torch, transformers and safetensors; never run by CI, nothing is downloaded):

  # a reference for a checkpoint you have (its first N layers for models larger than memory)
  python3 scripts/make_reference.py --model DIR --out ref.safetensors [--layers N] [--batch 2 --seq 16]

  # the fixtures under tests/fixtures/models/ (small random models, published layouts)
  python3 scripts/make_reference.py --fixtures tests/fixtures/models

  # a random-weight checkpoint at a published model's dimensions, for load measurements
  python3 scripts/make_reference.py --random src/checkpoint/presets/deepseek-v2-lite.json --layers 2 --out DIR

Reference format: one safetensors file with int64 `input_ids` [B, S] and float32 `logits`
[B, S, V] (and, for a checkpoint with V3's MTP layer, float32 `mtp_logits` [B, S-1, V]: the MTP
module at positions 0..S-2, fed the main model's last hidden state h_i and token t_{i+1}); `__metadata__` has `layers` when --layers cut the model, plus the versions used.
Logits are computed in float32 from the checkpoint's weights (bf16 weights are widened exactly).

Fixture checkpoints are written in the layout of the published DeepSeek checkpoints (one
`mlp.experts.{j}.{gate,up,down}_proj.weight` per expert; transformers 5 keeps them fused in
memory), in bf16 like DeepSeek-V2's published weights, with the config.json transformers writes.
"""

import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

# Dimensions chosen so that a swap between two tensors fails loudly: qk_nope != v_head_dim,
# every width distinct and odd where the architecture allows (RoPE widths must be even).
COMMON = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=40,
    moe_intermediate_size=14,
    num_attention_heads=3,
    num_key_value_heads=3,
    kv_lora_rank=24,
    qk_nope_head_dim=10,
    qk_rope_head_dim=6,
    v_head_dim=12,
    max_position_embeddings=64,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)


def yarn(m):
    return {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": m,
        "mscale_all_dim": m,
        "rope_theta": 10000.0,
    }


FIXTURES = {
    # V2-Lite-like: no query compression, softmax greedy, 2 shared experts, YaRN m = 0.707
    "v2-lite-tiny": (
        DeepseekV2Config,
        dict(
            q_lora_rank=None,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_shared_experts=2,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_parameters=yarn(0.707),
        ),
    ),
    # V2-like: query compression, group_limited_greedy, routed_scaling_factor 16
    "v2-tiny": (
        DeepseekV2Config,
        dict(
            q_lora_rank=20,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            # fewer groups kept than experts chosen: only then does the group rule change the
            # choice (a group's score is its best expert's, so top-k lies in the top k groups)
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            rope_parameters=yarn(0.707),
        ),
    ),
    # V3-like: query compression, sigmoid noaux_tc with a non-zero correction bias, groups,
    # YaRN m = 1.0, two dense layers first
    "v3-tiny": (
        DeepseekV3Config,
        dict(
            q_lora_rank=20,
            num_hidden_layers=4,
            first_k_dense_replace=2,
            n_routed_experts=9,
            num_experts_per_tok=3,
            n_shared_experts=1,
            topk_method="noaux_tc",
            n_group=3,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters=yarn(1.0),
            rope_interleave=True,
        ),
    ),
    # Moonlight-like: sigmoid noaux_tc, one group, rms_norm_eps 1e-5, no YaRN
    "moonlight-tiny": (
        DeepseekV3Config,
        dict(
            q_lora_rank=None,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            topk_method="noaux_tc",
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.446,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            rope_interleave=True,
        ),
    ),
}


# tensors DeepSeek-V3's FP8 checkpoint keeps in FP8: the layers' linear weights, not the
# embedding, the output head, the norms or the router
def is_fp8(name, t):
    return (
        t.dim() == 2
        and name.startswith("model.layers.")
        and not name.endswith("mlp.gate.weight")
        and "norm" not in name
    )


def quantize_fp8(w, block=128):
    """DeepSeek-V3's block quantisation: one scale per block x block tile (edge tiles cropped),
    e4m3 values w / scale; `weight_scale_inv` is the scale dequantisation multiplies by."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(br, bc, dtype=torch.float32)
    deq = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            qt = (tile / s).to(torch.float8_e4m3fn)
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = qt
            scale[i, j] = s
            deq[i * block : (i + 1) * block, j * block : (j + 1) * block] = qt.float() * s
    return q, scale, deq


def published_state_dict(model):
    """The model's tensors under the published checkpoints' names (experts unfused)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{base}{j}.gate_proj.weight"] = t[j, :inter].contiguous()
                out[f"{base}{j}.up_proj.weight"] = t[j, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for j in range(t.shape[0]):
                out[f"{base}{j}.down_proj.weight"] = t[j].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def load_published(model, sd, replaced):
    """Writes the published-layout tensors `replaced` back into the model (experts fused)."""
    own = model.state_dict()
    with torch.no_grad():
        for k, w in replaced.items():
            if ".mlp.experts." in k:
                base, j, proj = k.rsplit(".", 3)[0], int(k.split(".")[-3]), k.split(".")[-2]
                if proj == "down_proj":
                    own[base + ".down_proj"][j].copy_(w)
                else:
                    inter = own[base + ".gate_up_proj"].shape[1] // 2
                    rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                    own[base + ".gate_up_proj"][j, rows].copy_(w)
            else:
                own[k].copy_(w)


class MtpLayer(torch.nn.Module):
    """DeepSeek-V3's MTP layer as its paper and inference/model.py define it (transformers drops
    it): h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) -- the embedding half first, h_i the
    main model's last hidden state before the final norm -- then one decoder layer (MoE: its
    index is past first_k_dense_replace), then shared_head.norm and the output head."""

    def __init__(self, config, model):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer,
            DeepseekV3RMSNorm,
        )

        d, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = DeepseekV3RMSNorm(d, eps=eps)
        self.hnorm = DeepseekV3RMSNorm(d, eps=eps)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.layer = DeepseekV3DecoderLayer(config, config.num_hidden_layers)
        self.head_norm = DeepseekV3RMSNorm(d, eps=eps)
        self.main = [model]  # not a submodule

    def forward(self, h, ids_ahead):
        model = self.main[0]
        e = self.enorm(model.model.embed_tokens(ids_ahead))
        x = self.eh_proj(torch.cat([e, self.hnorm(h)], dim=-1))
        b, s, _ = x.shape
        pos = torch.arange(s).unsqueeze(0)
        cos_sin = model.model.rotary_emb(x, pos)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        return model.lm_head(self.head_norm(out))

    def tensors(self, prefix):
        """Its tensors under the published names (`model.layers.{L}.*`)."""
        out = {
            f"{prefix}.enorm.weight": self.enorm.weight,
            f"{prefix}.hnorm.weight": self.hnorm.weight,
            f"{prefix}.eh_proj.weight": self.eh_proj.weight,
            f"{prefix}.shared_head.norm.weight": self.head_norm.weight,
            # the published checkpoint keeps its own copies of the shared embedding and head
            f"{prefix}.embed_tokens.weight": self.main[0].model.embed_tokens.weight,
            f"{prefix}.shared_head.head.weight": self.main[0].lm_head.weight,
        }
        for name, t in published_state_dict(self.layer).items():
            out[f"{prefix}.{name}"] = t
        return out


def last_hidden(model, ids):
    """The main model's last decoder layer output (before the final norm)."""
    got = []
    h = model.model.layers[-1].register_forward_hook(lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return got[0]


def prompts(vocab, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)


# Relative size of the perturbation that decides whether a routing decision is robust: about
# the logits' own deviation when the same model runs in bf16 (measured on dense fixtures: 1.1-1.7 %).
PERTURBATION = 2.0**-6
TRIALS = 16


def chosen(gate, config, x):
    """The set of experts each token of x [T, d] is routed to, as transformers' routers decide
    (V2: softmax, greedy or group_limited_greedy; V3: sigmoid + correction bias, noaux_tc)."""
    logits = torch.nn.functional.linear(x.float(), gate.weight.float())
    if hasattr(gate, "e_score_correction_bias"):
        choice = logits.sigmoid() + gate.e_score_correction_bias
        group_score = lambda g: g.topk(2, dim=-1)[0].sum(-1)
    else:
        choice = logits.softmax(dim=-1)
        group_score = lambda g: g.max(-1).values
    n_group = config.n_group or 1
    if n_group > 1 and config.topk_method != "greedy":
        g = choice.view(choice.shape[0], n_group, -1)
        keep = torch.zeros(choice.shape[0], n_group, dtype=torch.bool)
        keep.scatter_(1, group_score(g).topk(config.topk_group, dim=-1)[1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(g.shape[-1], dim=1), float("-inf"))
    idx = choice.topk(config.num_experts_per_tok, dim=-1)[1]
    return idx.sort(dim=-1).values


def flip_hook(config, unstable):
    """A forward hook for a router that marks in `unstable` ([B, S], bool) every token whose
    choice of experts changes under one of TRIALS random relative perturbations of size
    PERTURBATION of the router's input."""
    g = torch.Generator().manual_seed(1)

    def hook(gate, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        base = chosen(gate, config, x)
        for _ in range(TRIALS):
            noise = torch.randn(x.shape, generator=g) * PERTURBATION
            flipped = (chosen(gate, config, x * (1 + noise)) != base).any(-1)
            unstable.view(-1).logical_or_(flipped)

    return hook


def reference_with_stability(model, ids):
    """f32 logits, and per position whether every routing decision up to it (in its sequence,
    in every MoE layer) survives TRIALS random relative perturbations of the router's input of
    size PERTURBATION. A decision that does not is a near-tie that a half-precision run may
    decide the other way; the positions after it are not comparable at half-precision tolerance.
    """
    b, s = ids.shape
    unstable = torch.zeros(b, s, dtype=torch.bool)
    hook = flip_hook(model.config, unstable)
    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    for h in handles:
        h.remove()
    # a flip at position t changes every later position of its sequence (through attention)
    stable = (~unstable).long().cummin(dim=1).values
    return logits, stable.contiguous()


def reference(model, ids):
    return reference_with_stability(model, ids)


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def make_fixture(name, out_dir):
    fp8 = name == "v3-fp8-tiny"
    cls, extra = FIXTURES["v3-tiny" if fp8 else name]
    if fp8:
        extra = dict(
            extra,
            quantization_config={
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
            },
        )
    config = cls(**COMMON, **extra, torch_dtype="bfloat16")
    seed = sum(map(ord, "v3-tiny" if fp8 else name))
    # v3-tiny carries V3's MTP layer (model.layers.{L}), with the reference's mtp_logits
    mtp = name == "v3-tiny"
    write_random(config, os.path.join(out_dir, name), seed, fp8, 4, 24, dict(fixture=name), mtp)


def write_random(config, d, seed, fp8, batch, seq, meta, mtp=False):
    """A checkpoint of `config` with random weights (bf16, published layout; FP8 blocks when
    `fp8`) and its reference for `batch` prompts of `seq` random tokens, in folder `d`."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    ).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                # wide enough that logits are O(1) and every tensor matters
                p.copy_(torch.randn_like(p) * (0.6 / p.shape[-1] ** 0.5))
        for mname, m in model.named_modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.05 * torch.randn_like(m.e_score_correction_bias))
        # the checkpoint is bf16: the reference uses exactly those values, widened (parameters
        # only: the RoPE frequencies are buffers computed from the config, never rounded)
        for t in model.parameters():
            t.copy_(t.to(torch.bfloat16).float())
    os.makedirs(d, exist_ok=True)
    config.save_pretrained(d)
    sd = published_state_dict(model)
    tensors = {
        k: (v.to(torch.float32) if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16))
        for k, v in sd.items()
    }
    if fp8:
        # the FP8 checkpoint; the reference is computed from the dequantised weights
        deq = {}
        for k in list(tensors):
            if is_fp8(k, sd[k]):
                q, scale, w = quantize_fp8(sd[k])
                tensors[k] = q
                tensors[k + "_scale_inv"] = scale
                deq[k] = w
        load_published(model, sd, deq)
    ids = prompts(config.vocab_size, batch, seq, 7)
    extra = {}
    if mtp:
        layer = MtpLayer(config, model).float().eval()
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                if "norm" in pname:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) * (0.6 / p.shape[-1] ** 0.5))
            for m in layer.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.copy_(0.05 * torch.randn_like(m.e_score_correction_bias))
            for p in layer.parameters():
                p.copy_(p.to(torch.bfloat16).float())
            h = last_hidden(model, ids)
            # module 1 at positions 0..S-2 predicts t_{i+2} from h_i and t_{i+1}; its position i
            # is robust when the main model's positions up to i are and its own router's
            # decisions up to i are
            unstable = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
            handle = layer.layer.mlp.gate.register_forward_hook(flip_hook(config, unstable))
            extra["mtp_logits"] = layer(h[:, :-1], ids[:, 1:]).float().contiguous()
            handle.remove()
            _, main_stable = reference(model, ids)
            unstable |= main_stable[:, :-1] == 0
            extra["mtp_route_stable"] = (~unstable).long().cummin(dim=1).values.contiguous()
        for k, v in layer.tensors(f"model.layers.{config.num_hidden_layers}").items():
            keep = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
            tensors[k] = v.detach().to(keep).contiguous()
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    logits, stable = reference(model, ids)
    meta = dict(versions(), **meta)
    save_file(
        {"input_ids": ids, "logits": logits, "route_stable": stable, **extra},
        os.path.join(d, "reference.safetensors"),
        metadata=meta,
    )
    print(f"  positions whose routing is robust: {stable.sum().item()} of {stable.numel()}")
    print(f"{d}: {sum(v.numel() for v in sd.values())} parameters, logits max |x| {logits.abs().max():.3f}")


def random_like(args):
    """--random CONFIG_JSON: a checkpoint at a published model's dimensions (its first --layers
    layers) with random weights, for load and memory measurements at real size."""
    with open(args.random) as f:
        values = json.load(f)
    if args.layers is not None:
        values["num_hidden_layers"] = args.layers
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    write_random(config, args.out, 0, False, args.batch, args.seq, {})


def from_checkpoint(args):
    config = transformers.AutoConfig.from_pretrained(args.model)
    meta = versions()
    if args.layers is not None:
        config.num_hidden_layers = args.layers
        meta["layers"] = str(args.layers)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        config=config,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()
    ids = prompts(config.vocab_size, args.batch, args.seq, args.seed)
    logits, stable = reference(model, ids)
    save_file({"input_ids": ids, "logits": logits, "route_stable": stable}, args.out, metadata=meta)
    print(f"{args.out}: input_ids {list(ids.shape)}, logits {list(logits.shape)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--out", help="reference file to write")
    ap.add_argument("--layers", type=int, help="keep the first N layers")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixtures", metavar="DIR", help="write every fixture under DIR")
    ap.add_argument(
        "--random",
        metavar="CONFIG_JSON",
        help="write a random-weight checkpoint of this config.json (and its reference) to --out DIR",
    )
    ap.add_argument(
        "--only", action="append", choices=sorted(FIXTURES) + ["v3-fp8-tiny"], help="with --fixtures: this one only"
    )
    args = ap.parse_args()
    if args.fixtures:
        for name in args.only or sorted(FIXTURES) + ["v3-fp8-tiny"]:
            make_fixture(name, args.fixtures)
    elif args.random and args.out:
        random_like(args)
    elif args.model and args.out:
        from_checkpoint(args)
    else:
        ap.error("give --model DIR --out FILE, or --fixtures DIR")


if __name__ == "__main__":
    sys.exit(main())

"""Slim inference forwards of the two user towers, holding the trained weights of the Hugging Face modules.

A request needs one user embedding per history: the tower's output at the history's last position. The
Hugging Face modules compute every position of every layer, and their Python-level forward (mask and
position bookkeeping, attention dispatch, output dataclasses) costs about as much as the arithmetic at the
sizes served here (a 2-layer width-64 tower over <= 50 positions). The slim forwards below compute the same
function with as few tensor ops as possible:

* **last position only in the final layer**: its keys and values need every position, but its queries,
  attention output, MLP and the final norm are computed for each row's last position alone;
* fused projections: one matmul for queries, keys and values (and for SwiGLU's gate and up projections);
* position tables precomputed for every position the tower can see (GPT-2's learned positions; RoPE's cos and
  sin, taken from the model's own rotary embedding, so every RoPE variant it implements is covered).

Both are TorchScript-compatible (``torch.jit.script``) with the signature ``(inputs_embeds [batch, length,
width], last [batch]) -> [batch, width]``: ``last`` is each row's last history position; windows are
right-padded and the towers causal, so whatever follows ``last`` never changes the answer.

:func:`slim_tower` builds one from a tower, or returns ``None`` for an architecture it does not cover (the
lean path then traces the Hugging Face module as it is). Covered: the SASRec branch (GPT-2, or the
PyTorch ``TransformerEncoder`` of ``SASRecConfig(block="encoder")``) and the Qwen2 / Llama / Mistral / Qwen3
decoder families (the DUEG), with full causal attention, optionally with
Molar's ``[User]`` token and with LoRA adapters (merged into a copy of the weights).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

DECODER_TYPES = ("qwen2", "llama", "mistral", "qwen3")
# Hugging Face activation names -> (torch function name, approximate): those the slim forwards implement
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def _activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight (folded into the next projection, or applied by the caller)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _last_rows(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``h[b, last[b]]`` for every row ``b``: ``[batch, width]``."""
    return h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.size(-1))).squeeze(1)


def _last_mask(last: torch.Tensor, length: int) -> torch.Tensor:
    """``[batch, 1, 1, length]``: the positions each row's last position attends to (bool)."""
    return (torch.arange(length, device=last.device).view(1, -1) <= last.view(-1, 1)).view(-1, 1, 1, length)


def _attend_last(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, last: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's ``last`` query only (``None``: the final one) over its causal keys
    ``[batch, heads, 1, head_dim]``, and the residual stream at that position ``[batch, width]``."""
    if last is None:
        return F.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=scale), h[:, -1]
    q = q.gather(2, last.view(-1, 1, 1, 1).expand(-1, q.size(1), 1, q.size(3)))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=_last_mask(last, h.size(1)), scale=scale)
    return a, _last_rows(h, last)


class _PreNormLayer(torch.nn.Module):
    """A pre-norm transformer layer (LayerNorm, fused QKV, causal attention, LayerNorm, MLP): GPT-2's block and
    PyTorch's ``nn.TransformerEncoderLayer(norm_first=True)`` alike. ``weights`` are in ``F.linear``'s layout."""

    def __init__(self, weights: Dict[str, torch.Tensor], heads: int, scale: float, activation: str, eps1: float,
                 eps2: float):
        super().__init__()
        self.heads = int(heads)
        self.scale = float(scale)
        self.activation = activation
        self.eps1, self.eps2 = float(eps1), float(eps2)
        for name, value in weights.items():
            self.register_buffer(name, value.detach().float().contiguous().clone())

    def _qkv(self, x: torch.Tensor):
        batch, length, width = x.shape
        qkv = F.linear(F.layer_norm(x, [width], self.ln1_w, self.ln1_b, self.eps1), self.qkv_w, self.qkv_b)
        q, k, v = qkv.view(batch, length, 3 * self.heads, -1).transpose(1, 2).chunk(3, dim=1)
        return q, k, v

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        m = F.layer_norm(h, [h.size(-1)], self.ln2_w, self.ln2_b, self.eps2)
        return h + F.linear(_activation(F.linear(m, self.fc_w, self.fc_b), self.activation), self.proj_w, self.proj_b)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self._qkv(h)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        h = h + F.linear(a.transpose(1, 2).reshape(batch, length, width), self.o_w, self.o_b)
        return self._mlp(h)

    def last(self, h: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's output at each row's ``last`` position only (``None``: the final one): ``[batch, width]``."""
        batch, width = h.size(0), h.size(2)
        q, k, v = self._qkv(h)
        a, h = _attend_last(q, k, v, h, last, self.scale)
        return self._mlp(h + F.linear(a.reshape(batch, width), self.o_w, self.o_b))


def _gpt2_layer(block, scale: float, activation: str) -> _PreNormLayer:
    attn, mlp = block.attn, block.mlp
    weights = {
        "ln1_w": block.ln_1.weight, "ln1_b": block.ln_1.bias, "ln2_w": block.ln_2.weight, "ln2_b": block.ln_2.bias,
        # Conv1D holds [in, out]; F.linear wants [out, in]
        "qkv_w": attn.c_attn.weight.t(), "qkv_b": attn.c_attn.bias, "o_w": attn.c_proj.weight.t(),
        "o_b": attn.c_proj.bias, "fc_w": mlp.c_fc.weight.t(), "fc_b": mlp.c_fc.bias,
        "proj_w": mlp.c_proj.weight.t(), "proj_b": mlp.c_proj.bias,
    }
    return _PreNormLayer(weights, attn.num_heads, scale, activation, block.ln_1.eps, block.ln_2.eps)


def _encoder_layer(layer) -> _PreNormLayer:
    """``nn.TransformerEncoderLayer(norm_first=True, activation="gelu")``: its in-projection is already fused."""
    attn = layer.self_attn
    weights = {
        "ln1_w": layer.norm1.weight, "ln1_b": layer.norm1.bias, "ln2_w": layer.norm2.weight, "ln2_b": layer.norm2.bias,
        "qkv_w": attn.in_proj_weight, "qkv_b": attn.in_proj_bias, "o_w": attn.out_proj.weight,
        "o_b": attn.out_proj.bias, "fc_w": layer.linear1.weight, "fc_b": layer.linear1.bias,
        "proj_w": layer.linear2.weight, "proj_b": layer.linear2.bias,
    }
    return _PreNormLayer(weights, attn.num_heads, attn.head_dim**-0.5, "gelu", layer.norm1.eps, layer.norm2.eps)


class SlimPreNorm(torch.nn.Module):
    """A pre-norm transformer tower's output at each row's last position: learned positions added to the inputs
    (multiplied by ``scale``), the layers, a final LayerNorm. With ``positions="last"`` the positions count back
    from each row's last position (which gets the table's final one), as
    :func:`merlin_molar.models.sasrec.positions_from_last` gives them in training; else from the first.

    Built by :func:`slim_gpt2` (``GPT2Model``: SASRec's GPT-2 block) and :func:`slim_encoder`
    (:class:`~merlin_molar.models.sasrec.SASRecEncoder`)."""

    def __init__(self, layers, positions_table: torch.Tensor, norm, scale: float = 1.0, positions: str = "start"):
        super().__init__()
        self.body = torch.nn.ModuleList(layers[:-1])
        self.final = layers[-1]
        self.inputs_scale = float(scale)
        self.from_last = positions == "last"
        self.register_buffer("positions", positions_table.detach().float().contiguous().clone())
        self.register_buffer("lnf_w", norm.weight.detach().float().clone())
        self.register_buffer("lnf_b", norm.bias.detach().float().clone())
        self.eps = float(norm.eps)

    def forward(self, x: torch.Tensor, last: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.inputs_scale != 1.0:
            x = x * self.inputs_scale
        length = x.size(1)
        if self.from_last:
            end = torch.full((x.size(0),), length - 1, dtype=torch.long, device=x.device) if last is None else last
            index = torch.arange(length, device=x.device).view(1, -1) + (self.positions.size(0) - 1 - end.view(-1, 1))
            # positions after a row's last one are never attended to (causal): any valid index does
            h = x + self.positions[index.clamp(0, self.positions.size(0) - 1)]
        else:
            h = x + self.positions[:length]
        for layer in self.body:
            h = layer(h)
        h = self.final.last(h, last)
        return F.layer_norm(h, [h.size(-1)], self.lnf_w, self.lnf_b, self.eps)


def slim_gpt2(model, scale: float = 1.0, positions: str = "start") -> SlimPreNorm:
    """``GPT2Model(inputs_embeds=x * scale, position_ids=...)`` as SASRec's prepare module calls it."""
    config = model.config
    activation = ACTIVATIONS[config.activation_function]
    layers = []
    for index, block in enumerate(model.h):
        attention_scale = block.attn.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            attention_scale /= index + 1
        layers.append(_gpt2_layer(block, attention_scale, activation))
    return SlimPreNorm(layers, model.wpe.weight, model.ln_f, scale, positions)


def slim_encoder(block) -> SlimPreNorm:
    """:class:`~merlin_molar.models.sasrec.SASRecEncoder` (eval mode: no dropout)."""
    layers = [_encoder_layer(layer) for layer in block.encoder.layers]
    return SlimPreNorm(layers, block.positions.weight, block.norm, block.scale, "last")


def _rotated_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (or entries) of a projection giving ``rotate_half`` of each head's output: ``[-x2, x1]``."""
    w = weight.reshape(heads, 2, -1, *weight.shape[1:])
    return torch.cat([-w[:, 1:], w[:, :1]], dim=1).reshape(weight.shape)


class _DecoderLayer(torch.nn.Module):
    """A Qwen2 / Llama / Mistral / Qwen3 decoder layer: RMSNorm, attention with RoPE, RMSNorm, gated MLP.

    The RMSNorm weights are folded into the projections that follow them, and (without Qwen3's per-head q/k
    norms) ``rotate_half`` into extra rows of the fused QKV projection: one matmul gives ``q, k, v`` and
    ``rotate_half(q), rotate_half(k)``, and RoPE is one ``addcmul`` for queries and keys together."""

    def __init__(self, layer, config, activation: str):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = int(attn.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.groups = self.heads // self.kv_heads
        self.scale = float(attn.scaling)
        self.activation = activation
        self.eps1 = float(layer.input_layernorm.variance_epsilon)
        self.eps2 = float(layer.post_attention_layernorm.variance_epsilon)
        self.qk_norm = hasattr(attn, "q_norm")
        self.qk_eps = float(attn.q_norm.variance_epsilon) if self.qk_norm else 0.0
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(mlp, name).bias is not None:
                raise NotImplementedError("MLP biases")
        bias = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in (attn.q_proj, attn.k_proj)]
        weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        biases = bias + [attn.v_proj.bias if attn.v_proj.bias is not None else torch.zeros(attn.v_proj.out_features)]
        if not self.qk_norm:  # rotate_half(x W^T + b) = x (P W)^T + P b
            weights += [_rotated_half(attn.q_proj.weight, self.heads), _rotated_half(attn.k_proj.weight, self.kv_heads)]
            biases += [_rotated_half(bias[0], self.heads), _rotated_half(bias[1], self.kv_heads)]
        norm1, norm2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        tensors = {
            "qkv_w": torch.cat(weights) * norm1, "qkv_b": torch.cat(biases),
            "o_w": attn.o_proj.weight, "o_b": attn.o_proj.bias if attn.o_proj.bias is not None else torch.zeros(0),
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * norm2, "down": mlp.down_proj.weight,
            "q_norm": attn.q_norm.weight if self.qk_norm else torch.zeros(0),
            "k_norm": attn.k_norm.weight if self.qk_norm else torch.zeros(0),
        }
        self.has_o_bias = attn.o_proj.bias is not None
        for name, value in tensors.items():
            self.register_buffer(name, value.detach().float().contiguous().clone())

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries and keys with RoPE, values: ``[batch, heads, length, head_dim]`` each."""
        batch, length = x.size(0), x.size(1)
        qkv = F.linear(_rms_norm(x, self.eps1), self.qkv_w, self.qkv_b).view(batch, length, -1, self.head_dim)
        qkv = qkv.transpose(1, 2)
        if self.qk_norm:
            q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
            q = _rotate(_rms_norm(q, self.qk_eps) * self.q_norm, cos, sin)
            k = _rotate(_rms_norm(k, self.qk_eps) * self.k_norm, cos, sin)
        else:
            qk, v, qk_half = qkv.split([self.heads + self.kv_heads, self.kv_heads, self.heads + self.kv_heads], dim=1)
            q, k = torch.addcmul(qk * cos, qk_half, sin).split([self.heads, self.kv_heads], dim=1)
        if self.groups > 1:
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        return q, k, v

    def _out(self, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, self.o_w, self.o_b) if self.has_o_bias else F.linear(a, self.o_w)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(_rms_norm(h, self.eps2), self.gate_up).chunk(2, dim=-1)
        return h + F.linear(_activation(gate, self.activation) * up, self.down)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length = h.size(0), h.size(1)
        q, k, v = self._qkv(h, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        h = h + self._out(a.transpose(1, 2).reshape(batch, length, -1))
        return self._mlp(h)

    def last(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's output at each row's ``last`` position only (``None``: the final one): ``[batch, width]``."""
        q, k, v = self._qkv(h, cos, sin)
        a, h = _attend_last(q, k, v, h, last, self.scale)
        return self._mlp(h + self._out(a.reshape(h.size(0), -1)))


class SlimDecoder(torch.nn.Module):
    """A Hugging Face decoder base model's ``last_hidden_state`` (``inputs_embeds`` in) at each row's last
    position; with ``user_token``, Molar's DUEG with its ``[User]`` token after every position (the answer
    is the hidden state of the token after ``last``)."""

    def __init__(self, model, max_length: int, user_token: Optional[torch.Tensor] = None):
        super().__init__()
        config = model.config
        activation = ACTIVATIONS[config.hidden_act]
        layers = [_DecoderLayer(layer, config, activation) for layer in model.layers]
        self.body = torch.nn.ModuleList(layers[:-1])
        self.final = layers[-1]
        self.has_user_token = user_token is not None
        token = torch.zeros(0) if user_token is None else user_token.detach().float().clone()
        self.register_buffer("user_token", token)
        positions = max_length * (2 if self.has_user_token else 1)
        probe = torch.zeros(1, positions, config.hidden_size)
        with torch.no_grad():
            cos, sin = model.rotary_emb(probe, torch.arange(positions).unsqueeze(0))
        self.register_buffer("cos", cos[0].float().contiguous())
        self.register_buffer("sin", sin[0].float().contiguous())
        self.register_buffer("norm_w", model.norm.weight.detach().float().clone())
        self.eps = float(model.norm.variance_epsilon)

    def forward(self, x: torch.Tensor, last: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.has_user_token:
            batch, length, width = x.shape
            x = torch.stack([x, self.user_token.expand(batch, length, width)], dim=2).reshape(batch, 2 * length, width)
            if last is not None:
                last = 2 * last + 1
        length = x.size(1)
        cos, sin = self.cos[:length], self.sin[:length]
        h = x
        for layer in self.body:
            h = layer(h, cos, sin)
        return _rms_norm(self.final.last(h, cos, sin, last), self.eps) * self.norm_w


def _unsupported_decoder(model) -> Optional[str]:
    config = model.config
    if config.model_type not in DECODER_TYPES:
        return f"decoder type {config.model_type!r}"
    if config.hidden_act not in ACTIVATIONS:
        return f"activation {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None)
                                                                            or []):
        return "sliding-window attention"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if not hasattr(model, "rotary_emb") or not hasattr(model, "norm") or len(model.layers) < 1:
        return "an unexpected module layout"
    return None


def _merged(llm):
    """A LoRA-wrapped (peft) model as its base model with the adapters merged into a copy of the weights."""
    if hasattr(llm, "merge_and_unload"):
        return copy.deepcopy(llm).merge_and_unload()
    return llm


def slim_tower(kind: str, tower, max_length: int, scale: float = 1.0,
               positions: str = "start") -> Optional[torch.nn.Module]:
    """A slim TorchScript-compatible forward of a user tower, or ``None`` where the architecture is not covered.

    ``kind``: ``"gpt2"`` for ``tower`` a ``GPT2Model`` (the SASRec branch; ``scale`` and ``positions``: its
    prepare module's, see :class:`SlimPreNorm`), ``"encoder"`` for a
    :class:`~merlin_molar.models.sasrec.SASRecEncoder`, ``"dueg"`` for a
    :class:`~merlin_molar.models.dueg.MolarBlock`."""
    if kind == "gpt2":
        config = tower.config
        if config.activation_function not in ACTIVATIONS or config.reorder_and_upcast_attn or len(tower.h) < 1:
            return None
        return slim_gpt2(tower, scale, positions).eval()
    if kind == "encoder":
        return slim_encoder(tower).eval()
    llm = _merged(tower.llm)
    if next(llm.parameters()).dtype != torch.float32 or _unsupported_decoder(llm) is not None:
        return None
    return SlimDecoder(llm, max_length, tower.user_token).eval()

"""A Llama-family decoder written directly in torch, shaped for multi-stream rows.

Why not ``transformers``: the engine feeds *packed* batches whose tokens come from
many sessions and several channels at once, each token with its own RoPE position
(the row index), its own channel embedding and its own KV-cache slot. That is one
flat list of tokens per step, not the ``[batch, seq]`` rectangle HF modules expect,
and HF's per-module Python overhead is what dominates decode on a small CPU model.
So the forward here is a straight run of fused matmuls over the packed tokens, with
attention done per session against a preallocated KV pool (``backend.kv_cache``).

Supported checkpoints: Llama / Mistral / Qwen2 / Qwen3 style (RMSNorm, RoPE with the
checkpoint's theta and ``llama3``/``linear`` scaling, GQA, SwiGLU, optional q/k/v
bias, Qwen3's per-head q/k RMSNorm, tied or untied LM head, optional learned channel
embedding). Weights the forward does not use (the paper's ``gate_in_norm``) are never
read: loading asks for tensors by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.kernels import decode_step, int8
from backend.kernels.quant import Int4Weight, int4_supported, quantize_int4
from backend.models.config import (
    CHANNEL_EMBEDDING_KEYS,
    CheckpointError,
    ModelConfig,
    TensorSource,
    rope_inv_freq,
    safetensors_files,
)
from backend.models.inputs import PackedBatch, PackedSplit


@dataclass
class LayerWeights:
    """One decoder layer with q/k/v and gate/up fused: fewer, larger matmuls per step."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    #: int4 copies of the four matmuls, used for decode rows when quantization is on.
    q4: dict[str, Int4Weight] | None = None
    #: Qwen3: RMSNorm weights ``[head_dim]`` applied to each head of q and k before RoPE.
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


class LlamaModel:
    """Weights plus a packed multi-session forward. Not an ``nn.Module``: nothing here trains."""

    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        channel_embedding: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.channel_embedding = channel_embedding
        self.device = device
        self.dtype = dtype
        self.quantization = "none"
        #: Which int4 kernel the decode rows use: ``bf16dp`` (``backend.int4_kernel``) or
        #: ``torch`` (``torch._weight_int4pack_mm_for_cpu``); None when not quantized.
        self.int4_kernel: str | None = None
        #: The LM head as the checkpoint's 8-bit values (int4 mode, with our kernels): half
        #: the bytes of the bf16 head that every step reads whole. None: the dense head.
        self.head_q8: int8.Int8Head | None = None
        #: The whole decode step in C++ (``backend.kernels.decode_step``), built on first use.
        self._fused: decode_step.FusedDecodeStep | None = None
        self._inv_freq = rope_inv_freq(cfg).to(device)
        self._rope_cache_len = 0
        self._cos = self._sin = torch.empty(0)
        self._ensure_rope(max(cfg.max_position_embeddings, 4096))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(
        cls, path: Path | str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> LlamaModel:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: model folder not found")
        cfg = ModelConfig.from_dir(path)
        src = TensorSource(safetensors_files(path))
        device = torch.device(device)

        def t(name: str) -> torch.Tensor:
            return src.get(name).to(device=device, dtype=dtype)

        def expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {shape}"
                )
            return tensor

        h, hd = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            q = expect(p + "self_attn.q_proj.weight", t(p + "self_attn.q_proj.weight"), (q_out, h))
            k = expect(p + "self_attn.k_proj.weight", t(p + "self_attn.k_proj.weight"), (kv_out, h))
            v = expect(p + "self_attn.v_proj.weight", t(p + "self_attn.v_proj.weight"), (kv_out, h))
            bias = None
            if src.has(p + "self_attn.q_proj.bias"):
                bias = torch.cat([t(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")]).contiguous()
            gate = t(p + "mlp.gate_proj.weight")
            up = t(p + "mlp.up_proj.weight")
            q_norm = k_norm = None
            if cfg.qk_norm:
                q_norm = expect(p + "self_attn.q_norm.weight", t(p + "self_attn.q_norm.weight"), (hd,))
                k_norm = expect(p + "self_attn.k_norm.weight", t(p + "self_attn.k_norm.weight"), (hd,))
            layers.append(
                LayerWeights(
                    input_norm=t(p + "input_layernorm.weight"),
                    qkv=torch.cat([q, k, v]).contiguous(),
                    qkv_bias=bias,
                    o=t(p + "self_attn.o_proj.weight"),
                    post_norm=t(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([gate, up]).contiguous(),
                    down=t(p + "mlp.down_proj.weight"),
                    q_norm=q_norm,
                    k_norm=k_norm,
                )
            )
        embed = expect("model.embed_tokens.weight", t("model.embed_tokens.weight"), (cfg.vocab_size, h))
        if src.has("lm_head.weight") and not cfg.tie_word_embeddings:
            lm_head = t("lm_head.weight")
        else:
            lm_head = embed
        chan = None
        for key in CHANNEL_EMBEDDING_KEYS:
            if src.has(key):
                chan = t(key)
                break
        return cls(cfg, embed, layers, t("model.norm.weight"), lm_head, chan, device, dtype)

    @classmethod
    def random(
        cls, cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, channel_embedding: int = 0
    ) -> LlamaModel:
        """A randomly initialised model, for fast engine tests that need no checkpoint."""
        g = torch.Generator().manual_seed(seed)
        h, hd = cfg.hidden_size, cfg.head_dim

        def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(dtype)

        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        layers = [
            LayerWeights(
                input_norm=1 + r(h, scale=0.1),
                qkv=r(qkv_out, h),
                qkv_bias=r(qkv_out) if cfg.attention_bias else None,
                o=r(h, cfg.num_heads * hd),
                post_norm=1 + r(h, scale=0.1),
                gate_up=r(2 * cfg.intermediate_size, h),
                down=r(h, cfg.intermediate_size),
                q_norm=1 + r(hd, scale=0.1) if cfg.qk_norm else None,
                k_norm=1 + r(hd, scale=0.1) if cfg.qk_norm else None,
            )
            for _ in range(cfg.num_layers)
        ]
        embed = r(cfg.vocab_size, h, scale=1.0)
        lm_head = embed if cfg.tie_word_embeddings else r(cfg.vocab_size, h)
        chan = r(channel_embedding, h, scale=0.5) if channel_embedding else None
        return cls(cfg, embed, layers, 1 + r(h, scale=0.1), lm_head, chan, torch.device("cpu"), dtype)

    # ------------------------------------------------------------------ packed weights
    _LAYER_DENSE = ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "down", "q_norm", "k_norm")

    def runtime_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor the forward reads, flat by name, and what rebuilds the model around
        them (``from_runtime_tensors``): what ``backend.models.packed`` writes to its file.
        Quantized copies are included, so a process that maps the file does no packing."""
        out: dict[str, torch.Tensor] = {"embed": self.embed, "final_norm": self.final_norm}
        tied = self.lm_head is self.embed
        if not tied:
            out["lm_head"] = self.lm_head
        if self.channel_embedding is not None:
            out["channel_embedding"] = self.channel_embedding
        q4_meta: dict[str, dict] = {}
        for i, layer in enumerate(self.layers):
            for name in self._LAYER_DENSE:
                t = getattr(layer, name)
                if t is not None:
                    out[f"layers.{i}.{name}"] = t
            for name, w in (layer.q4 or {}).items():
                p = f"layers.{i}.q4.{name}."
                out[p + "scales_zeros"] = w.scales_zeros
                if w.packed is not None:
                    out[p + "packed"] = w.packed
                if w.dp is not None:
                    out[p + "dp_packed"], out[p + "dp_sz"] = w.dp
                q4_meta[f"{i}.{name}"] = {"out_features": w.out_features, "group": w.group}
        if self.head_q8 is not None:
            out["head_q8.packed"], out["head_q8.scales"] = self.head_q8.packed, self.head_q8.scales
        meta = {
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "int4_kernel": self.int4_kernel,
            "tied_lm_head": tied,
            "q4": q4_meta,
            "head_q8_out_features": self.head_q8.out_features if self.head_q8 is not None else None,
        }
        return out, meta

    @classmethod
    def from_runtime_tensors(
        cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor], meta: dict
    ) -> LlamaModel:
        """The model around tensors that ``runtime_tensors`` produced (e.g. mapped from a file)."""
        dtype = getattr(torch, meta["dtype"])
        layers = []
        for i in range(cfg.num_layers):
            dense = {name: tensors.get(f"layers.{i}.{name}") for name in cls._LAYER_DENSE}
            q4 = {}
            for name in ("qkv", "o", "gate_up", "down"):
                m = meta["q4"].get(f"{i}.{name}")
                if m is None:
                    continue
                p = f"layers.{i}.q4.{name}."
                dp = (tensors[p + "dp_packed"], tensors[p + "dp_sz"]) if p + "dp_packed" in tensors else None
                q4[name] = Int4Weight(
                    tensors.get(p + "packed"), tensors[p + "scales_zeros"], m["out_features"], m["group"], dp
                )
            layers.append(LayerWeights(**dense, q4=q4 or None))
        embed = tensors["embed"]
        lm_head = embed if meta["tied_lm_head"] else tensors["lm_head"]
        model = cls(
            cfg,
            embed,
            layers,
            tensors["final_norm"],
            lm_head,
            tensors.get("channel_embedding"),
            torch.device("cpu"),
            dtype,
        )
        model.quantization = meta["quantization"]
        model.int4_kernel = meta["int4_kernel"]
        if "head_q8.packed" in tensors:
            model.head_q8 = int8.Int8Head(
                tensors["head_q8.packed"], tensors["head_q8.scales"], meta["head_q8_out_features"]
            )
        return model

    def quantize(self, mode: str) -> LlamaModel:
        """``int4``: add group-wise int4 copies of the matmul weights for decode rows.

        Dense weights stay for prefill (large M is compute-bound and faster dense) and for
        the embedding lookup. The LM head becomes int8 in groups of 32 where our kernels
        build (``backend.kernels.int8``): SmolLM2's tied embedding is 8-bit in its GGUF
        (4 bits visibly change answers), and that kernel, unlike torch's per-row int8 one
        (2 ms for 1 row, 12 ms for 16), costs little more per extra row. ``none`` leaves
        the model as loaded.
        """
        if mode == "none":
            return self
        if mode != "int4":
            raise ValueError(f"quantization must be 'none' or 'int4', got {mode!r}")
        if not int4_supported(self.device, self.dtype):
            raise ValueError(
                f"int4 weights need a CPU model in bfloat16 (got {self.device.type}, {self.dtype}); "
                "use quantization='none'"
            )
        for layer in self.layers:
            layer.q4 = {
                name: quantize_int4(getattr(layer, name), self.dtype)
                for name in ("qkv", "o", "gate_up", "down")
            }
        self.quantization = mode
        own = all(w.dp is not None for layer in self.layers for w in (layer.q4 or {}).values())
        self.int4_kernel = "bf16dp" if own else "torch"
        if own and int8.supported(self.lm_head):
            self.head_q8 = int8.quantize_int8_head(self.lm_head)
        return self

    def _fused_step(self, batch: PackedBatch, kv_k: list[torch.Tensor]) -> decode_step.FusedDecodeStep | None:
        """The C++ step when this batch is all int4 decode rows and the model suits it."""
        split = batch.split
        if self.head_q8 is None or split is None or not split.all_q4 or self.quantization == "none":
            return None
        if not decode_step.eligible(self, kv_k[0].dtype):
            return None
        if self._fused is None:
            self._fused = decode_step.FusedDecodeStep(self, self.head_q8)
        if int(batch.positions.max()) >= self._fused.max_positions:
            return None
        return self._fused

    def _linear(
        self, x: torch.Tensor, dense: torch.Tensor, q4: Int4Weight | None, split: PackedSplit | None
    ) -> torch.Tensor:
        """Dense for prefill tokens, int4 for decode tokens (when quantized)."""
        if q4 is None or split is None or split.all_dense:
            return self._dense(x, dense)
        if split.all_q4:
            return q4.mm(x)
        out = x.new_empty(x.shape[0], dense.shape[0])
        out[split.dense] = self._dense(x[split.dense], dense)
        out[split.q4] = q4.mm(x[split.q4])
        return out

    @staticmethod
    def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``F.linear`` whose every row is the same whatever else it is given with.

        Why: on the CPU a one-row bf16 call takes a GEMV path that sums in another order than
        the GEMM of two or more rows (measured with one thread: 27 of 300 rows of a 576 x 1536
        weight differ), so a prompt's last token computed alone (a prefix-cache hit) rounded
        otherwise than the same token computed with the rest of its prompt. One row goes in
        as two; two or more rows were row-for-row equal at every size measured (1..513).
        """
        if x.shape[0] == 1 and x.device.type == "cpu":
            return F.linear(x.repeat(2, 1), w)[:1]
        return F.linear(x, w)

    # ------------------------------------------------------------------ forward pieces
    def _ensure_rope(self, n: int) -> None:
        if n <= self._rope_cache_len:
            return
        t = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = torch.outer(t, self._inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos = emb.cos().to(self.dtype)
        self._sin = emb.sin().to(self.dtype)
        self._rope_cache_len = n

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does: bf16 variance loses too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def embed_tokens(self, tokens: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings plus the additive channel embedding (zero for ordinary checkpoints)."""
        x = self.embed[tokens]
        if self.channel_embedding is not None and channels is not None:
            x = x + self.channel_embedding[channels.clamp(max=self.channel_embedding.shape[0] - 1)]
        return x

    @torch.inference_mode()
    def forward(
        self,
        batch: PackedBatch,
        kv_k: list[torch.Tensor],
        kv_v: list[torch.Tensor],
    ) -> torch.Tensor:
        """Runs the packed tokens of one step; returns logits (fp32) for ``batch.logit_index``.

        ``kv_k[layer]`` / ``kv_v[layer]`` are the pool tensors ``[slots, kv_heads, max_len, head_dim]``.
        New keys/values are written in place at ``(batch.slot, batch.cache_index)`` before
        attention reads them, so a token attends to itself and to its session's past.
        """
        fused = self._fused_step(batch, kv_k)
        if fused is not None:
            return fused.forward(self.embed_tokens(batch.tokens, batch.channel_embed_ids), batch, kv_k, kv_v)
        cfg = self.cfg
        n = batch.tokens.shape[0]
        nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self._ensure_rope(int(batch.positions.max()) + 1)
        cos = self._cos[batch.positions].unsqueeze(1)  # [n, 1, hd]
        sin = self._sin[batch.positions].unsqueeze(1)
        x = self.embed_tokens(batch.tokens, batch.channel_embed_ids)
        q_split, kv_split = nh * hd, kvh * hd
        single = batch.num_sessions == 1
        split = batch.split if self.quantization != "none" else None
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer.input_norm)
            q4 = layer.q4 or {}
            qkv = self._linear(h, layer.qkv, q4.get("qkv"), split)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q = qkv[:, :q_split].view(n, nh, hd)
            k = qkv[:, q_split : q_split + kv_split].view(n, kvh, hd)
            v = qkv[:, q_split + kv_split :].view(n, kvh, hd)
            if layer.q_norm is not None:
                q = self._rms(q, layer.q_norm)
                k = self._rms(k, layer.k_norm)
            q = self._rotate(q, cos, sin)
            k = self._rotate(k, cos, sin)
            pool_k, pool_v = kv_k[li], kv_v[li]
            pool_k[batch.slot, :, batch.cache_index] = k.to(pool_k.dtype)
            pool_v[batch.slot, :, batch.cache_index] = v.to(pool_v.dtype)
            if single:
                s = batch.slot_list[0]
                keys = pool_k[s : s + 1, :, : batch.key_len]
                vals = pool_v[s : s + 1, :, : batch.key_len]
                qp = q.transpose(0, 1).unsqueeze(0)  # [1, nh, n, hd]
            else:
                if batch.slot_range is not None:  # a view: no gather
                    lo, hi = batch.slot_range
                    keys = pool_k[lo:hi, :, : batch.key_len]
                    vals = pool_v[lo:hi, :, : batch.key_len]
                else:
                    keys = pool_k[batch.slots_tensor, :, : batch.key_len]
                    vals = pool_v[batch.slots_tensor, :, : batch.key_len]
                if batch.max_q == 1:
                    qp = q.unsqueeze(2)  # [B, nh, 1, hd]
                else:
                    qp = q.new_zeros(batch.num_sessions * batch.max_q, nh, hd)
                    qp[batch.pad_index] = q
                    qp = qp.view(batch.num_sessions, batch.max_q, nh, hd).transpose(1, 2)
            # Attention in fp32: CPU bf16 SDPA is up to 5x slower for one-token queries
            # (measured: 760 us vs 153 us for 16 sessions x 80 keys), and fp32 is exact-er.
            # On CPU the pool is fp32 already (``resolve_kv_dtype``), so these are no-ops.
            att = self._attention(qp.float(), keys.float(), vals.float(), batch).to(x.dtype)  # [B, nh, T, hd]
            if single:
                att = att[0].transpose(0, 1).reshape(n, nh * hd)
            elif batch.max_q == 1:
                att = att.reshape(n, nh * hd)
            else:
                att = att.transpose(1, 2).reshape(-1, nh * hd)[batch.pad_index]
            x = x + self._linear(att, layer.o, q4.get("o"), split)
            h = self._rms(x, layer.post_norm)
            gu = self._linear(h, layer.gate_up, q4.get("gate_up"), split)
            g, u = gu.chunk(2, dim=-1)
            x = x + self._linear(F.silu(g) * u, layer.down, q4.get("down"), split)
        x = x[batch.logit_index]
        x = self._rms(x, self.final_norm)
        if self.head_q8 is not None:
            return self.head_q8.mm(x)
        return self._dense(x, self.lm_head).float()

    @staticmethod
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Masked attention, ``[B, nh, max_q, hd]``; a step with prompt tokens in pieces.

        Why pieces: torch's CPU attention splits the queries of a call into blocks and sums a
        query's row in an order that depends on the block it lands in, so the same prompt token
        rounded differently computed in one chunk (a cold prompt) or in a shorter one after a
        prefix-cache hit: measured, the last token's KV differed by up to 0.19 and the first
        answer token's logits by 0.32, and a seeded answer changed with the cache's state.
        Here a session's queries go in pieces that end at multiples of ``attention_block``
        (the prefix cache's block, where every hit and every chunk starts), each against
        exactly the keys up to its last query, so a token's attention has the same inputs
        and shapes whichever step computes it. On the CPU only: the fused C++ step has its own
        per-token attention, and GPU kernels are another matter (docs/gpu.md).
        """
        gqa = q.shape[1] != k.shape[1]
        spans = batch.prompt_spans
        if spans is None or q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, enable_gqa=gqa)
        out = q.new_zeros(q.shape)
        block = batch.attention_block
        for b, (first, count) in enumerate(spans):
            i = 0
            while i < count:
                j = min(count, i + block - (first + i) % block)
                keys = first + j  # the piece's last query sees at most the keys up to itself
                out[b, :, i:j] = F.scaled_dot_product_attention(
                    q[b : b + 1, :, i:j],
                    k[b : b + 1, :, :keys],
                    v[b : b + 1, :, :keys],
                    attn_mask=batch.mask[b : b + 1, :, i:j, :keys],
                    enable_gqa=gqa,
                )[0]
                i = j
        return out

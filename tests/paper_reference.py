"""An independent reference of the paper's multi-stream generation, on a transformers model.

Written from the algorithm (Su et al., 2026, ``stream_inference.generate``), not from the
engine: every row is a full forward of the whole grid so far through a stock transformers
model, with the channel embedding added to ``inputs_embeds``, a 4D block-causal mask and
per-row positions. No KV cache, no packing, no scheduler: if the engine agrees with this
token for token, its cache, mask, positions, penalty and stop rules are the paper's.

Order of one generated row r (the spec both sides implement):
1. each channel c >= 1 samples row r from the logits of row r-1 at channel c, with the
   silence penalty decided by the user queue as it stands (empty and the user spoke before:
   the user has stopped, k = r - last user row; with the during-talk variant and a non-empty
   queue, k = r - first user row + 1); ablated channels are silence;
2. the row is all silent and the queue is empty: stop (with ``stop_silent_rows`` = 1);
3. text pushed "at row r" joins the queue;
4. channel 0 of row r is the next queued user token, else silence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class PaperOptions:
    num_channels: int
    silence: int
    max_rows: int = 24
    temperature: float = 0.0
    top_k: int = 20
    top_p: float = 0.95
    seeds: dict[int, int] = field(default_factory=dict)  # channel -> generator seed
    silence_penalty: float = 10.0
    think_silence_penalty: float = 0.0
    during_talk: bool = False
    ablate: frozenset[int] = frozenset()
    skip_silence: bool = False
    stop_silent_rows: int | None = 1
    #: Generated row index (absolute) -> user tokens pushed just before that row is fed.
    pushes: dict[int, list[int]] = field(default_factory=dict)


def sample(logits: torch.Tensor, opts: PaperOptions, gen: torch.Generator | None) -> int:
    """The paper's ``sample_top_p``: temperature, top-k, sorted nucleus, draw in sorted order."""
    if opts.temperature <= 0:
        return int(logits.argmax())
    x = logits / opts.temperature
    if opts.top_k > 0:
        kth = torch.topk(x, min(opts.top_k, x.numel())).values[-1]
        x = x.where(x >= kth, torch.tensor(float("-inf")))
    probs = torch.softmax(x.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    cum = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs[cum - sorted_probs > opts.top_p] = 0.0
    sorted_probs /= sorted_probs.sum()
    return int(order[torch.multinomial(sorted_probs, 1, generator=gen)])


def grid_logits(
    hf: torch.nn.Module, chan_emb: torch.Tensor, rows: list[list[int]], opts: PaperOptions
) -> torch.Tensor:
    """Logits ``[C, vocab]`` of the last row of ``rows`` (a full forward of the grid)."""
    c = opts.num_channels
    flat = torch.tensor([t for r in rows for t in r])
    n = flat.numel()
    row = torch.arange(n) // c
    chan = torch.arange(n) % c
    mask = row[None, :] < row[:, None]
    if opts.skip_silence:
        mask &= (flat != opts.silence)[None, :]
    mask |= torch.eye(n, dtype=torch.bool)
    embeds = hf.get_input_embeddings()(flat[None]) + chan_emb[chan.clamp(max=chan_emb.shape[0] - 1)][None]
    with torch.inference_mode():
        out = hf(inputs_embeds=embeds, attention_mask=mask[None, None], position_ids=row[None]).logits[0]
    return out[-c:].float()


def generate(
    hf: torch.nn.Module,
    chan_emb: torch.Tensor,
    start_rows: Sequence[Sequence[int]],
    user: Sequence[int],
    opts: PaperOptions,
) -> list[list[int]]:
    """The generated rows (after the start rows), each of C tokens, until the stop rule."""
    c, sil = opts.num_channels, opts.silence
    rows = [list(r) for r in start_rows]
    queue = list(user)
    gens = {ch: torch.Generator().manual_seed(s) for ch, s in opts.seeds.items()}
    first_user: int | None = None
    last_user: int | None = None
    silent_streak = 0
    out: list[list[int]] = []
    for _ in range(opts.max_rows):
        r = len(rows)
        logits = grid_logits(hf, chan_emb, rows, opts)
        k = 0
        if not queue and last_user is not None:
            k = r - last_user
        elif queue and opts.during_talk:
            k = r - (first_user if first_user is not None else r) + 1
        new = [sil]
        for ch in range(1, c):
            if ch in opts.ablate:
                new.append(sil)
                continue
            lg = logits[ch].clone()
            base = opts.silence_penalty if ch == 1 else opts.think_silence_penalty
            if k > 0 and base > 0:
                lg[sil] -= base * min(1.0, k / 5)
            new.append(sample(lg, opts, gens.get(ch)))
        silent = all(t == sil for t in new[1:]) and not queue
        silent_streak = silent_streak + 1 if silent else 0
        if opts.stop_silent_rows is not None and silent_streak >= opts.stop_silent_rows:
            break
        queue += opts.pushes.get(r, [])
        if queue:
            new[0] = queue.pop(0)
            first_user = r if first_user is None else first_user
            last_user = r
        rows.append(new)
        out.append(new)
    return out


# ---------------------------------------------------------------------------- checkpoints
def silence_biased_checkpoint(
    hf: torch.nn.Module,
    num_channels: int,
    silence: int,
    boost: float,
    offsets: Sequence[float] = (),
    seed: int = 0,
) -> torch.Tensor:
    """Makes a random model say silence often (so the stop and penalty rules matter) and
    returns a random channel embedding ``[C, hidden]``.

    How: hidden dimension 0 carries a constant ``+1`` from every token embedding that no
    layer writes to (its rows of o_proj / down_proj are zero), and only the silence row of
    the LM head reads it, with weight ``boost``. The channel embedding adds ``offsets[c]``
    there, so channels differ in how often they are silent.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = hf.get_input_embeddings().weight
        emb[:, 0] = 1.0
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = hf.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[silence, 0] = boost
    chan = torch.randn(num_channels, emb.shape[1], generator=g) * 0.5
    chan[:, 0] = 0.0
    for c, off in enumerate(offsets):
        chan[c, 0] = off
    return chan


def save_stream_checkpoint(
    hf: torch.nn.Module,
    chan_emb: torch.Tensor,
    out: Path,
    tokenizer_dir: Path,
    *,
    architectures: list[str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``hf`` as a folder in the paper's format: ``num_channels`` in config.json and
    ``model.channel_embedding.weight`` beside the weights (a second safetensors file, as a
    sharded checkpoint would put it), plus the tokenizer files of ``tokenizer_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tensors = {"model.channel_embedding.weight": chan_emb.contiguous()}
    tensors.update(extra or {})
    save_file(tensors, str(out / "channel_embedding.safetensors"))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_channels"] = int(chan_emb.shape[0])
    cfg["channel_embedding_method"] = "additive"
    if architectures:
        cfg["architectures"] = architectures
    cfg_path.write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(tokenizer_dir) / name
        if src.is_file():
            (out / name).write_bytes(src.read_bytes())
    return out

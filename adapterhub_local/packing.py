"""A BERT encoder's blocks over packed tokens: no products on padding.

A batch of texts padded to its longest runs every linear layer on the pads too: the bench's
600 mixed test texts, batched by length, are 13,504 tokens padded against 10,353 real ones, and
the linear layers are most of a block's cost. Packed, a batch's texts follow one another in one
[tokens, D] tensor; only attention, which mixes each text's tokens, sees them padded again
([texts, heads, width, d]), with SDPA's mask keeping the pads out. The block is transformers'
BertLayer written out in eval mode (post-LayerNorm, absolute positions, no cross-attention),
calling the block's own submodules, so adapters that wrap them (LoRA with its bare context,
disable_adapter) act as in the padded forward; lora_batch sends each text's tokens through its
adapter (rows(..., lengths)). Other bases keep transformers' padded forward.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Packing:
    """Where each text's tokens lie in a packed batch and in its padded [texts, width] grid."""

    lengths: torch.Tensor  # each text's token count
    width: int  # the longest text's
    where: torch.Tensor  # each token's place in the padded grid, flattened
    text: torch.Tensor  # each token's text

    @classmethod
    def of(cls, ids: list[list[int]], device) -> "Packing":
        lengths = torch.tensor([len(x) for x in ids], device=device)
        width = int(lengths.max())
        text = torch.arange(len(ids), device=device).repeat_interleave(lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(len(text), device=device) - starts[text]
        return cls(lengths, width, text * width + position, text)

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """Attention's mask over the padded grid: [texts, 1, 1, width], False on the pads."""
        places = torch.arange(self.width, device=self.where.device)
        return (places < self.lengths.unsqueeze(-1))[:, None, None, :]

    @property
    def positions(self) -> torch.Tensor:
        """Each token's position within its text."""
        return self.where - self.text * self.width

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, F] -> [texts, width, F], zeros where a text is shorter than the longest."""
        grid = x.new_zeros(len(self.lengths) * self.width, x.shape[-1])
        return grid.index_copy_(0, self.where, x).view(len(self.lengths), self.width, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[texts, width, F] -> [tokens, F]: the texts' own tokens."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.where)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Each text's mean token state: [tokens, F] -> [texts, F]."""
        sums = x.new_zeros(len(self.lengths), x.shape[-1]).index_add_(0, self.text, x)
        return sums / self.lengths.unsqueeze(-1).to(x.dtype)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each text's [its tokens, F] (views)."""
        return x.split(self.lengths.tolist())


def packable(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> bool:
    """Whether block() computes what `blocks` of `model` do: transformers' BertLayers of a BERT
    encoder in eval mode (block() leaves dropout out), with absolute positions (embed() numbers
    each text's tokens from 0), and no hook or patched forward on a module whose forward
    block() and embed() skip (they call the blocks' submodules, not the blocks)."""
    from transformers.models.bert.modeling_bert import BertLayer

    config = model.config
    if (getattr(config, "model_type", None) != "bert" or config.is_decoder or model.training
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or not all(type(b) is BertLayer for b in blocks)):
        return False
    skipped = [model, model.encoder] + [m for b in blocks for m in (
        b, b.attention, b.attention.self, b.attention.output, b.output)]
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)
                   for m in skipped)


def embed(model: torch.nn.Module, ids: list[list[int]], packing: Packing) -> torch.Tensor:
    """The embeddings of a packed batch: [tokens, D]."""
    flat = torch.tensor([t for x in ids for t in x], device=packing.where.device)
    return model.embeddings(input_ids=flat[None], position_ids=packing.positions[None])[0]


def block(layer: torch.nn.Module, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """BertLayer's forward in eval mode over packed tokens: [tokens, D] -> [tokens, D]."""
    attention = layer.attention.self
    texts, heads = len(packing.lengths), attention.num_attention_heads

    def grid(projection):  # [tokens, D] -> [texts, heads, width, d]
        x = packing.pad(projection(hidden))
        return x.view(texts, packing.width, heads, -1).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        grid(attention.query), grid(attention.key), grid(attention.value),
        attn_mask=packing.keys, scale=attention.scaling)
    context = packing.unpad(context.transpose(1, 2).reshape(texts, packing.width, -1))
    output = layer.attention.output
    attended = output.LayerNorm(output.dense(context) + hidden)
    output = layer.output
    return output.LayerNorm(output.dense(layer.intermediate(attended)) + attended)


def last_states(model: torch.nn.Module, blocks: torch.nn.ModuleList, ids: list[list[int]],
                packing: Packing, after: int = -1, hidden: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The last block's states of a packed batch ([tokens, D]), going on from `hidden`, the
    states block `after` output, or from the embeddings (after = -1)."""
    if hidden is None:
        hidden = embed(model, ids, packing)
    for layer in list(blocks)[after + 1:]:
        hidden = block(layer, hidden, packing)
    return hidden


def states_at(base, blocks: list[int], ids: list[list[int]]) -> tuple[list[torch.Tensor], Packing]:
    """The states each of `blocks` (ascending, 0-based) outputs for the texts `ids`, packed
    ([tokens, D] each), without running the blocks above the last; through transformers'
    padded forward where block() does not apply."""
    packing = Packing.of(ids, base.device)
    layers = base.layers
    if not packable(base.model, layers):
        return [packing.unpad(h) for h in base.states_at(blocks, base.pad(ids))], packing
    wanted = [b % len(layers) for b in blocks]  # as layers[b] reads them (a one-block base: -1)
    outputs = [embed(base.model, ids, packing)]
    for i in range(max(wanted) + 1):
        outputs.append(block(layers[i], outputs[-1], packing))
    return [outputs[b + 1] for b in wanted], packing

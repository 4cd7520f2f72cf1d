"""Synonym neighbourhoods as tensors: the table, the per-batch gather, the convex combination.

ASCC and DNE perturb a token's embedding inside the convex hull of its neighbourhood, the
token and its synonyms. The synonyms come as a :class:`SynonymTable` built once per
tokenizer (``advfunc.words.synonym_table`` builds it from WordNet or a user's word list):
``ids`` [V, K] the synonym token ids of each token and ``mask`` [V, K] which of them are
real. A step gathers the rows of its batch's tokens, so no Python loop runs per step.

The neighbourhood of token v is column 0 = v itself, then its neighbours; a weight vector
w on the simplex over the real columns gives the embedding-output perturbation

.. math::
    δ_{b,l} = \\sum_j w_{b,l,j}\\, e(n_{b,l,j}) − e(x_{b,l})

which is 0 at w = one-hot(0). Padding, and tokens without a synonym, are masked (δ = 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from advfunc.core.params import Params
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding

_FAR = torch.iinfo(torch.long).max // 4  # sorts after every real key


class SynonymTable(NamedTuple):
    """Synonyms by token id: ``ids`` [V, K] long, ``mask`` [V, K] bool (True where ``ids`` holds a synonym).

    V is the vocabulary (the input-embedding matrix's rows); a row with no True entry is a
    token without synonyms. A token is never its own synonym.
    """

    ids: torch.Tensor
    mask: torch.Tensor


class Neighbourhood(NamedTuple):
    """Per token id: ``ids`` [V, N] the neighbourhood, column 0 the token itself; ``mask`` [V, N] bool;
    ``hop`` [V, N] long: 0 for the token, 1 for a synonym, 2 for a synonym's synonym."""

    ids: torch.Tensor
    mask: torch.Tensor
    hop: torch.Tensor


def check_table(table: Any, vocab: int) -> SynonymTable:
    """``table`` checked for a vocabulary of ``vocab`` tokens, unused slots zeroed; an error names the fault."""
    if not isinstance(table, SynonymTable):
        raise TypeError(
            f"synonyms must be an advfunc.attacks.SynonymTable (ids [V, K], mask [V, K]), got {type(table).__name__}; "
            "build one with advfunc.words.synonym_table.wordnet_table(tokenizer) or from_words(tokenizer, {...})"
        )
    ids, mask = table
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"synonyms.ids must be a [V, K] torch.long tensor, got {got}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"synonyms.mask must be a bool tensor of the ids' shape {tuple(ids.shape)}, got {got}")
    if ids.shape[0] != vocab:
        raise ValueError(
            f"synonyms has {ids.shape[0]} rows but the input embedding has {vocab}: build the table with the "
            "model's own tokenizer (one row per token id)"
        )
    real = ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise ValueError(f"synonyms.ids holds ids outside [0, {vocab}) where mask is True")
    if bool((mask & (ids == torch.arange(vocab, device=ids.device).unsqueeze(1))).any()):
        raise ValueError("synonyms lists a token as its own synonym; the neighbourhood adds the token itself")
    return SynonymTable(ids.masked_fill(~mask, 0), mask)  # unused slots hold a valid id, so gathers stay in range


def one_hop(table: SynonymTable) -> Neighbourhood:
    """Each token and its synonyms: [V, 1 + K]."""
    vocab = table.ids.shape[0]
    own = torch.arange(vocab, device=table.ids.device).unsqueeze(1)  # [V, 1]
    ids = torch.cat([own, table.ids], dim=1)
    mask = torch.cat([torch.ones_like(own, dtype=torch.bool), table.mask], dim=1)
    hop = torch.cat([torch.zeros_like(own), torch.ones_like(table.ids)], dim=1)
    return Neighbourhood(ids, mask, hop)


# Rows expanded at a time: bounds two_hop's temporaries to ROWS × (1 + K + K²) per tensor.
ROWS = 4096


def two_hop(table: SynonymTable, width: int) -> Neighbourhood:
    """Each token, its synonyms and their synonyms, each id once at its nearest hop: [V, min(width, 1 + K + K²)].

    Candidates are ordered by hop, then by their place in the table; those past ``width``
    columns are dropped (synonyms before synonyms' synonyms). Cost: two sorts of
    [V, 1 + K + K²], :data:`ROWS` rows at a time.
    """
    parts = [_two_hop_rows(table, start, width) for start in range(0, table.ids.shape[0], ROWS)]
    return Neighbourhood(*(torch.cat(column) for column in zip(*parts, strict=True)))


def _two_hop_rows(table: SynonymTable, start: int, width: int) -> Neighbourhood:
    """:func:`two_hop` for the rows ``start`` to ``start + ROWS``."""
    first_ids, first_mask = table.ids[start : start + ROWS], table.mask[start : start + ROWS]  # [R, K]
    rows, k = first_ids.shape
    own = torch.arange(start, start + rows, device=first_ids.device).unsqueeze(1)  # [R, 1]
    second = table.ids[first_ids].reshape(rows, k * k)  # [R, K²]
    second_mask = (first_mask.unsqueeze(2) & table.mask[first_ids]).reshape(rows, k * k)
    ids = torch.cat([own, first_ids, second], dim=1)  # [R, C], C = 1 + K + K²
    real = torch.cat([torch.ones_like(own, dtype=torch.bool), first_mask, second_mask], dim=1)
    hop = torch.cat([torch.zeros_like(own), torch.ones_like(first_ids), torch.full_like(second, 2)], dim=1)
    columns = ids.shape[1]
    place = torch.arange(columns, device=ids.device).expand_as(ids)
    # Equal ids side by side, nearest hop and earliest place first: the first of each run is kept.
    key = torch.where(real, (ids * 3 + hop) * columns + place, torch.full_like(ids, _FAR))
    key, order = key.sort(dim=1)
    sorted_ids = ids.gather(1, order)
    first = torch.ones_like(real)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    kept = first & (key != _FAR)
    # Back to (hop, place) order, kept candidates first, then cut at width.
    rank = torch.where(kept, hop.gather(1, order) * columns + place.gather(1, order), torch.full_like(ids, _FAR))
    rank, again = rank.sort(dim=1)
    take = order.gather(1, again)[:, :width]
    mask = (rank != _FAR)[:, :width]
    return Neighbourhood(ids.gather(1, take) * mask, mask, hop.gather(1, take) * mask)


@dataclass(frozen=True)
class NeighbourLayout(Layout):
    """:class:`Layout` plus the batch's neighbourhoods: ``neighbours`` [B, L, N] ids, ``valid`` [B, L, N] bool,
    ``hop`` [B, L, N]. ``mask`` is 0 at padding and at tokens without a synonym."""

    neighbours: torch.Tensor = field(kw_only=True)
    valid: torch.Tensor = field(kw_only=True)
    hop: torch.Tensor = field(kw_only=True)


class SynonymEmbeddings(EmbeddingOutput):
    """``target="embeds"`` restricted to tokens with synonyms, carrying each token's neighbourhood.

    The neighbour embeddings are rows of the input-embedding matrix, read from ``params``
    by name (:meth:`embeddings`).
    """

    def __init__(self, embedding: nn.Embedding, weight_name: str, neighbourhood: Neighbourhood) -> None:
        super().__init__(embedding)
        self.weight_name = weight_name
        self.neighbourhood = Neighbourhood(*(t.to(embedding.weight.device) for t in neighbourhood))

    def layout(self, batch: Mapping[str, Any]) -> NeighbourLayout:
        base = super().layout(batch)
        assert base.mask is not None
        ids = batch["input_ids"]  # [B, L]
        table = self.neighbourhood
        valid = table.mask[ids]  # [B, L, N]
        has_synonym = valid[..., 1:].any(dim=-1, keepdim=True)  # [B, L, 1]
        return NeighbourLayout(
            shape=base.shape,
            mask=base.mask * has_synonym.to(base.mask.dtype),
            neighbours=table.ids[ids],
            valid=valid,
            hop=table.hop[ids],
        )

    def embeddings(self, params: Params, layout: Layout) -> torch.Tensor:
        """e(n) for every neighbour of the batch: [B, L, N, H]."""
        return nn.functional.embedding(neighbours_of(layout).neighbours, params[self.weight_name].detach())


def neighbours_of(layout: Layout) -> NeighbourLayout:
    """``layout`` as the :class:`NeighbourLayout` a :class:`SynonymEmbeddings` target made."""
    if not isinstance(layout, NeighbourLayout):
        raise TypeError(f"a synonym rule needs the layout of a SynonymEmbeddings target, got {type(layout).__name__}")
    return layout


def synonym_target(model: nn.Module, synonyms: SynonymTable, width: int | None = None) -> SynonymEmbeddings:
    """The target of a synonym attack on ``model``: one-hop neighbourhoods, or two-hop cut at ``width`` columns.

    The input embedding must be a plain ``nn.Embedding`` lookup: the neighbours' embeddings
    are its matrix's rows, so a module that scales or transforms its output would place δ
    in another space.
    """
    embedding = input_embedding(model)
    if not isinstance(embedding, nn.Embedding) or type(embedding).forward is not nn.Embedding.forward:
        raise ValueError(
            f"synonym attacks need the input embedding to be a plain nn.Embedding lookup, got "
            f"{type(embedding).__name__}: its output is not the matrix's rows e(token)"
        )
    table = check_table(synonyms, embedding.num_embeddings)
    names = [name for name, p in model.named_parameters() if p is embedding.weight]
    if not names:
        raise ValueError("the input embedding's weight is not a parameter of the model")
    neighbourhood = one_hop(table) if width is None else two_hop(table, width)
    return SynonymEmbeddings(embedding, names[0], neighbourhood)


def require_own_start(delta: Delta, key: str, attack: str) -> None:
    """Refuse an iterate without ``key``: a caller's ``start=`` δ, which fixes no weights over the neighbourhood."""
    if key not in delta:
        raise ValueError(
            f"{attack} starts from weights over each token's neighbourhood, which a given start= δ does not fix; "
            "call the attack without start="
        )


def combination(weights: torch.Tensor, neighbours: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """δ = Σ_j w_j e(n_j) − e(x) [B, L, H], masked; ``weights`` [B, L, N], ``neighbours`` [B, L, N, H]."""
    assert layout.mask is not None
    mixed = torch.einsum("bln,blnh->blh", weights.float(), neighbours.float())
    return ((mixed - neighbours[:, :, 0].float()) * layout.mask).to(dtype)


def weight_gradient(grads: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """∂objective/∂w_j = ⟨∂objective/∂δ, e(n_j)⟩: [B, L, N] from ``grads`` [B, L, H]."""
    return torch.einsum("blh,blnh->bln", grads.float(), neighbours.float())


def add_hull_rows(
    into: torch.Tensor,
    weights: torch.Tensor,
    delta_grads: torch.Tensor,
    layout: Layout,
    skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add to W's gradient ``into`` [V, H] (in place, returned) what its rows receive through
    δ = Σ_j w_j W[n_j] − W[x] with w held fixed.

    A pass at δ gives W only the lookup's ∂L/∂W[x] = g (``delta_grads`` [B, L, H], the
    gradient at the embedding output); the paper's forward of Σ_j w_j e(n_j) gives each
    neighbour row w_j g and the token's own row w_0 g. The difference,
    Σ_j (w_j − [j = 0]) g into rows n_j (``weights`` [B, L, N]), is 0 at masked positions
    and, when ``skipped``, everywhere (δ was dropped to 0). Memory: a [B, L, N, H] float32 term (and its cast
    to W's dtype).
    """
    layout = neighbours_of(layout)
    assert layout.mask is not None
    own = (torch.arange(weights.shape[-1], device=weights.device) == 0).float()  # [N]: the token itself
    coefficient = (weights.float() - own) * layout.valid * layout.mask  # [B, L, N]
    if skipped is not None:
        coefficient = torch.where(skipped, torch.zeros_like(coefficient), coefficient)
    spread = coefficient.unsqueeze(-1) * delta_grads.float().unsqueeze(2)  # [B, L, N, H]
    return into.index_add_(0, layout.neighbours.reshape(-1), spread.reshape(-1, into.shape[-1]).to(into.dtype))

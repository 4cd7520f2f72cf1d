"""Word-substitution attacks as pure functions of ``(params, batch)``: nothing is mutated.

:func:`hotflip` is gradient-guided word substitution (Ebrahimi et al., 2018, "HotFlip"):
greedy first-order flips of whole-word tokens into whole-word neighbours, at most
``budget`` changed tokens per example. It differentiates only the embedding output (a
leaf of its own), never the parameters, and reads the model through ``PerturbedModel``
so a model keeps reading ``input_ids`` its own way. Put the model in eval mode first: an
attack is aimed at the network the user deploys, without dropout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from advfunc.core.arguments import require_steps
from advfunc.core.model import PerturbedModel, logits_of
from advfunc.core.objective import frozen


@dataclass(frozen=True)
class WordVocabulary:
    """Which tokens are whole words (substitutes), and which continue the previous token's word.

    WordPiece (``##`` pieces), byte-level BPE (``Ġ`` word starts) and SentencePiece
    (``▁`` word starts) vocabularies are recognised; special tokens are never words.
    """

    is_word: torch.Tensor  # [V] bool
    continues: torch.Tensor  # [V] bool

    @classmethod
    def of(cls, tokenizer: Any, size: int) -> WordVocabulary:
        """The vocabulary of ``tokenizer`` over ``size`` embedding rows (extra rows are no words)."""
        known = min(size, len(tokenizer))
        tokens = tokenizer.convert_ids_to_tokens(list(range(known)))
        special = set(tokenizer.all_special_ids)
        present = [t for t in tokens if t]
        wordpiece = any(t.startswith("##") for t in present)
        marker = None
        if not wordpiece:
            for candidate in ("Ġ", "▁"):
                if sum(t.startswith(candidate) for t in present) > 0.1 * max(1, len(present)):
                    marker = candidate
        is_word = torch.zeros(size, dtype=torch.bool)
        continues = torch.zeros(size, dtype=torch.bool)
        for i, token in enumerate(tokens):
            if not token or i in special:
                continue
            if wordpiece:
                continues[i] = token.startswith("##")
                is_word[i] = not continues[i] and token.isalpha()
            elif marker is not None:
                continues[i] = not token.startswith(marker)
                is_word[i] = not continues[i] and token[len(marker) :].isalpha()
            else:
                is_word[i] = token.isalpha()
        return cls(is_word, continues)


def _neighbours(weight: torch.Tensor, tokens: torch.Tensor, words: torch.Tensor, count: int) -> torch.Tensor:
    """[U, count] the ``count`` words nearest to each token by cosine in the embedding (itself excluded)."""
    unit = F.normalize(weight.float(), dim=1)
    sims = unit[tokens] @ unit[words].T  # [U, W]
    sims[words.unsqueeze(0) == tokens.unsqueeze(1)] = float("-inf")
    top = sims.topk(min(count, max(1, words.numel() - 1)), dim=1).indices
    return words[top]


def _candidates(
    original: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, vocabulary: WordVocabulary, neighbours: int
) -> torch.Tensor:
    """[B, L, k] substitutes of each eligible position (a whole word not continued by the next token); −1 elsewhere."""
    is_word, continues = vocabulary.is_word.to(original.device), vocabulary.continues.to(original.device)
    if is_word.numel() != weight.shape[0]:
        raise ValueError(f"the vocabulary covers {is_word.numel()} tokens, the embedding has {weight.shape[0]} rows")
    following = torch.cat([original[:, 1:], original[:, -1:]], dim=1)
    following_real = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    eligible = mask & is_word[original] & ~(continues[following] & following_real)
    candidates = torch.full((*original.shape, neighbours), -1, dtype=torch.long, device=original.device)
    words = is_word.nonzero().squeeze(1)
    if eligible.any() and words.numel() > 1:
        unique, inverse = torch.unique(original[eligible], return_inverse=True)
        near = _neighbours(weight, unique, words, neighbours)  # [U, k]
        candidates[eligible] = F.pad(near, (0, neighbours - near.shape[1]), value=-1)[inverse]
    return candidates


def hotflip(
    perturbed: PerturbedModel,
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    vocabulary: WordVocabulary,
    budget: int,
    neighbours: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy HotFlip word substitution: (flips [B] long, adversarial input_ids [B, L]).

    At each round every example not yet misclassified changes one more word: over the
    eligible positions i (a whole-word token not followed by a piece of the same word,
    not changed before) and candidates c (the ``neighbours`` nearest whole words to the
    original by cosine in the model's input-embedding matrix), it takes the largest
    first-order loss increase (E[c] − E[x_i]) · ∂L/∂e_i. ``flips[b]`` is the number of
    changes after which b was misclassified (0: already wrong on the clean text),
    ``budget + 1`` when it survived ``budget`` changes. Cost: ``budget + 1`` forwards and
    ``budget`` backwards to the embedding output, on the examples still standing.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise TypeError(f"budget must be an int >= 0 (words changed per example), got {budget!r}")
    require_steps("neighbours", neighbours)
    kwargs = perturbed.check_batch(batch)
    labels = kwargs["labels"]
    if labels.dim() != 1 or bool((labels < 0).any()):
        raise ValueError(
            f"HotFlip needs one class id >= 0 per example in batch['labels'], got {labels.tolist()}; "
            "drop the examples labelled -100"
        )
    original = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    mask = (mask if mask is not None else torch.ones_like(original)).bool()
    matrix = getattr(perturbed.embedding, "weight", None)
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError("HotFlip needs an input-embedding module with a [vocab, hidden] weight matrix")
    weight = matrix.detach()
    device = original.device
    width = weight.shape[1]
    candidates = _candidates(original, mask, weight, vocabulary, neighbours)
    fixed = frozen(params)
    current = original.clone()
    changed = torch.zeros_like(mask)
    flips = torch.full((original.shape[0],), budget + 1, dtype=torch.long, device=device)
    standing = torch.arange(original.shape[0], device=device)
    with perturbed.hooked():
        for round_ in range(budget + 1):
            if standing.numel() == 0:
                break
            sub = {k: (v[standing] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            sub["input_ids"] = current[standing]
            leaf = torch.zeros((standing.numel(), original.shape[1], width), device=device)
            leaf.requires_grad_(round_ < budget)
            logits = logits_of(perturbed.outputs(fixed, sub, leaf))
            wrong = logits.argmax(-1) != labels[standing]
            flips[standing[wrong]] = round_
            if round_ == budget:
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels[standing], reduction="sum"), [leaf])
            grad, standing = grad[~wrong], standing[~wrong]
            open_ = (candidates[standing] >= 0) & ~changed[standing].unsqueeze(-1)  # [R, L, k]
            where = open_.any(-1)  # [R, L] positions with a candidate left
            if not where.any():
                break
            rows, cols = where.nonzero(as_tuple=True)
            cands = candidates[standing[rows], cols]  # [P, k]
            g = grad[rows, cols].float()  # [P, H]
            gain = torch.einsum("ph,pkh->pk", g, weight[cands.clamp(min=0)].float())
            gain = gain - (g * weight[current[standing[rows], cols]].float()).sum(-1, keepdim=True)
            gain = gain.masked_fill(~open_[rows, cols], float("-inf"))
            table = torch.full((standing.numel(), original.shape[1], neighbours), float("-inf"), device=device)
            table[rows, cols] = gain
            best = table.view(standing.numel(), -1).argmax(1)
            has_move = table.view(standing.numel(), -1).amax(1) > float("-inf")
            pos, choice = best // neighbours, best % neighbours
            movers = standing[has_move]
            current[movers, pos[has_move]] = candidates[movers, pos[has_move], choice[has_move]]
            changed[movers, pos[has_move]] = True
    return flips, current

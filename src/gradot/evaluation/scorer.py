"""A faster lm-evaluation-harness scorer: ``HFLM`` that runs each context once and the LM head only
on continuation tokens.

The stock ``HFLM._loglikelihood_tokens`` runs ``context + continuation`` through the model for every
answer choice and computes, then log-softmaxes, the logits at every position, although only the
continuation's positions are scored. A multiple-choice question with four answers thus runs its
question four times, and each prompt token pays the head (576 × 49152 on the default model, a fifth
of its FLOPs) and a 49k-wide softmax.

``FastHFLM`` keeps the harness (tasks, prompts, metrics, request building) and replaces only that
method, for causal models:

1. requests are grouped by their context (after the harness's left truncation): all choices of a
   question share it, because the harness encodes the context on its own;
2. up to ``batch_size`` contexts (not requests) run in one forward pass, left-padded (masked, with
   positions counting real tokens) so that they all end at the same position; longest first, and
   split where the padding would cost more than another call (``_runs``);
3. each context's key/value cache is copied for each of its continuations longer than one token,
   which then run on it, right-padded (causal attention never sees the padding), in runs of
   similar length;
4. the head is applied only to the hidden states that predict continuation tokens (the context's
   last position, then the continuation but its last token), and log-softmaxed in chunks.

Scores are those of ``HFLM`` to float rounding (the tests compare every task's first rows).
Requests from ``loglikelihood_rolling`` (perplexity) go the same way, one window per group.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..token_cap import check_token_count
from ..errors import TokenCapError
from .head_loss import CHUNK_ELEMENTS, SkipHead

__all__ = ["FastHFLM"]


def _split(context: list[int], continuation: list[int], max_length: int) -> tuple[tuple[int, ...], list[int]]:
    """``(prefix, continuation)``: the tokens before the continuation once the harness has cut
    ``context + continuation`` to its last ``max_length + 1`` tokens (the last is never input)."""
    if not context or not continuation or len(continuation) > max_length:
        raise TokenCapError(f"loglikelihood request with {len(context)} context and {len(continuation)} "
                            f"continuation tokens (max_length {max_length})")
    whole = (context + continuation)[-(max_length + 1):]
    return tuple(whole[:len(whole) - len(continuation)]), continuation


def _cache_argument(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


#: The fixed cost of a forward call, in tokens' worth of compute: even one token streams every weight
#: once (measured on the default model, one CPU thread: 135-175 ms for 1 token, 6-8 ms per token in
#: batches; a rough figure is enough).
CALL_COST_TOKENS = 24


def _runs(lengths: list[int], limit: int | None = None, call_cost: int = CALL_COST_TOKENS) -> list[int]:
    """Split lengths sorted longest first into consecutive runs of at most ``limit``, each padded to
    its first length, minimising ``sum(call_cost + rows * longest)`` (dynamic programming); returns
    the run sizes."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - limit) if limit else 0, end):
            cost = best[start] + call_cost + (end - start) * lengths[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    sizes, end = [], n
    while end:
        sizes.append(end - cut[end])
        end = cut[end]
    return sizes[::-1]


def _batches(groups: list, limit: int):
    """Runs of at most ``limit`` groups (contexts, each with its continuations), sorted longest
    context first, split where padding would cost more than another forward call."""
    done = 0
    for size in _runs([len(prefix) for prefix, _ in groups], limit):
        yield groups[done:done + size]
        done += size


class FastHFLM(HFLM):
    """``HFLM`` whose log-likelihood requests share each context's forward pass and compute the
    head only where a continuation token is scored. Construct it as ``HFLM``; ``batch_size``
    counts contexts per forward pass (each with all its continuations)."""

    def tok_encode(self, string: str, *args, **kwargs) -> list[int]:
        """The harness's encoding of one request text, under the cap on tokens per text."""
        ids = super().tok_encode(string, *args, **kwargs)
        check_token_count(len(ids), string, "an evaluation request")
        return ids

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        """The harness's batch encoding (generation prompts), each text under the cap on tokens per text."""
        ids, mask = super().tok_batch_encode(strings, *args, **kwargs)
        for text, row in zip(strings, mask):
            check_token_count(int(row.sum()), text, "an evaluation prompt")
        return ids, mask

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal" or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        conts, groups = [], {}
        for i, (_, context, continuation) in enumerate(requests):
            prefix, cont = _split(list(context), list(continuation), self.max_length)
            conts.append(cont)
            groups.setdefault(prefix, []).append(i)
        # Longest contexts first, as the harness orders its batches (memory errors show early).
        ordered = sorted(groups.items(), key=lambda g: (-len(g[0]), g[0]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests")
        for batch in _batches(ordered, override_bs or self.batch_size):
            for i, answer in self._score(batch, conts):
                results[i] = answer
                if requests[i][0] is not None:  # rolling windows carry no cache key
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)
        pbar.close()
        return results

    def _continue(self, cache, run, conts, lengths, mask, pad) -> torch.Tensor:
        """Hidden states of the continuations in ``run`` (all but their last token), each after its
        context's cache (``cache`` is consumed); ``mask``: the contexts' padding mask, if padded."""
        head = self.model.get_output_embeddings()
        select = torch.tensor([g for g, _ in run])
        cache.batch_select_indices(select.to(self.device))
        span = max(len(conts[i]) - 1 for _, i in run)
        suffix = torch.full((len(run), span), pad, dtype=torch.long)
        for r, (_, i) in enumerate(run):
            suffix[r, :len(conts[i]) - 1] = torch.tensor(conts[i][:-1], dtype=torch.long)
        kwargs = {}
        if mask is not None:  # the right padding of continuations needs no mask: attention is causal
            starts = torch.tensor(lengths)[select]
            kwargs = {"attention_mask": torch.cat([mask[select], torch.ones_like(suffix)], 1).to(self.device),
                      "position_ids": (starts[:, None] + torch.arange(span)).to(self.device)}
        with SkipHead(head) as skip:
            self.model(input_ids=suffix.to(self.device), use_cache=True, **{_cache_argument(self.model): cache},
                       **kwargs)
            return skip.hidden

    def _score(self, batch, conts):
        """``(request index, (log-likelihood, is greedy))`` for every request of the batch's groups."""
        head = self.model.get_output_embeddings()
        rows = [(g, i) for g, (_, members) in enumerate(batch) for i in members]
        lengths = [len(prefix) for prefix, _ in batch]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Contexts LEFT-padded, so that every one ends at the same position and the continuations
        # follow it directly; padding is masked and positions count real tokens only.
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for g, (prefix, _) in enumerate(batch):
            ids[g, width - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
            mask[g, width - len(prefix):] = 1
        padded = min(lengths) < width
        kwargs = {}  # without padding: exactly the harness's call
        if padded:
            kwargs = {"attention_mask": mask.to(self.device),
                      "position_ids": (mask.cumsum(1) - 1).clamp(min=0).to(self.device)}
        mixed = getattr(self, "mixed_precision_dtype", None)  # older harness versions lack these two
        softmax_dtype = getattr(self, "softmax_dtype", None)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):
            with SkipHead(head) as skip:
                out = self.model(input_ids=ids.to(self.device), use_cache=True, **kwargs)
                cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.2x: "cache"
                last = skip.hidden[:, -1]  # predicts each continuation's first token
            # Continuations longer than one token run on copies of their context's cache, in runs
            # of similar length (right padding wastes compute), longest first.
            longer = sorted(((g, i) for g, i in rows if len(conts[i]) > 1), key=lambda r: -len(conts[r[1]]))
            after, where, done = [], {}, 0
            for size in _runs([len(conts[i]) - 1 for _, i in longer]):
                run = longer[done:done + size]
                for r, (_, i) in enumerate(run):
                    where[i] = (len(after), r)
                after.append(self._continue(cache if done + size == len(longer) else copy.deepcopy(cache),
                                            run, conts, lengths, mask if padded else None, pad))
                done += size
            # The hidden states that predict each request's continuation tokens, in request order.
            states = torch.cat([
                torch.cat([last[g:g + 1], after[where[i][0]][where[i][1], :len(conts[i]) - 1]]) if i in where
                else last[g:g + 1] for g, i in rows])
            targets = torch.tensor([t for _, i in rows for t in conts[i]], dtype=torch.long, device=self.device)
            logprobs, greedy = [], []
            step = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
            for start in range(0, len(states), step):
                lsm = F.log_softmax(head(states[start:start + step]), dim=-1, dtype=softmax_dtype)
                y = targets[start:start + step]
                logprobs.append(lsm.gather(1, y[:, None]).squeeze(1))
                greedy.append(lsm.argmax(dim=-1) == y)
        sizes = [len(conts[i]) for _, i in rows]
        logprobs, greedy = torch.cat(logprobs).split(sizes), torch.cat(greedy).split(sizes)
        return [(i, (float(lp.sum()), bool(gr.all()))) for (_, i), lp, gr in zip(rows, logprobs, greedy)]

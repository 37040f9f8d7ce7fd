"""The transformers causal-LM generator core, shared by ``hf-text`` (text family) and ``hf-code`` (code family).

Requests are sorted by token length and generated in left-padded batches. Each
request samples with its own seeded ``torch.Generator`` (through a logits
processor, :class:`SeededSampler`, which the local LLM judge samples with too), so
a candidate's text depends only on its prompt, seed and params — not on which other
prompts shared its batch. It answers episode turns too (:meth:`CausalLMGenerator.chat`): the
conversation rendered with the tokenizer's chat template, the tool calls read from the text
(:mod:`genflow.plugins.shared.local_chat`). The tiny random GPT-2 writers (:func:`write_tiny_gpt2`,
:func:`write_tiny_causal_lm`) serve ``genflow models init-tiny``, the tests and the
benchmarks.

torch and transformers are imported inside the functions: plugin modules import
this one when genflow lists its plugins, where those may not be installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from genflow.api import ChatRequest, ChatTurn, Generation, GenerationRequest, Generator, PluginParams, RowError
from genflow.plugins.shared.batching import length_sorted_batches
from genflow.plugins.shared.hf import HF_REQUIRES, describe_model, load_tokenizer, prepare_torch
from genflow.plugins.shared.local_chat import END_OF_TURN, parse_tool_calls, template_messages, tool_format

if TYPE_CHECKING:  # torch and transformers load in the worker, not when plugins are listed
    import torch


class CausalLMParams(PluginParams):  # hf-text's params, and what hf-code's extend
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate at most per candidate.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens "
                         "whose probabilities sum to top_p (1 keeps all).")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0 keeps all).")
    stop: list[str] = Field(default_factory=list, description="Strings that end a candidate (not included in it).")
    chat_template: bool | None = Field(None, description="Use the tokenizer's chat template: "
                                       "null = when it has one.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Keep only the last N prompt tokens.")
    micro_batch: int = Field(32, ge=1, description="Sequences per forward pass inside one call.")


class CausalLMGenerator(Generator):
    """Causal LM generation with transformers (GPT-style models): the core of ``hf-text`` and ``hf-code``.

    A family's plugin derives from it and names itself (``Params``, ``modality``,
    ``description``); the hooks ``default_stops``, ``render``, ``postprocess`` and
    ``batch_keys`` are where it adds what its family needs."""

    Params: ClassVar[type[PluginParams]] = CausalLMParams
    modality: ClassVar[str] = "text"
    description: ClassVar[str] = "transformers causal LM: batched, left-padded, length-sorted, seeded samples"
    input_columns: ClassVar[tuple[str, ...]] = ()  # prompt, system and task come with every request
    requires: ClassVar[tuple[str, ...]] = HF_REQUIRES
    extra: ClassVar[str | None] = "hf"
    batch_size: ClassVar[int] = 32  # one micro-batch a call: the stage already cut calls by token length
    params: CausalLMParams

    def __init__(self, model: str | None, params: CausalLMParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        if not self.model_name:
            raise ValueError(f"{type(self).__name__} needs a model path or id")
        import torch
        from transformers import AutoModelForCausalLM

        self.torch_device = prepare_torch(device)
        self.tokenizer = load_tokenizer(self.model_name, padding_side="left")
        dtype = torch.float16 if self.torch_device.type == "cuda" else torch.float32
        loaded: Any = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=dtype)
        self.model = loaded.to(self.torch_device)
        self.model.eval()
        self.use_chat = bool(self.tokenizer.chat_template) if params.chat_template is None else params.chat_template
        if self.use_chat and not self.tokenizer.chat_template:
            raise ValueError(f"chat_template: true, but the tokenizer of {self.model_name} has none")
        self.stop = list(params.stop) + self.default_stops()
        template = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else None
        self.tool_format = tool_format(template)
        """The chat template's tool-call format (None: genflow's ``<tool_call>`` convention)."""
        self.chat_stops = list(params.stop) + [m for m in END_OF_TURN if template and m in template]
        self._turns = TurnBatcher(self._chat_batch, params.micro_batch)

    def default_stops(self) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        return describe_model(self.model_name, self.model, chat_template=self.use_chat)

    # -- prompts -------------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        """The text the model continues."""
        if self.use_chat:
            messages = ([{"role": "system", "content": request.system}] if request.system else [])
            messages.append({"role": "user", "content": request.prompt})
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        if request.system:
            return f"{request.system}\n\n{request.prompt}"
        return request.prompt

    def postprocess(self, request: GenerationRequest, text: str) -> str:
        return text

    def encode(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """The prompt tokens each request generates from (rendered, cut to ``max_prompt_tokens``)."""
        encoded = self.tokenizer([self.render(r) for r in requests], add_special_tokens=True)["input_ids"]
        if self.params.max_prompt_tokens:
            encoded = [ids[-self.params.max_prompt_tokens:] for ids in encoded]
        return list(encoded)

    def batch_keys(self, requests: list[GenerationRequest]) -> list[Any]:
        """Prompt length in this model's tokens: calls of equal lengths pad nothing.

        Characters are a poor stand-in for tokens: calls cut by characters pad a lot
        more (benchmarks/README.md)."""
        return [len(ids) for ids in self.encode(requests)]

    # -- generation ----------------------------------------------------------
    def context_length(self) -> int | None:
        """Tokens the model attends to at most (prompt and new tokens), when its config says."""
        config = self.model.config
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        return int(limit) if limit else None

    def too_long(self, n_tokens: int) -> RowError | None:
        """A clear error for a prompt the model cannot take with ``max_new_tokens`` more."""
        limit, new = self.context_length(), self.params.max_new_tokens
        if limit is None or n_tokens + new <= limit:
            return None
        return RowError(f"the prompt is {n_tokens} tokens and max_new_tokens is {new}: together more than "
                        f"the model's context of {limit} tokens; set max_prompt_tokens (keeps the prompt's last "
                        f"tokens) to at most {max(1, limit - new)}, or shorten the prompt")

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        encoded = self.encode(requests)
        results: list[Generation | RowError] = [RowError("not generated")] * len(requests)
        fits = []
        for i, ids in enumerate(encoded):
            error = self.too_long(len(ids))
            if error is None:
                fits.append(i)
            else:
                results[i] = error
        for batch in length_sorted_batches([len(encoded[i]) for i in fits], self.params.micro_batch):
            idx = [fits[j] for j in batch]
            outs = self._generate_batch([encoded[i] for i in idx], [requests[i].seed for i in idx])
            for i, (text, n_tokens, reason) in zip(idx, outs, strict=True):
                results[i] = Generation(text=self.postprocess(requests[i], text),
                                        num_tokens=n_tokens, finish_reason=reason)
        return results

    # -- episodes ------------------------------------------------------------
    async def chat(self, request: ChatRequest) -> ChatTurn:
        """One assistant turn of an episode, from the conversation rendered with the chat template.

        Generated off the event loop with the turn's seed, at most ``max_new_tokens`` (or the
        episode's ``max_tokens`` left, when fewer); turns asked for together share one model
        call (:class:`TurnBatcher`), each sampling with its own seed as :meth:`generate` does.
        The tool calls are read from the text in the template's format, else genflow's
        ``<tool_call>`` convention (:mod:`genflow.plugins.shared.local_chat`)."""
        ids = self.chat_ids(request)
        error = self.too_long(len(ids))
        if error is not None:
            raise error
        limit = self.params.max_new_tokens
        if request.max_tokens is not None:
            limit = max(1, min(limit, request.max_tokens))
        text, n_tokens, reason = await self._turns.generate(ids, request.seed, limit)
        content, calls = parse_tool_calls(text, self.tool_format, request.turn)
        return ChatTurn(content, calls, "tool_calls" if calls else reason, prompt_tokens=len(ids),
                        num_tokens=n_tokens)

    def chat_ids(self, request: ChatRequest) -> list[int]:
        """The tokens of a turn's prompt: the conversation (and the tools) through the chat template."""
        if not isinstance(self.tokenizer.chat_template, str) or not self.tokenizer.chat_template:
            raise RowError(f"{self.model_name} has no chat template: a local model's episode turns are the "
                           "conversation rendered with its tokenizer's chat template (an instruct model's "
                           "tokenizer has one; or set chat_template in its tokenizer_config.json)")
        messages = template_messages(request.messages, request.tools, self.tool_format)
        extra: dict[str, Any] = {"tools": request.tools} if request.tools and self.tool_format else {}
        text = str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **extra))
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote them
        if self.params.max_prompt_tokens:
            ids = ids[-self.params.max_prompt_tokens:]
        return ids

    def _chat_batch(self, prompts: list[list[int]], seeds: list[int], limits: list[int]) -> list[tuple[str, int, str]]:
        return self._generate_batch(prompts, seeds, limits, self.chat_stops)

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], limits: list[int] | None = None,
                        stops: list[str] | None = None) -> list[tuple[str, int, str]]:
        """Each prompt's text, tokens and finish reason; ``limits``: each one's most new tokens
        (default ``max_new_tokens``), ``stops`` its stop strings (default the generator's)."""
        import torch
        from transformers import LogitsProcessorList

        p = self.params
        stops = self.stop if stops is None else stops
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.torch_device)
        attention = batch["attention_mask"].to(self.torch_device)
        sampler = SeededSampler(seeds, p.temperature, p.top_p, p.top_k)
        kwargs: dict[str, Any] = {}
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=False,
                max_new_tokens=max(limits) if limits else p.max_new_tokens,
                logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                num_beams=1, **kwargs,
            )
        new = out[:, input_ids.shape[1]:].tolist()
        if limits:  # a row's first n tokens are what it samples alone with n at most: its own seed
            new = [ids[:n] for ids, n in zip(new, limits, strict=True)]
        return self._decode(new, stops)

    def _decode(self, new: list[list[int]], stops: list[str] | None = None) -> list[tuple[str, int, str]]:
        stops = self.stop if stops is None else stops
        eos = self.tokenizer.eos_token_id
        decoded = []
        for ids in new:
            hit_eos = eos in ids
            ids = ids[:ids.index(eos)] if hit_eos else ids
            if self.tokenizer.pad_token_id != eos:
                while ids and ids[-1] == self.tokenizer.pad_token_id:
                    ids.pop()
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            cut, stopped = cut_at_stop(text, stops)
            reason = "stop" if hit_eos or stopped else "length"
            decoded.append((cut, len(ids), reason))
        return decoded


class TurnBatcher:
    """Episode turns of a local model, one model call at a time, off the event loop.

    The turns asked for while a call runs wait and go together in the next one (up to ``size``):
    hundreds of episodes in flight on the request path share the model in batches, and the
    event loop never waits on it. A turn whose caller gave up (its timeout) is left out of the
    next call, or its answer dropped."""

    def __init__(self, run: Callable[[list[list[int]], list[int], list[int]], list[tuple[str, int, str]]],
                 size: int) -> None:
        self.run, self.size = run, size
        self.pending: list[tuple[list[int], int, int, asyncio.Future[tuple[str, int, str]]]] = []
        self.draining: asyncio.Task[None] | None = None

    async def generate(self, ids: list[int], seed: int, limit: int) -> tuple[str, int, str]:
        """The turn's text, tokens and finish reason (``stop`` or ``length``)."""
        future: asyncio.Future[tuple[str, int, str]] = asyncio.get_running_loop().create_future()
        self.pending.append((ids, seed, limit, future))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # the turns asked for at the same moment join the first call
        while True:
            waiting = [p for p in self.pending if not p[3].done()]
            batch, self.pending = waiting[:self.size], waiting[self.size:]
            if not batch:
                return
            try:
                outs = await asyncio.to_thread(self.run, [b[0] for b in batch], [b[1] for b in batch],
                                               [b[2] for b in batch])
            except Exception as exc:  # each turn of the call fails with it (an errors/ row each)
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), out in zip(batch, outs, strict=True):
                if not future.done():
                    future.set_result(out)


class SeededSampler:
    """Temperature/top-k/top-p sampling with one random generator per row.

    ``generate`` runs greedy, and this logits processor leaves exactly one token
    open per row, drawn from that row's own generator.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, top_k: int) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        logits = scores.float()
        if self.temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            logits = logits / self.temperature
            if self.top_k:
                kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if self.top_p < 1.0:
                sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
                cum = sorted_p.cumsum(dim=-1)
                drop = cum - sorted_p > self.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
            chosen = seeded_draws(probs, self.generators).to(logits.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out


def seeded_draws(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One index per row of ``probs``, row i drawn with ``generators[i]``.

    The same draw as ``torch.multinomial(probs[i], 1, generator=generators[i])``
    row by row (for one sample torch races exponentials: argmax of p / q with
    q ~ Exp(1) from the generator), with only the noise drawn per row; the checks,
    division and argmax run once for the whole batch: per-row multinomial calls were a
    large part of a small model's generation time (benchmarks/README.md).
    """
    import torch

    probs = probs.cpu()
    valid = torch.isfinite(probs).all() & (probs >= 0).all() & (probs.sum(dim=-1) > 0).all()
    if not bool(valid):
        raise RuntimeError("probability tensor contains either `inf`, `nan`, an element < 0 or a row summing to 0")
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators, strict=True):
        row.exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    positions = [text.find(s) for s in stops if s and s in text]
    if not positions:
        return text, False
    return text[:min(positions)], True


def write_tiny_gpt2(directory: Path, head: str = "GPT2LMHeadModel", n_layer: int = 2, n_embd: int = 64,
                    n_head: int = 2, seed: int = 0, **config: Any) -> Path:
    """A randomly initialised GPT-2 (``head``: a transformers GPT-2 class name) with a
    locally trained tokenizer, written with save_pretrained."""
    import torch
    import transformers
    from transformers import GPT2Config

    from genflow.plugins.shared.tiny_tokenizer import save_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(directory)
    torch.manual_seed(seed)
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config,
    )
    getattr(transformers, head)(gpt2_config).save_pretrained(directory)
    return directory


def write_tiny_causal_lm(directory: Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                         seed: int = 0) -> Path:
    """The tiny causal LM of the quickstart (and of benchmarks at other sizes)."""
    return write_tiny_gpt2(directory, "GPT2LMHeadModel", n_layer, n_embd, n_head, seed)

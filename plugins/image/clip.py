"""``clip-score``: how well an image matches its prompt, measured by CLIP.

The score is ``100 × cos(text embedding, image embedding)``, the scale of
CLIPScore (Hessel et al., 2021, as torchmetrics reports it). CLIPScore also clips
at 0; genflow does not by default, because ranking needs the order among poor
candidates too (``clip_at_zero: true`` gives the published metric). The raw
cosine is in the details either way.

This module also builds the tiny CLIP pieces used offline: a CLIP byte-level BPE
tokenizer learnt from the bundled corpus (shared with the tiny Stable Diffusion
pipeline in :mod:`genflow.plugins.image.generator`) and a tiny ``CLIPModel``.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from pydantic import Field

from genflow import hookimpl
from genflow.api import PluginParams, RowError, Score, ScoreItem, Scorer
from genflow.data.storage import read_bytes
from genflow.hookspecs import Register
from genflow.plugins.shared.hf import can_write_tiny_model, describe_model, prepare_torch

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import CLIPTokenizer

TINY_CLIP = "tiny-clip"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIP_MAX_LENGTH = 77  # the context length of every released CLIP text tower


class ClipScoreParams(PluginParams):
    clip_at_zero: bool = Field(False, description="Report max(score, 0) as the CLIPScore paper does "
                               "(loses the order of poor candidates).")


class ClipScorer(Scorer):
    """CLIP text-image agreement: 100 × cosine of the prompt and image embeddings."""

    Params: ClassVar[type[PluginParams]] = ClipScoreParams
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    description: ClassVar[str] = "CLIP text-image agreement: 100 x cosine (CLIPScore scale)"
    input_columns: ClassVar[tuple[str, ...]] = ()  # the prompt and the candidate image come with every item
    requires: ClassVar[tuple[str, ...]] = ("torch", "transformers", "pillow")
    extra: ClassVar[str | None] = "image"
    default_model: ClassVar[str | None] = DEFAULT_CLIP
    params: ClipScoreParams

    def __init__(self, model: str | None, params: ClipScoreParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        from transformers import CLIPModel, CLIPProcessor

        self.clip_at_zero = params.clip_at_zero
        self.torch_device = prepare_torch(device)
        name = self.model_name or DEFAULT_CLIP
        self.processor = CLIPProcessor.from_pretrained(name)
        self.model = CLIPModel.from_pretrained(name)
        self.model.to(self.torch_device)
        self.model.eval()

    def describe(self) -> dict[str, Any]:
        return describe_model(self.model_name, self.model, projection_dim=self.model.config.projection_dim)

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        import torch

        results: dict[int, Score | RowError] = {}
        images: dict[int, Image.Image] = {}
        for i, item in enumerate(items):
            try:
                images[i] = _candidate_image(item)
            except RowError as err:
                results[i] = err
        if images:
            rows = list(images)
            # Candidates of one prompt share its text embedding: encode each prompt once.
            prompts = sorted({items[i].prompt for i in rows})
            with torch.inference_mode():
                text = self._embed_text(prompts)
                image = self._embed_images([images[i] for i in rows])
            prompt_index = torch.tensor([prompts.index(items[i].prompt) for i in rows])
            cosines = (text[prompt_index] * image).sum(dim=-1).tolist()
            for i, cosine in zip(rows, cosines, strict=True):
                value = 100.0 * (max(cosine, 0.0) if self.clip_at_zero else cosine)
                results[i] = Score(value, {"cosine": cosine})
        return [results[i] for i in range(len(items))]

    def _embed_text(self, prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=prompts, padding=True, truncation=True,
                                max_length=CLIP_MAX_LENGTH, return_tensors="pt").to(self.torch_device)
        return _unit(self.model.get_text_features(**inputs))

    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.torch_device)
        return _unit(self.model.get_image_features(**inputs))


def _unit(features: Any) -> torch.Tensor:
    """L2-normalised projected embeddings (transformers 5 wraps them in an output object)."""
    import torch

    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return tensor / tensor.norm(dim=-1, keepdim=True)


def _candidate_image(item: ScoreItem) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    data: bytes | str | None = item.image
    if data is None:
        raise RowError(f"clip-score scores images, but candidate {item.generation_id} has none "
                       f"(modality {item.modality!r})")
    if isinstance(data, str):
        data = read_bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise RowError(f"candidate {item.generation_id} is not an image PIL can read "
                       f"({len(data)} bytes)") from None
    except OSError as exc:  # truncated or corrupt file of a known format
        raise RowError(f"candidate {item.generation_id} is a damaged image: {exc}") from None


def tiny_clip_tokenizer(vocab_size: int = 1000) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` whose BPE is learnt from the bundled corpus.

    The merges are learnt over CLIP's own normaliser and pre-tokeniser, so they fit
    them, and every byte has its end-of-word form, so no text is unencodable. The
    learner is a few lines of Python rather than ``tokenizers``' trainer because
    that one numbers tokens and breaks ties differently from run to run; tiny
    models written twice must be identical for generated data to be reproducible.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    from genflow.plugins.shared.tiny_tokenizer import corpus_lines

    clip = CLIPTokenizer()  # empty vocabulary, but CLIP's text pipeline
    normalize = clip.backend_tokenizer.normalizer.normalize_str
    pre_tokenize = clip.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    words = Counter(piece for line in corpus_lines() for piece, _ in pre_tokenize(normalize(line)))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = [clip.bos_token, clip.eos_token, *alphabet, *(char + "</w>" for char in alphabet)]
    merges = _learn_merges(words, vocab_size - len(base))
    vocab: dict[str, int] = {}
    for token in [*base, *(a + b for a, b in merges)]:  # two merges may make the same token
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=cast(Any, merges), model_max_length=CLIP_MAX_LENGTH)


def _learn_merges(words: Counter[str], count: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties broken by the pair itself."""
    splits = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in splits.items():
            for pair in itertools.pairwise(parts):
                pairs[pair] += words[word]
        if not pairs:
            break
        a, b = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append((a, b))
        for parts in splits.values():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == a and parts[i + 1] == b:
                    parts[i:i + 2] = [a + b]
                i += 1
    return merges


def tiny_clip_text_config(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """A 2-layer, 32-wide CLIP text tower matching ``tokenizer``'s ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # pooling reads the hidden state at the first eos
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPModel`` + ``CLIPProcessor`` (32×32 images) to ``path``."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    # The PIL backend needs no torchvision; both backends save the same config.
    image_processor_class = (getattr(transformers, "CLIPImageProcessorPil", None)
                             or transformers.CLIPImageProcessor)

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=tiny_clip_text_config(tokenizer),
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = image_processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@hookimpl
def register_scorers(register: Register) -> None:
    register("clip-score", ClipScorer)


@hookimpl
def init_tiny_models(directory: Path) -> dict[str, str]:
    if not can_write_tiny_model(TINY_CLIP, ClipScorer):
        return {}
    return {TINY_CLIP: str(write_tiny_clip(Path(directory) / TINY_CLIP))}

"""The clip-score scorer and the tiny CLIP pieces it is tested with."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genflow.api import RowError, Score, ScoreItem
from genflow.plugins.image import clip as clip_plugin
from genflow.plugins.image.clip import ClipScoreParams, ClipScorer, tiny_clip_tokenizer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    return clip_plugin.init_tiny_models(tmp_path_factory.mktemp("models"))["tiny-clip"]


@pytest.fixture(scope="module")
def scorer(tiny_clip: str) -> ClipScorer:
    return ClipScorer(tiny_clip, ClipScoreParams(), "cpu")


def png(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def item(prompt: str, image: bytes | str | None, gid: str = "g", modality: str = "image") -> ScoreItem:
    return ScoreItem(generation_id=gid, prompt_id=f"p-{prompt[:6]}", prompt=prompt, modality=modality,
                     image=image)  # type: ignore[arg-type]


def values(results: list[Score | RowError]) -> list[float]:
    assert all(isinstance(r, Score) for r in results), results
    return [r.value for r in results]  # type: ignore[union-attr]


def test_scores_are_100_times_the_cosine_one_per_item(scorer: ClipScorer) -> None:
    items = [item("a red bicycle", png(i), f"g{i}") for i in range(3)]
    items += [item("an astronaut riding a horse", png(i), f"h{i}") for i in range(3)]
    results = scorer.score(items)
    assert len(results) == len(items)
    for result in results:
        assert isinstance(result, Score)
        cosine = result.details["cosine"]
        assert -1.0 <= cosine <= 1.0
        assert math.isfinite(result.value) and result.value == pytest.approx(100 * cosine)
    scores = values(results)
    assert len(set(scores)) == len(scores), "distinct candidates must be told apart to rank them"
    assert scores[:3] != scores[3:], "the same images must score differently against another prompt"


def test_a_candidate_scores_the_same_alone_and_in_a_batch(scorer: ClipScorer) -> None:
    items = [item("a bowl of fruit", png(i), f"g{i}") for i in range(4)] + [item("the sea", png(9), "s")]
    batched = values(scorer.score(items))
    alone = [values(scorer.score([it]))[0] for it in items]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert values(scorer.score(items)) == batched  # deterministic


def test_clip_at_zero_gives_the_published_clipscore(tiny_clip: str, scorer: ClipScorer) -> None:
    """A random CLIP mostly disagrees (negative cosines): clipped, every candidate would tie at 0."""
    clipped = ClipScorer(tiny_clip, ClipScoreParams(clip_at_zero=True), "cpu")
    items = [item(prompt, png(i), f"g{i}") for i, prompt in enumerate(["a cat", "a dog", "rain"] * 2)]
    cosines = [r.details["cosine"] for r in scorer.score(items)]
    assert min(cosines) < 0, "the test needs negative agreement to clip"
    assert values(clipped.score(items)) == pytest.approx([100 * max(c, 0.0) for c in cosines])
    assert values(scorer.score(items)) == pytest.approx([100 * c for c in cosines])


def test_images_given_as_paths_score_like_bytes(scorer: ClipScorer, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(1, (48, 80)))
    by_path = values(scorer.score([item("a red bicycle", str(tmp_path / "a.png"))]))
    by_bytes = values(scorer.score([item("a red bicycle", png(1, (48, 80)))]))
    assert by_path == by_bytes


def test_bad_candidates_fail_alone(scorer: ClipScorer) -> None:
    results = scorer.score([
        item("a red bicycle", png(1), "ok1"),
        item("a red bicycle", None, "text", modality="text"),
        item("a red bicycle", b"\x89PNG not really", "junk"),
        item("a red bicycle", png(2)[:500], "cut"),
        item("a red bicycle", png(2), "ok2"),
    ])
    assert isinstance(results[0], Score) and isinstance(results[4], Score)
    assert [str(r) for r in results[1:4]] == [
        "clip-score scores images, but candidate text has none (modality 'text')",
        "candidate junk is not an image PIL can read (15 bytes)",
        "candidate cut is a damaged image: image file is truncated",
    ]


def test_tiny_tokenizer_is_a_clip_tokenizer_that_encodes_any_text() -> None:
    tokenizer = tiny_clip_tokenizer()
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a RED bicycle, 4k — ünïcödé ✨")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1], "byte-level BPE has no unknown text"
    assert max(ids) < len(tokenizer)
    assert ids == tokenizer("a photo of a red bicycle, 4k — ünïcödé ✨")["input_ids"], "CLIP lowercases"


def test_tiny_clip_is_written_identically_every_time(tiny_clip: str, tmp_path: Path) -> None:
    """Reproducible data needs reproducible tiny models, tokenizer ids included."""
    again = clip_plugin.write_tiny_clip(tmp_path / "tiny-clip")
    files = sorted(p.name for p in Path(tiny_clip).iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    for name in files:
        assert (again / name).read_bytes() == (Path(tiny_clip) / name).read_bytes(), name


def test_tiny_clip_folder_loads_with_the_real_classes(tiny_clip: str) -> None:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert model.vision_model.config.image_size == 32
    assert processor(images=[Image.new("RGB", (64, 48))], return_tensors="pt")["pixel_values"].shape == (
        1, 3, 32, 32)


def test_plugin_is_registered_through_its_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from genflow.registry import Registry, build_plugin_manager

    monkeypatch.setenv("GENFLOW_PLUGINS", "clip")
    info = Registry(*build_plugin_manager()).get("scorer", "clip-score")
    assert info.factory is ClipScorer
    assert (info.modality, info.source) == ("image", "built-in")

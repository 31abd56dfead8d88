"""A tiny stand-in for Moondream2: remote code of our own, loaded like the real model.

`build_tiny_moondream(dir)` writes `configuration_tinymoondream.py`,
`modeling_tinymoondream.py`, a `config.json` whose `auto_map` points AutoConfig and
AutoModelForCausalLM at them, and random weights in `model.safetensors`. Loading it with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True, local_files_only=True)`
goes through the same dynamic-module path as `vikhyatk/moondream2`.

The model implements Moondream2's public API (revision 2025-06-21):

- `caption(image, length="normal", stream=False, settings=None) -> {"caption": str}`
- `query(image=None, question=None, reasoning=False, spatial_refs=None, stream=False,
  settings=None) -> {"answer": str}`
- `detect(image, object, settings=None) -> {"objects": [{x_min, y_min, x_max, y_max}]}` and
  `point(image, object, settings=None) -> {"points": [{x, y}]}`: 1-3 items, coordinates in
  [0, 1] steered by the image and the object's name.
- `encode_image(image) -> EncodedImage`, accepted by all of them in place of the image.
- `settings`: None means the defaults (temperature 0.5, i.e. sampling); a dict without
  "variant" raises KeyError; a non-None variant raises ValueError (the real model would
  download LoRA weights from a remote API). Temperature 0 is greedy and deterministic.

Outputs are space-separated words from a built-in list, depend on the image pixels and
on the length / question, and every call is recorded on the model for tests:
`model.calls` holds `(method, length_or_question, settings_copy)` tuples and
`model.encode_image_calls` counts image encodings (explicit or implicit).
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGURATION = """\
from transformers import PretrainedConfig


class TinyMoondreamConfig(PretrainedConfig):
    model_type = "tinymoondream"

    def __init__(self, dim=32, grid=8, prompt_buckets=256, max_positions=64, **kwargs):
        self.dim = dim
        self.grid = grid
        self.prompt_buckets = prompt_buckets
        self.max_positions = max_positions
        super().__init__(**kwargs)
"""

MODELING = '''\
"""Tiny Moondream-compatible model: same public API, a few thousand random weights."""

import zlib

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tinymoondream import TinyMoondreamConfig

WORDS = (
    "red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "brown",
    "cat", "dog", "bird", "horse", "fish", "tree", "flower", "house", "car", "boat",
    "mountain", "river", "beach", "forest", "city", "street", "window", "door", "table",
    "chair", "lamp", "book", "sky", "cloud", "sun", "moon", "night", "morning", "light",
    "shadow", "soft", "bright", "dark", "warm", "cold", "old", "new", "small", "large",
    "wooden", "metal", "glass", "stone", "paper", "portrait", "landscape", "closeup",
    "painting", "photo", "sketch", "pattern", "texture", "colorful", "quiet",
)
LENGTHS = {"short": 6, "normal": 12, "long": 24}
QUERY_WORDS = 8
DEFAULT_SETTINGS = {"temperature": 0.5, "top_p": 0.3, "max_tokens": 768}


class EncodedImage:
    """What encode_image returns; caption and query accept it in place of an image."""

    def __init__(self, features):
        self.features = features


class TinyMoondream(PreTrainedModel):
    config_class = TinyMoondreamConfig
    base_model_prefix = "tinymoondream"

    def __init__(self, config):
        super().__init__(config)
        vocab = len(WORDS)
        self.vision = nn.Linear(3 * config.grid * config.grid, config.dim)
        self.prompt = nn.Embedding(config.prompt_buckets, config.dim)
        self.wte = nn.Embedding(vocab + 1, config.dim)  # the last id is BOS
        self.pos = nn.Embedding(config.max_positions, config.dim)
        self.mix = nn.Linear(config.dim, config.dim)
        self.head = nn.Linear(config.dim, vocab)
        self.calls = []
        self.encode_image_calls = 0
        # TOKENIZER
        self.post_init()

    def _init_weights(self, module):
        pass  # the checkpoint provides every weight

    def forward(self, *args, **kwargs):
        raise NotImplementedError("use caption() / query() like Moondream")

    # --- Moondream's public API -------------------------------------------------------

    def encode_image(self, image):
        if isinstance(image, EncodedImage):
            return image
        if not hasattr(image, "convert"):
            raise TypeError(f"expected a PIL image or EncodedImage, got {type(image)!r}")
        self.encode_image_calls += 1
        grid = self.config.grid
        small = image.convert("RGB").resize((grid, grid))
        raw = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
        w = self.vision.weight
        x = (raw.to(torch.float32) / 255.0 - 0.5).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            features = torch.tanh(self.vision(x))
        return EncodedImage(features)

    def caption(self, image, length="normal", stream=False, settings=None):
        if length not in LENGTHS:
            raise ValueError(f"Unsupported caption length: {length}")
        self.calls.append(("caption", length, None if settings is None else dict(settings)))
        s = self._settings(settings)
        encoded = self.encode_image(image)
        words = self._generate(encoded, f"caption {length}", LENGTHS[length], s)
        return {"caption": self._output(words, stream)}

    def query(self, image=None, question=None, reasoning=False, spatial_refs=None,
              stream=False, settings=None):
        if question is None:
            raise ValueError("question is required")
        self.calls.append(("query", question, None if settings is None else dict(settings)))
        s = self._settings(settings)
        if image is None:
            raise ValueError("tiny moondream needs an image")
        encoded = self.encode_image(image)
        words = self._generate(encoded, f"query {question}", QUERY_WORDS, s)
        return {"answer": self._output(words, stream)}

    def detect(self, image, object, settings=None):
        """Boxes {x_min, y_min, x_max, y_max} (fractions of the image), steered by the image
        and the object's name, as Moondream2's detect returns them."""
        self.calls.append(("detect", object, None if settings is None else dict(settings)))
        self._settings(settings)
        coords = self._coordinates(self.encode_image(image), f"detect {object}", 4)
        boxes = []
        for x0, y0, x1, y1 in coords:
            boxes.append({"x_min": min(x0, x1), "y_min": min(y0, y1),
                          "x_max": max(x0, x1), "y_max": max(y0, y1)})
        return {"objects": boxes}

    def point(self, image, object, settings=None):
        """Points {x, y} (fractions of the image), as Moondream2's point returns them."""
        self.calls.append(("point", object, None if settings is None else dict(settings)))
        self._settings(settings)
        coords = self._coordinates(self.encode_image(image), f"point {object}", 2)
        return {"points": [{"x": x, "y": y} for x, y in coords]}

    # --- internals --------------------------------------------------------------------

    def _coordinates(self, encoded, prompt, per_item):
        """1-3 items of `per_item` numbers in [0, 1], from the image and the prompt."""
        buckets = [zlib.crc32(t.encode()) % self.config.prompt_buckets
                   for t in prompt.lower().split()]
        with torch.no_grad():
            ids = torch.tensor(buckets, device=self.head.weight.device)
            h = torch.sigmoid(self.mix(encoded.features + self.prompt(ids).sum(0))).float()
        count = 1 + zlib.crc32(prompt.encode()) % 3
        values = [round(float(v), 4) for v in h[: count * per_item]]
        return [tuple(values[i * per_item:(i + 1) * per_item]) for i in range(count)]

    @staticmethod
    def _settings(settings):
        if settings is None:
            return dict(DEFAULT_SETTINGS, variant=None)
        variant = settings["variant"]  # KeyError when missing, like Moondream2
        if variant is not None:
            raise ValueError(
                f"variant {variant!r}: would download LoRA weights from a remote API; refused"
            )
        return {
            "temperature": settings.get("temperature", DEFAULT_SETTINGS["temperature"]),
            "top_p": settings.get("top_p", DEFAULT_SETTINGS["top_p"]),
            "max_tokens": settings.get("max_tokens", DEFAULT_SETTINGS["max_tokens"]),
            "variant": None,
        }

    def _generate(self, encoded, prompt, n_words, settings):
        n = min(n_words, int(settings["max_tokens"]), self.config.max_positions)
        w = self.head.weight
        buckets = [zlib.crc32(t.encode()) % self.config.prompt_buckets
                   for t in prompt.lower().split()]
        with torch.no_grad():
            ids = torch.tensor(buckets, device=w.device)
            # The image and the prompt steer every step, so both show in the words.
            context = encoded.features + self.prompt(ids).sum(0)
            h = torch.tanh(context)
            prev = len(WORDS)
            out = []
            for i in range(n):
                step = self.wte(torch.tensor(prev, device=w.device))
                step = step + self.pos(torch.tensor(i, device=w.device))
                h = torch.tanh(self.mix(h) + step + context)
                logits = self.head(h).float()
                temperature = float(settings["temperature"])
                if temperature == 0:
                    tok = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    sorted_p, order = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sorted_p, 0) - sorted_p < float(settings["top_p"])
                    sorted_p = sorted_p * keep
                    tok = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1)])
                out.append(WORDS[tok])
                prev = tok
        return out

    @staticmethod
    def _output(words, stream):
        if stream:
            return iter([(" " if i else "") + w for i, w in enumerate(words)])
        return " ".join(words)
'''


TOKENIZER_LINE = """\
        from tokenizers import Tokenizer  # like Moondream2: unpinned, from the Hub

        self.tokenizer = Tokenizer.from_pretrained("moondream/starmie-v1")
"""


def build_tiny_moondream(out_dir: Path, seed: int = 0, *, tokenizer: bool = False) -> Path:
    """Write the tiny remote-code model into `out_dir` and return it.

    With `tokenizer=True` the model, like Moondream2, loads `moondream/starmie-v1` with
    `tokenizers.Tokenizer.from_pretrained` when it is built (then it needs that tokenizer
    cached, or the Hub).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "configuration_tinymoondream.py").write_text(CONFIGURATION, encoding="utf-8")
    plain = MODELING.replace("        # TOKENIZER\n", "")
    (out_dir / "modeling_tinymoondream.py").write_text(plain, encoding="utf-8")
    config = {
        "model_type": "tinymoondream",
        "architectures": ["TinyMoondream"],
        "auto_map": {
            "AutoConfig": "configuration_tinymoondream.TinyMoondreamConfig",
            "AutoModelForCausalLM": "modeling_tinymoondream.TinyMoondream",
        },
        "dim": 32,
        "grid": 8,
        "prompt_buckets": 256,
        "max_positions": 64,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    cfg = AutoConfig.from_pretrained(out_dir, trust_remote_code=True, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        # Large enough weights that different images and prompts give different words.
        if name.endswith(("wte.weight", "pos.weight", "prompt.weight")):
            scale = 1.0  # embeddings
        elif param.dim() > 1:
            scale = 2.0 / param.shape[-1] ** 0.5
        else:
            scale = 0.5
        state[name] = (torch.randn(param.shape, generator=gen) * scale).contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        modeling = MODELING.replace("        # TOKENIZER\n", TOKENIZER_LINE)
        (out_dir / "modeling_tinymoondream.py").write_text(modeling, encoding="utf-8")
    return out_dir


def install_in_hf_cache(
    files: dict[str, bytes | Path],
    hub_dir: Path,
    repo_id: str,
    ref: str | None = "main",
    commit: str | None = None,
) -> Path:
    """Lay `files` out as huggingface_hub's cache does (blobs + snapshot symlinks + ref).

    `hub_dir` is the hub cache ($HF_HOME/hub). Returns the snapshot folder. With a
    `ref` (a branch or tag such as "2025-06-21"), refs/<ref> points at the commit.
    """
    import hashlib

    hub_dir = Path(hub_dir)
    repo = hub_dir / f"models--{repo_id.replace('/', '--')}"
    contents = {name: (p.read_bytes() if isinstance(p, Path) else p) for name, p in files.items()}
    if commit is None:
        digest = hashlib.sha1()
        for name in sorted(contents):
            digest.update(name.encode() + contents[name])
        commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def model_files(model_dir: Path) -> dict[str, bytes | Path]:
    """The files of a model folder, for install_in_hf_cache."""
    return {p.name: p for p in Path(model_dir).iterdir() if p.is_file()}


def tiny_tokenizer_json() -> bytes:
    """A small tokenizer.json standing in for moondream/starmie-v1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "moon": 2, "dream": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()

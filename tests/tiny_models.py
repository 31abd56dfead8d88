"""Tiny random-weight vision-language models, built offline for the tests.

Each builder makes a model of a few hundred kB to a few MB in well under a second, saves it
with `save_pretrained` (model, generation config, processor with tokenizer and image
processor, and for the chat models a chat template) and returns the directory. They load
the way a real model does:

    AutoProcessor.from_pretrained(path, local_files_only=True)
    AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)

What the outputs look like:

* The vocabulary is English words. Generation can only produce the content words
  (`content_words()`: colours, objects, materials, ...); special tokens, punctuation and
  every word a prompt can contain (`prompt_words()`) are suppressed, and the
  end-of-sequence token is never generated. So a decoded caption is always exactly
  `max_new_tokens` space-separated lower-case words, and a prompt word or role marker
  ("user", "assistant", "describe", ...) found in an output was echoed from the prompt.
* Weights are random (seeded, `initializer_range` 0.2), so the same inputs always give the
  same words, while different images, and for the chat models different prompts, give
  different words.

`build_tiny_llava`: LlavaForConditionalGeneration (CLIP vision + Llama text) with a
LLaVA-1.5 style chat template; every image becomes the same number of image tokens, so a
batch never needs padding. Its image processor does not convert to RGB (grey or RGBA input
only works if the caller converts it) and its tokenizer returns `token_type_ids`, which
Llava's forward does not take (the backend must drop them).
`build_tiny_llava_next`: LlavaNextForConditionalGeneration, whose number of image tokens
depends on the image's size and aspect ratio, so a batch of differently shaped images is
left-padded. `build_tiny_blip`: BlipForConditionalGeneration, no chat template
(unconditional captioning).

`python tests/tiny_models.py DIR` (with the project importable) builds all three into DIR.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# Words a model may generate. None of them appears in a prompt.
_CONTENT = """
red orange yellow green blue purple pink brown black white grey gold silver teal cyan
magenta crimson amber ivory beige navy olive maroon coral violet indigo turquoise
cat dog horse bird fish cow sheep goat rabbit fox bear deer wolf lion tiger zebra owl
duck swan frog snake turtle whale dolphin bee butterfly spider
tree flower grass leaf forest garden field meadow mountain hill valley river lake ocean
sea beach island desert canyon cliff cave volcano glacier waterfall cloud sky sun moon
star rain snow fog storm rainbow sunset sunrise night dawn dusk
house castle tower bridge road street city village church temple barn cabin tent
window door roof wall floor stair fence gate chimney balcony
car truck bus train bicycle boat ship plane rocket tractor
table chair sofa bed lamp clock mirror vase bottle cup bowl plate spoon knife fork
book guitar piano violin drum camera phone computer keyboard robot
apple banana cherry lemon grape bread cake cheese pizza coffee tea
man woman child girl boy baby crowd dancer knight wizard soldier farmer sailor
hat coat dress shirt shoe boot scarf glove ring crown mask umbrella
wooden metal glass stone marble velvet silk leather paper plastic brick concrete
bright dark soft sharp blurry shiny rough smooth glossy matte misty foggy sunny rainy
tiny huge tall round square flat curved striped spotted
old young ancient modern vintage rustic elegant cozy quiet busy empty crowded
warm cold calm wild happy sad lonely peaceful dramatic cinematic painted sketched
portrait landscape closeup macro panorama silhouette reflection shadow
""".split()

# Prompt words that are not instructions, so a test's question can be tokenized.
_QUESTION_WORDS = """
what which who where when why how many much is are was does do there here it its
colour color shape animal object thing kind main one two three four in on of the a an
and or with this that image picture photo
""".split()

_IMAGE_TOKEN = "<image>"
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", _IMAGE_TOKEN]

# Llava-1.5 style: "USER: <image>\n<text> ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def _prompt_vocabulary() -> list[str]:
    """Every token a prompt can contain: instructions, role markers, question words."""
    from watcher.tasks import INSTRUCTIONS

    words: list[str] = ["user", "assistant", "system", ":", ",", ".", "?", "!", "'", "-"]
    for text in INSTRUCTIONS.values():
        words += _words(text)
    words += _QUESTION_WORDS
    return list(dict.fromkeys(words))


def _vocabulary() -> tuple[list[str], list[str]]:
    """(prompt-only tokens, content words), disjoint, in a fixed order."""
    prompt = _prompt_vocabulary()
    taken = set(prompt)
    content = [w for w in dict.fromkeys(_CONTENT) if w not in taken]
    return prompt, content


def prompt_words() -> list[str]:
    """Tokens that can appear in a prompt (instruction and question words, role markers,
    punctuation); the tiny models never generate them."""
    return _vocabulary()[0]


def content_words() -> list[str]:
    """The only words the tiny models generate."""
    return _vocabulary()[1]


def _word_tokenizer():
    """A lower-casing word-level fast tokenizer; decode joins tokens with spaces."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    prompt, content = _vocabulary()
    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *prompt, *content])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": _IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": [_IMAGE_TOKEN]})
    content_ids = {vocab[w] for w in content}
    suppressed = sorted(i for i in vocab.values() if i not in content_ids)
    return tok, suppressed


def _generation_config(tok, suppressed: list[int]):
    from transformers import GenerationConfig

    # The end-of-sequence token exists but is suppressed like every non-content token, so
    # generation always runs to max_new_tokens and never stops on an empty caption.
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=suppressed,
        do_sample=False,
    )


def _text_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision_config(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
        initializer_range=0.2,
    )


def _image_processor(cls, size: int, **kw):
    return cls(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        **kw,
    )


def _save(model, processor, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_llava(out_dir: Path) -> Path:
    """A tiny LlavaForConditionalGeneration with a chat template; returns `out_dir`."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    tok, suppressed = _word_tokenizer()
    image_size, patch_size = 32, 8
    config = LlavaConfig(
        vision_config=_vision_config(image_size, patch_size),
        text_config=_text_config(tok),
        image_token_index=tok.convert_tokens_to_ids(_IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tok, suppressed)
    processor = LlavaProcessor(
        # No RGB conversion in the processor: grey or RGBA images only work if the caller
        # converts them (the backend does), which the tests check.
        image_processor=_image_processor(CLIPImageProcessor, image_size, do_convert_rgb=False),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=_IMAGE_TOKEN,
    )
    return _save(model, processor, out_dir)


def build_tiny_llava_next(out_dir: Path) -> Path:
    """A tiny LlavaNextForConditionalGeneration ("anyres"): the number of image tokens
    depends on the image's shape, so batches of differently shaped images are padded."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    torch.manual_seed(0)
    tok, suppressed = _word_tokenizer()
    image_size, patch_size = 16, 8
    pinpoints = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
    config = LlavaNextConfig(
        vision_config=_vision_config(image_size, patch_size),
        text_config=_text_config(tok),
        image_token_index=tok.convert_tokens_to_ids(_IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tok, suppressed)
    processor = LlavaNextProcessor(
        image_processor=_image_processor(
            LlavaNextImageProcessor, image_size, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=_IMAGE_TOKEN,
    )
    return _save(model, processor, out_dir)


def build_tiny_blip(out_dir: Path) -> Path:
    """A tiny BlipForConditionalGeneration (no chat template); returns `out_dir`."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt, content = _vocabulary()
    # BLIP's processor wants a BERT tokenizer; BERT splits punctuation and lower-cases too.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokens = [*specials, *prompt, *content]
    vocab_file = out_dir / "bert-vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, bos_token="[DEC]")
    vocab_file.unlink()
    ids = {t: i for i, t in enumerate(tokens)}
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokens),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 512,
            "initializer_range": 0.2,
            "pad_token_id": ids["[PAD]"],
            "bos_token_id": ids["[DEC]"],
            "eos_token_id": ids["[SEP]"],
            "sep_token_id": ids["[SEP]"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": 0.2,
        },
        projection_dim=32,
        initializer_range=0.2,
    )
    model = BlipForConditionalGeneration(config).eval()
    # BLIP's generate() hands its own eos (= [SEP]) to the text decoder and does not read the
    # saved generation config, so non-content tokens are suppressed in the weights instead:
    # a large negative output bias means the decoder never picks them.
    content_ids = {ids[w] for w in content}
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        for i in range(len(tokens)):
            if i not in content_ids:
                bias[i] = -1e4
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    return _save(model, processor, out_dir)


if __name__ == "__main__":  # build all three into a folder, for poking at by hand
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    for name, build in (
        ("llava", build_tiny_llava),
        ("llava-next", build_tiny_llava_next),
        ("blip", build_tiny_blip),
    ):
        path = build(root / name)
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        print(json.dumps({"model": name, "path": str(path), "mb": round(size, 2)}))

"""Any image-to-text model that transformers loads with AutoModelForImageTextToText.

How a task becomes a prompt:

* Chat models (the processor has a chat template: LLaVA, Qwen2-VL, SmolVLM, Gemma 3, ...)
  are asked the task's instruction (or the query's question) in one user turn holding the
  image and the text, rendered and tokenized by `processor.apply_chat_template` with the
  generation prompt added. Only the tokens generated after the prompt are decoded.
* Models without a chat template (BLIP, GIT, PaliGemma, ...) are captioned
  unconditionally: they get the image and no text. Their text input is a caption prefix or
  a task code, not an instruction, so feeding them "Describe this image ..." would only
  make them continue that sentence. Every task then asks the same question, so it is
  generated once, with the largest max_tokens of those tasks, and each task gets the first
  max_tokens of it (greedy decoding makes that the same as a shorter run).

Generation is greedy (`do_sample=False`, one beam) and batched: all images of a call go
through the model together, left-padded, with the attention mask telling the model which
positions are padding (generate() derives the position ids from the mask), so a batch gives
the same text as one image at a time. The text is returned raw; the caller cleans it.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.backends import LOADING, ModelUnavailable
from watcher.backends.weights import (
    FIX,
    HubBackendSpec,
    cached_snapshot,
    first_line,
    offline_mode,
    require_pinned_revision,
    snapshot_complete,
    snapshot_revision,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from watcher.backends.device import Placement
    from watcher.config import ModelConfig
    from watcher.tasks import Task

log = structlog.get_logger()


class TransformersSpec(HubBackendSpec):
    """Any image-text-to-text model: named by model.id or model.path (no default model);
    remote code only with trust_remote_code, and then at a pinned revision."""

    name = "transformers"

    def load(self, cfg: ModelConfig) -> TransformersBackend:
        return TransformersBackend.load(cfg)

    def config_problem(self, cfg: ModelConfig, given: Collection[str]) -> str | None:
        if "id" not in given and "path" not in given:
            return "model.id: missing; backend 'transformers' needs id or path"
        return super().config_problem(cfg, given)

    def model_revision(self, cfg: ModelConfig) -> str | None:
        # A local copy that is no cache snapshot is recorded at the configured revision.
        if cfg.path:
            return snapshot_revision(Path(cfg.path)) or cfg.revision
        return cfg.revision


SPEC = TransformersSpec()


def _takes_token_type_ids(model: Any) -> bool:
    """Whether generate() passes `token_type_ids` on to the model (PaliGemma and Gemma 3
    use them; for most models a tokenizer adds them and generate() rejects them)."""
    names: set[str] = set()
    for fn in (model.forward, getattr(model, "prepare_inputs_for_generation", None)):
        if fn is not None:
            names.update(inspect.signature(fn).parameters)
    return "token_type_ids" in names


def _check_device(device: str) -> None:
    """ModelUnavailable for a configured device this machine does not have."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelUnavailable(f"model.device is {device}, but CUDA is not available here")
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise ModelUnavailable(f"model.device {device!r}: expected cuda or cuda:N")
        if index and int(index) >= torch.cuda.device_count():
            raise ModelUnavailable(
                f"model.device is {device}, but there are {torch.cuda.device_count()} CUDA devices"
            )
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise ModelUnavailable("model.device is mps, but MPS is not available here")


class TransformersBackend:
    """A transformers image-text-to-text model behind the Backend interface."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        revision: str | None,
        max_batch: int,
        placement: Placement,
    ) -> None:
        self.name = name
        self.revision = revision
        self.max_batch = max_batch
        self.placement = placement
        self._model = model
        self._processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            # Decoder-only models continue the last position: padding goes on the left.
            tokenizer.padding_side = "left"
        self._tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self.chat = bool(getattr(processor, "chat_template", None))
        self._encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self._token_type_ids = _takes_token_type_ids(model)

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, cfg: ModelConfig) -> TransformersBackend:
        """Load processor and model from `cfg.path` or the Hub id `cfg.id` at `cfg.revision`.

        Raises ModelUnavailable, naming the model, when the files are missing (a bad path,
        or a Hub model not in the cache while offline), the configured device is not there,
        or the model cannot be loaded as an image-text-to-text model.
        """
        import torch  # here, not at the top: the registry imports this module's SPEC

        from watcher.backends.device import pick

        require_pinned_revision(cfg)
        placement = pick(cfg.device, cfg.dtype)
        _check_device(placement.device)
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.path:
            path = Path(cfg.path).expanduser()
            if not path.is_dir():
                what = "is not a directory" if path.exists() else "does not exist"
                raise ModelUnavailable(f"model.path: {cfg.path} {what}")
            if not (path / "config.json").is_file():
                raise ModelUnavailable(
                    f"model.path: {cfg.path} is not a model folder (no config.json)"
                )
            source, revision = str(path), snapshot_revision(path) or cfg.revision
            where, hint = source, ""
            kwargs["local_files_only"] = True
        else:
            source, revision = cfg.id, cfg.revision
            if revision:
                kwargs["revision"] = revision
            where = f"{source} at revision {revision}" if revision else source
            hint = f"; to fix: {FIX}"
            if os.path.isdir(source) or offline_mode():
                kwargs["local_files_only"] = True
            else:
                snapshot = cached_snapshot(source, revision)
                # Everything is in the cache: no Hub round trips at start-up.
                kwargs["local_files_only"] = snapshot is not None and snapshot_complete(snapshot)
        log.info(
            "loading model",
            backend="transformers",
            model=source,
            revision=revision,
            device=placement.device,
        )
        started = time.monotonic()
        try:
            with LOADING:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                processor = AutoProcessor.from_pretrained(source, **kwargs)
                model = AutoModelForImageTextToText.from_pretrained(
                    source, dtype=placement.dtype, device_map={"": placement.device}, **kwargs
                )
        except OSError as e:
            why = first_line(e, drop_stop=True)
            raise ModelUnavailable(
                f"cannot load model {where}: files missing or unreadable: {why}{hint}"
            ) from e
        except (ValueError, KeyError, ImportError) as e:
            why = first_line(e, drop_stop=True)
            raise ModelUnavailable(
                f"cannot load model {where} as an image-text-to-text model: {why}"
            ) from e
        except torch.cuda.OutOfMemoryError as e:
            raise ModelUnavailable(
                f"cannot load model {where}: not enough memory on {placement.device} "
                f"for {str(placement.dtype).removeprefix('torch.')} weights"
            ) from e
        model.eval()
        backend = cls(
            model,
            processor,
            name=source,
            revision=revision,
            max_batch=cfg.batch_size,
            placement=placement,
        )
        log.info(
            "model ready",
            backend="transformers",
            model=source,
            revision=revision,
            placement=placement.describe(),
            chat_template=backend.chat,
            seconds=round(time.monotonic() - started, 1),
        )
        return backend

    # --- inference ----------------------------------------------------------------------

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        """Per image, one raw output per task (in task order)."""
        if self._model is None:
            raise RuntimeError("the model was closed")
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        results: list[list[str]] = [[""] * len(tasks) for _ in images]
        if not images or not tasks:
            return results
        # Tasks that give the model the same input share one generation.
        groups: dict[str | None, list[int]] = {}
        for t, task in enumerate(tasks):
            groups.setdefault(task.instruction if self.chat else None, []).append(t)
        step = max(1, self.max_batch)
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            for instruction, members in groups.items():
                limits = [tasks[t].max_tokens for t in members]
                new_tokens = self._generate(chunk, instruction, max(limits))
                for t, limit in zip(members, limits, strict=True):
                    texts = self._decode(new_tokens[:, :limit])
                    for i, text in enumerate(texts):
                        results[start + i][t] = text
        return results

    def stream(self, image: Image.Image, task: Task) -> Iterator[str]:
        """One image's text for one task, as generate() produces it (TextIteratorStreamer):
        the same greedy tokens as `describe`, decoded piece by piece."""
        if self._model is None:
            raise RuntimeError("the model was closed")
        if self._tokenizer is None:  # nothing to decode pieces with: the whole text at once
            yield self.describe([image], [task])[0][0]
            return
        import torch
        from transformers import TextIteratorStreamer

        image = image if image.mode == "RGB" else image.convert("RGB")
        inputs = self._inputs([image], task.instruction if self.chat else None)
        if not self._token_type_ids:
            inputs.pop("token_type_ids", None)
        inputs = inputs.to(self.placement.device, dtype=self.placement.dtype)
        # skip_prompt: generate() first hands the streamer the prompt (or the decoder's
        # start tokens), which describe() strips too.
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():  # thread-local: set in the thread that runs it
                    self._model.generate(
                        **inputs,
                        do_sample=False,
                        num_beams=1,
                        max_new_tokens=task.max_tokens,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                        streamer=streamer,
                    )
            except BaseException as e:  # handed to the reader, which re-raises it
                failure.append(e)
                streamer.end()  # else the reader waits for text that never comes

        # generate() pushes text into the streamer from its own thread; this generator reads
        # it. The thread is joined before returning, even when the reader stops early, so
        # the model is never running when the caller's next model call starts.
        thread = threading.Thread(target=generate, name="model-stream", daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield text
        finally:
            thread.join()
        if failure:
            raise failure[0]

    def _inputs(self, images: list[Image.Image], instruction: str | None) -> Any:
        if instruction is None:
            return self._processor(images=images, return_tensors="pt")
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        {"type": "text", "text": instruction},
                    ],
                }
            ]
            for image in images
        ]
        return self._processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding=True,
        )

    def _generate(
        self, images: list[Image.Image], instruction: str | None, max_new_tokens: int
    ) -> torch.Tensor:
        """The generated token ids, prompt removed, shape (len(images), n)."""
        import torch

        inputs = self._inputs(images, instruction)
        if not self._token_type_ids:
            inputs.pop("token_type_ids", None)
        # Moves every tensor to the device; only floating ones (pixels) take the dtype.
        inputs = inputs.to(self.placement.device, dtype=self.placement.dtype)
        with torch.inference_mode():
            out = self._model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                # Sampling settings from the model's generation config do not apply to
                # greedy decoding; cleared so generate() does not warn about them.
                temperature=None,
                top_p=None,
                top_k=None,
            )
        if not isinstance(out, torch.Tensor):  # a ModelOutput from return_dict_in_generate
            out = out.sequences
        prompt = inputs.get("input_ids")
        if prompt is not None and not self._encoder_decoder:
            n = prompt.shape[1]
            # Decoder-only models return prompt + continuation; some remote-code models
            # return only the continuation, so strip the prompt only where it is there.
            if out.shape[1] >= n and torch.equal(out[:, :n], prompt.to(out.device)):
                return out[:, n:]
        # No prompt in front: the output starts with the start token(s) the model was seeded
        # with (BLIP's [DEC] and GIT's [CLS] without a text prompt, an encoder-decoder's
        # decoder start). Drop them so that max_tokens counts generated tokens only.
        lead = 0
        while lead < out.shape[1] and all(int(t) in self._special for t in out[:, lead]):
            lead += 1
        return out[:, lead:]

    def _decode(self, ids: torch.Tensor) -> list[str]:
        decoder = self._tokenizer if self._tokenizer is not None else self._processor
        return decoder.batch_decode(ids.cpu(), skip_special_tokens=True)

    def close(self) -> None:
        """Free the model and, on a GPU, its cached memory."""
        self._model = None
        self._processor = None
        self._tokenizer = None
        from watcher.backends.device import free_memory

        free_memory(self.placement.device)

